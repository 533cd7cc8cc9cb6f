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

- compile s: the first training step's time minus the median later step's (what compiling
  forward and backward cost), and its ratio to the model without spectral norm and to
  upstream's with the same API;
- step ms: the median compiled training step after the first 10;
- breaks: graph breaks over the run (``torch._dynamo.utils.counters``);
- recompiles: frames dynamo compiled by any call after the first of its kind (train, eval,
  EMA) over the run (0: each graph compiled once and reused);
- eager diff: every 10th step, after it, the compiled training forward against the same
  module's eager one from the same state (the buffers put back after each), the largest
  ``|compiled - eager|`` over the largest ``|eager|`` of the output (with ``track_tol`` the
  eager forward tracks and the compiled one takes upstream's step: they differ by the lag);
- export: whether ``torch.export.export`` of the eval model works.

Run:  python benchmarks/compile.py [--models sngan,mlp] [--steps 100] [--variants ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations
from _common import machine, table
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
    times, diffs, seen, recompiles = [], [], set(), 0

    def call(kind, f, *args):  # f(*args), counting the frames dynamo compiles after a kind's first call
        nonlocal recompiles
        before = torch._dynamo.utils.counters["frames"]["total"]
        out = f(*args)
        if kind in seen:
            recompiles += torch._dynamo.utils.counters["frames"]["total"] - before
        seen.add(kind)
        return out

    for step in range(steps):
        x = torch.randn(batch, *shape, generator=gen)
        start = time.perf_counter()
        net.train()
        opt.zero_grad(set_to_none=True)
        call("train", compiled, x).square().mean().backward()
        opt.step()
        times.append(time.perf_counter() - start)
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
                call("eval", compiled, x)
                call("ema", compiled_ema, x)
            net.train()
    later = statistics.median(times[10:]) if steps > 10 else times[-1]
    try:
        torch.export.export(net.eval(), (torch.randn(2, *shape),))
        export = "yes"
    except Exception as error:  # reported, not raised: upstream may fail here
        export = f"no: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    counters = torch._dynamo.utils.counters
    return {
        "compile_s": times[0] - later,
        "step_ms": later * 1e3,
        "breaks": sum(counters["graph_break"].values()),
        "recompiles": recompiles,
        "eager_diff": max(((c - e).abs().max() / e.abs().max()).item() for e, c in zip(diffs[::2], diffs[1::2])),
        "export": export,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sngan,mlp")
    parser.add_argument("--steps", type=int, default=100)
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
        results = {}
        for variant in variants:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                       "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
                run = subprocess.run([sys.executable, __file__, "--one", model, variant, "--steps", str(args.steps)],
                                     env=env, capture_output=True, text=True, check=False)
            if run.returncode:
                results[variant] = {"error": (run.stderr.strip().splitlines() or ["?"])[-1][:100]}
            else:
                results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        plain = results.get("no SN", {}).get("compile_s")
        rows = []
        for variant, r in results.items():
            if "error" in r:
                rows.append([variant, "failed: " + r["error"], "", "", "", "", "", "", ""])
                continue
            theirs = results.get(UPSTREAM.get(variant, ""), {}).get("compile_s")
            rows.append([variant, f"{r['compile_s']:.1f}", f"{r['compile_s'] / plain:.2f}" if plain else "",
                         f"{r['compile_s'] / theirs:.2f}" if theirs else "", f"{r['step_ms']:.1f}",
                         str(r["breaks"]), str(r["recompiles"]), f"{r['eager_diff']:.1e}", r["export"]])
        print(f"\n{model}: {args.steps} compiled training steps, Adam, one thread\n")
        print(table(["variant", "compile s", "x no SN", "x upstream", "step ms", "breaks", "recompiles",
                     "eager diff", "export (eval)"], rows))


if __name__ == "__main__":
    main()
