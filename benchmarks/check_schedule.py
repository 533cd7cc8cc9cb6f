"""The warm-up's check schedule: when its one-vector Lanczos reads the error bound.

A check (one host read, an eigensolve of the small tridiagonal ``T``) costs about what one to
three Lanczos steps of a 256-1024-wide layer cost; checking too rarely runs steps past the
point where the bound was met.  This records, for default-initialised weights and a few
spectra with planted gaps, the stopping quantity of ``safe_norm._krylov`` after every step
(from one basis: the coefficients do not depend on where the checks fall), then replays
schedules on it: a first check at ``F`` steps, then at most ``k // S`` steps later (the bound's
fall extrapolated, :func:`safe_norm._krylov._steps_to`).  Costs are measured here, in the same
run: a step's time per shape (30 steps, best of 5) and a check's time per step count (best of
20).  Printed per schedule: checks per solve, steps past the stopping step, and the cost
(steps x step time + checks x check time) as a multiple of one check at the stopping step.

Run:  python benchmarks/check_schedule.py [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from safe_norm import _krylov


def weights(seeds: int):
    shapes = [(256, 256), (512, 512), (1024, 1024), (256, 1152), (512, 2304), (1024, 164)]
    for seed in range(seeds):
        for out_f, in_f in shapes:
            torch.manual_seed(seed)
            yield f"{out_f}x{in_f}", nn.Linear(in_f, out_f).weight.detach()
        for gap in (0.5, 0.1, 0.01):  # a trained layer's clearer top: sigma_1 = (1 + gap) sigma_2
            torch.manual_seed(100 + seed)
            U, S, Vh = torch.linalg.svd(nn.Linear(512, 512).weight.detach())
            S[0] = S[1] * (1 + gap)
            yield f"gap {gap:g}", U @ torch.diag(S) @ Vh


def best(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def record(W: torch.Tensor, tol: float) -> tuple[list[float], float, dict[int, float]]:
    """The stopping quantity after every step, a step's time, and checks' times by steps."""
    A = W.mH if W.size(1) > W.size(0) else W  # as _lanczos_top orients it
    start = nn.functional.normalize(torch.randn(1, A.size(1), generator=torch.Generator().manual_seed(1)), dim=1)
    k_max = min(A.size(1), _krylov.MAX_WARMUP_STEPS)
    K = _krylov.Bidiagonalisation(A, start, k_max)
    K.extend(k_max)
    (C,) = K.coefficients(k_max)
    errors = [math.inf] + [_krylov._one_vector_error(_krylov.ritz(C, k), k, tol) for k in range(1, k_max + 1)]
    step = best(lambda: _krylov.Bidiagonalisation(A, start, 30).extend(30), 5) / 30

    def check(k: int) -> None:
        (C,) = K.coefficients(k)
        _krylov._one_vector_error(_krylov.ritz(C, k), k, tol)

    return errors, step, {k: best(lambda k=k: check(k), 20) for k in range(4, k_max + 1, 4)}


def replay(errors: list[float], tol: float, first: int, spread: int) -> list[int]:
    """The steps at which a schedule checks, the last one where it stops."""
    target, k_max = tol * _krylov.SAFETY, len(errors) - 1
    check, before, checks = min(first, k_max), (0, math.inf), []
    while True:
        checks.append(check)
        k, error = check, errors[check]
        if (k > 1 and error <= target) or k == k_max:
            return checks
        check = min(k + _krylov._steps_to(target, error, before[1], k - before[0], max(2, k // spread)), k_max)
        before = (k, error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tol", type=float, default=_krylov.DEFAULT_WARMUP_TOL)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = (_krylov.FIRST_CHECK, _krylov.CHECK_SPREAD)
    schedules = sorted({shipped, (8, 8), (8, 3), (12, 8), (12, 2), (16, 3), (16, 4)})
    recorded = []
    for label, W in weights(args.seeds):
        recorded.append((label, *record(W, args.tol)))
    print(f"torch {torch.__version__}, {args.threads} thread(s); {len(recorded)} solves, tol {args.tol:g}; "
          f"shipped: first check {shipped[0]}, then at most k // {shipped[1]} steps apart")
    labels = dict.fromkeys(label for label, *_ in recorded)
    print("step time (us, median over seeds): " + ", ".join(
        f"{label} {1e6 * statistics.median(s for lb, _, s, _ in recorded if lb == label):.0f}" for label in labels))
    print("check time (us) at 12 / 24 / 36 steps: " + " / ".join(
        f"{1e6 * statistics.median(c[k] for *_, c in recorded):.0f}" for k in (12, 24, 36)))
    print()
    print(f"{'first':>5} {'spread':>6}  {'checks':>6}  {'past stop':>9}  {'cost / ideal':>12}  {'worst':>6}")
    for first, spread in schedules:
        checks_n, past, ratios = [], [], []
        for _, errors, step, checks_t in recorded:
            stop = next(k for k in range(2, len(errors)) if errors[k] <= args.tol * _krylov.SAFETY)

            def check_time(k: int, checks_t=checks_t) -> float:
                return checks_t[min(checks_t, key=lambda c: abs(c - k))]

            at = replay(errors, args.tol, first, spread)
            cost = at[-1] * step + sum(check_time(k) for k in at)
            ratios.append(cost / (stop * step + check_time(stop)))
            checks_n.append(len(at))
            past.append(at[-1] - stop)
        mark = "  <- shipped" if (first, spread) == shipped else ""
        print(f"{first:>5} {spread:>6}  {statistics.mean(checks_n):>6.1f}  {statistics.mean(past):>9.1f}  "
              f"{statistics.mean(ratios):>11.2f}x  {max(ratios):>5.2f}x{mark}")


if __name__ == "__main__":
    main()
