"""torch.compile: compile time, step time, graph breaks and recompilations, without spectral
norm, with upstream's (both APIs) and with safe_norm's (both APIs, with and without
``track_tol``), from one run.

Models: the SNGAN CIFAR-10 CNN discriminator (8 normalised layers, batch 16 at 3x32x32) and a
1024-wide MLP (3 normalised layers, batch 32), from ``benchmarks/tracking.py``.

Each variant runs in a process of its own (dynamo's and inductor's in-memory caches would let
a later variant reuse an earlier one's work), with inductor's on-disk caches off and inductor
loaded first by compiling an unrelated function, so that the first step's time is compiling
this model.  In that process, 100 steps of ``torch.compile(net)`` with Adam: every 10th step
also switches to eval for a no_grad forward and back, and samples an EMA copy (a
``copy.deepcopy`` of the model at registration, its parameters moved by ``lerp_`` each step,
compiled on its own, evaluated in eval mode).

Reported per variant:

- compile s: what the calls took beyond a steady call of their kind (training steps, eval
  forwards, EMA samples; the steady one: their median after the first), i.e. compiling, at
  the first call or at any later recompilation; the median over ``--repeats`` processes a
  variant (run in interleaved rounds), its range, and its ratio to the model without spectral
  norm and to upstream's with the same API;
- step ms: the median compiled training step after the first 10;
- breaks: graph breaks over the run (``torch._dynamo.utils.counters``);
- recompiles: frames dynamo compiled by any call after the first of its kind (train, eval,
  EMA) over the run (0: each graph compiled once and reused);
- eager diff: every 10th step, after it, the compiled training forward against the same
  module's eager one from the same state (the buffers put back after each), the largest
  ``|compiled - eager|`` over the largest ``|eager|`` of the output (with ``track_tol`` the
  eager forward tracks and the compiled one takes upstream's step: they differ by the lag);
- export: whether ``torch.export.export`` of the eval model works.

Run:  python benchmarks/compile.py [--models sngan,mlp] [--steps 100] [--repeats 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations
from _common import machine, run_cold, table
from tracking import MODELS

VARIANTS = {
    "no SN": lambda m: m,
    "upstream hook": upstream_hook,
    "upstream param.": parametrizations.spectral_norm,
    "safe_norm hook": safe_norm.spectral_norm,
    "safe_norm param.": safe_norm.parametrizations.spectral_norm,
    "safe_norm hook + track_tol=1e-4": lambda m: safe_norm.spectral_norm(m, track_tol=1e-4),
    "safe_norm param. + track_tol=1e-4": lambda m: safe_norm.parametrizations.spectral_norm(m, track_tol=1e-4),
}
# the upstream variant each safe_norm variant is compared with
UPSTREAM = {name: "upstream hook" if "hook" in name else "upstream param." for name in VARIANTS if "safe_norm" in name}


def one(model: str, variant: str, steps: int) -> dict:
    """The measurements of one variant (run in a fresh process)."""
    torch.set_num_threads(1)
    torch.compile(lambda t: t.sin() + 1)(torch.ones(3))  # inductor loaded and warm
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    net, shape, batch = MODELS[model](VARIANTS[variant])
    batch = min(batch, 16 if model == "sngan" else 32)  # 100 steps of the discriminator in ~2 min
    ema = copy.deepcopy(net).eval()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
    compiled, compiled_ema = torch.compile(net), torch.compile(ema)
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"train": [], "eval": [], "ema": []}
    diffs, seen, recompiles = [], set(), 0

    def call(kind, f, *args):  # f(*args), counting the frames dynamo compiles after a kind's first call
        nonlocal recompiles
        before = torch._dynamo.utils.counters["frames"]["total"]
        out = f(*args)
        if kind in seen:
            recompiles += torch._dynamo.utils.counters["frames"]["total"] - before
        seen.add(kind)
        return out

    def timed(kind, f, *args):
        start = time.perf_counter()
        out = f(*args)
        times[kind].append(time.perf_counter() - start)
        return out

    def train_step(x):
        net.train()
        opt.zero_grad(set_to_none=True)
        call("train", compiled, x).square().mean().backward()
        opt.step()

    for step in range(steps):
        x = torch.randn(batch, *shape, generator=gen)
        timed("train", train_step, x)
        with torch.no_grad():
            for p, q in zip(ema.parameters(), net.parameters(), strict=True):
                p.lerp_(q, 0.001)
        if step % 10 == 0:
            # the same module eager and compiled from the same state, its buffers put back after each
            saved = [b.detach().clone() for b in net.buffers()]
            for f in (net, lambda x: call("train", compiled, x)):
                diffs.append(f(x).detach())
                with torch.no_grad():
                    for b, s in zip(net.buffers(), saved, strict=True):
                        b.copy_(s)
            net.eval()
            with torch.no_grad():
                timed("eval", call, "eval", compiled, x)
                timed("ema", call, "ema", compiled_ema, x)
            net.train()
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    # what every call took beyond a steady one of its kind: compiling, whenever it happened
    steady = {kind: statistics.median(t[1:] if len(t) > 1 else t) for kind, t in times.items()}
    compile_s = sum(sum(t) - len(t) * steady[kind] for kind, t in times.items())
    try:
        torch.export.export(net.eval(), (torch.randn(2, *shape),))
        export = "yes"
    except Exception as error:  # reported, not raised: upstream may fail here
        export = f"no: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return {
        "compile_s": compile_s,
        "step_ms": statistics.median(times["train"][10:] or times["train"]) * 1e3,
        "breaks": breaks,
        "recompiles": recompiles,
        "eager_diff": max(((c - e).abs().max() / e.abs().max()).item() for e, c in zip(diffs[::2], diffs[1::2])),
        "export": export,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sngan,mlp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="processes per variant, interleaved")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps)))
        return
    torch.set_num_threads(1)
    print(machine(torch.device("cpu")))
    variants = args.variants.split(",")
    for model in args.models.split(","):
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        errors: dict[str, str] = {}
        for _ in range(args.repeats):  # rounds over the variants: the machine's drifts hit all alike
            for variant in variants:
                run = run_cold(__file__, ["--one", model, variant, "--steps", str(args.steps)])
                if run.returncode:
                    errors[variant] = (run.stderr.strip().splitlines() or ["?"])[-1][:100]
                else:
                    runs[variant].append(json.loads(run.stdout.strip().splitlines()[-1]))
        compile_s = {v: statistics.median(r["compile_s"] for r in rs) for v, rs in runs.items() if rs}
        rows = []
        for variant in variants:
            if variant not in compile_s:
                rows.append([variant, "failed: " + errors.get(variant, "?")] + [""] * 8)
                continue
            rs, c = runs[variant], compile_s[variant]
            plain, theirs = compile_s.get("no SN"), compile_s.get(UPSTREAM.get(variant, ""))
            rows.append([variant, f"{c:.1f}", f"{min(r['compile_s'] for r in rs):.1f}-{max(r['compile_s'] for r in rs):.1f}",
                         f"{c / plain:.2f}" if plain else "", f"{c / theirs:.2f}" if theirs else "",
                         f"{statistics.median(r['step_ms'] for r in rs):.1f}", str(max(r["breaks"] for r in rs)),
                         str(max(r["recompiles"] for r in rs)), f"{max(r['eager_diff'] for r in rs):.1e}",
                         ", ".join(sorted({r["export"] for r in rs}))])
        print(f"\n{model}: {args.steps} compiled training steps, Adam, one thread; {args.repeats} processes a variant\n")
        print(table(["variant", "compile s", "range", "x no SN", "x upstream", "step ms", "breaks", "recompiles",
                     "eager diff", "export (eval)"], rows))
    print("\ncompile s: median over the processes of what the calls took beyond a steady call of their kind")
    print("(training steps, eval forwards, EMA samples); x no SN / x upstream: ratios of those medians.")


if __name__ == "__main__":
    main()
