"""How often a tracked training forward misses ``track_tol``, over many seeds and with the
rounding perturbed: what the README's tracking claim rests on.

For every (model, API, tolerance, seed), a training run of tests/test_tracking.py's
``train_errors`` (hinge loss on random data, Adam(lr 2e-4, betas (0, 0.9)), 16 + 16 samples a
step) records at every training forward of every layer that block Krylov tracks (shorter side
above ``_krylov.TRACK_EXACT_SIDE``; the others are solved exactly) ``|sigma used / exact - 1|``,
exact from the float64 Gram matrix's ``eigvalsh``; with ``--reference arpack`` (needs scipy),
layers whose shorter side exceeds 512 take ARPACK's top eigenvalue of the same float64 operator
instead (a 1024x1024 layer: ~3 ms rather than ~50 ms a forward), checked against ``eigvalsh``
at each run's first such forward to 1e-12.

"perturbed" repeats each run with every weight multiplied by ``1 + 1e-7 * N(0, 1)`` before each
step: a stand-in for another CPU's or BLAS build's rounding, which sends the same seed down a
slightly different trajectory.

Models (tests/test_tracking.py): ``mlp`` 96-256-256-1, ``conv_discriminator`` (3x16x16 input,
its two 256-row layers tracked by Krylov), ``wide_mlp`` 256-1024-1024-1 (as in
benchmarks/tracking.py).

Run from the repository root:
    python benchmarks/tracking_sweep.py [--seeds 20] [--steps 200] [--models mlp,conv_discriminator]
        [--tols 1e-3,1e-4,1e-5,1e-6] [--jobs 2] [--reference eigvalsh|arpack] [--out FILE]
Prints one row per (model, API, tolerance, rounding): runs, forwards, forwards above the
tolerance, the worst error / tolerance, and the share of tracked steps that needed a second
check or the fall-back solve.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' models and runs

from safe_norm import _krylov  # noqa: E402
from tests import test_tracking  # noqa: E402

eigvalsh_exact = test_tracking._exact

MODELS = {**test_tracking.MODELS, "wide_mlp": test_tracking._wide_mlp}
APIS = ("hook", "parametrization")


def _arpack_exact() -> Callable[[torch.Tensor], float]:
    """sigma_max of a float64 weight: ARPACK (relative residual 1e-14, so within 1e-14 of an
    eigenvalue of WᵀW; that it is the top one is checked against eigvalsh once per run) where
    the shorter side exceeds 512, eigvalsh elsewhere."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    checked = False

    def exact(W: torch.Tensor) -> float:
        nonlocal checked
        A = W.detach().double().flatten(1)
        if min(A.shape) <= 512:
            return eigvalsh_exact(A)
        M = A.numpy()
        n = M.shape[1]
        op = LinearOperator((n, n), matvec=lambda x: M.T @ (M @ x), dtype=M.dtype)
        sigma = float(eigsh(op, k=1, which="LA", tol=1e-14, return_eigenvectors=False)[0]) ** 0.5
        if not checked:
            reference = eigvalsh_exact(A)
            assert abs(sigma / reference - 1) <= 1e-12, (sigma, reference)
            checked = True
        return sigma

    return exact


def run(model: str, api: str, tol: float, seed: int, steps: int, perturbed: bool,
        reference: str = "eigvalsh") -> dict[str, object]:
    """One training run: the errors / tol of every Krylov-tracked forward, and how the tracked
    steps ended."""
    torch.set_num_threads(1)
    if reference == "arpack":
        test_tracking._exact = _arpack_exact()
    counts = {"more": 0, "solved": 0, "tracked": 0}
    track = _krylov.track_

    def counted(*args, **kwargs):
        found = track(*args, **kwargs)
        if found is not None and found.blocks:
            counts["tracked"] += 1
            counts["more"] += found.checks > 1
            counts["solved"] += not found.met
        return found

    _krylov.track_ = counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = test_tracking.train_errors(api, MODELS[model], tol, steps, seed, krylov_only=True,
                                                perturb=1e-7 if perturbed else 0.0)
    finally:
        _krylov.track_ = track
    return {"key": (model, api, tol, perturbed), "ratios": [e / tol for e in errors], **counts}


def _run(args: tuple) -> dict[str, object]:
    return run(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--apis", default=",".join(APIS))
    parser.add_argument("--tols", default="1e-3,1e-4,1e-5,1e-6")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--reference", choices=("eigvalsh", "arpack"), default="eigvalsh",
                        help="the exact sigma of layers wider than 512: eigvalsh, or ARPACK (scipy; faster)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    tols = [float(t) for t in args.tols.split(",")]
    jobs = [(model, api, tol, seed, args.steps, perturbed, args.reference)
            for model, api, tol, perturbed, seed in itertools.product(
                args.models.split(","), args.apis.split(","), tols, (False, True), range(args.seeds))]
    start = time.perf_counter()
    results = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(_run, jobs):
            results.append(result)
            print(f"{len(results)}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    rows: dict[tuple, dict[str, object]] = {}
    for r in results:
        row = rows.setdefault(r["key"], {"runs": 0, "ratios": [], "more": 0, "solved": 0, "tracked": 0})
        row["runs"] += 1  # type: ignore[operator]
        for k in ("more", "solved", "tracked"):
            row[k] += r[k]  # type: ignore[operator]
        row["ratios"].extend(r["ratios"])  # type: ignore[union-attr]
    lines = [f"torch {torch.__version__}, {args.seeds} seeds x {args.steps} steps, "
             f"{time.perf_counter() - start:.0f} s with {args.jobs} processes, exact sigma: {args.reference}", "",
             "| model | API | track_tol | rounding | runs | forwards | above tol | worst err/tol "
             "| 2+ checks | fall-back solves |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, api, tol, perturbed), row in rows.items():
        ratios = row["ratios"]
        tracked = max(row["tracked"], 1)  # type: ignore[call-overload]
        lines.append(f"| {model} | {api} | {tol:g} | {'perturbed' if perturbed else 'as is'} | {row['runs']} "
                     f"| {len(ratios)} | {sum(r > 1 for r in ratios)} | {max(ratios):.3f} "  # type: ignore[arg-type]
                     f"| {row['more'] / tracked:.1%} | {row['solved'] / tracked:.2%} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
