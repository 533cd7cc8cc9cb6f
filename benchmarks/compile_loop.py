"""torch.compile of a layer used at every step of a loop (pytorch#167645's recurrent model), in
training, with and without ``parametrize.cached()``: no spectral norm, upstream's and
safe_norm's parametrization API, from one run.

The model is that report's: a hidden state updated at every step of the sequence through two
spectrally normalised linear layers (``n_power_iterations=10`` there; its propagator's
``orthogonal`` parametrization is left out, so that the model without spectral norm has
none).  In training every access of a parametrized weight runs its power step, in both
libraries, so the compiled graph holds one per layer and step; under ``parametrize.cached()``
the weight is built once per forward.  Each variant is compiled from scratch in a process of its own (``fullgraph=True``,
one thread).

Reported: compile s, the first training step's time beyond a steady step's; step ms, the
median of the later half of 16 compiled steps; ratios to the model without spectral norm and
to upstream's.  One process a variant: single compile times vary by 20-40 % on a shared machine.
Plain and cached are different computations in training: a power step per use of the weight,
or one per forward.

Run:  python benchmarks/compile_loop.py [--length 16] [--n-power-iterations 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import safe_norm.parametrizations
from _common import machine, run_cold, table

VARIANTS = {
    "no SN": lambda m, n: m,
    "upstream param.": lambda m, n: parametrizations.spectral_norm(m, n_power_iterations=n),
    "safe_norm param.": lambda m, n: safe_norm.parametrizations.spectral_norm(m, n_power_iterations=n),
}


class Recurrent(nn.Module):
    def __init__(self, sn, n: int, inputs: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = hidden
        self.propagator = nn.Linear(hidden, hidden)
        self.decoder = sn(nn.Linear(hidden, inputs), n)
        self.encoder = sn(nn.Linear(inputs, hidden), n)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.new_zeros(self.hidden)
        for y in inputs.unbind(-2):
            x = self.propagator(x)
            x = x + self.encoder(self.decoder(x) - y)
        return x


def one(variant: str, cached: bool, length: int, n: int, steps: int = 16) -> dict:
    torch.set_num_threads(1)
    torch.compile(lambda t: t.sin() + 1)(torch.ones(3))  # inductor loaded and warm
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Recurrent(VARIANTS[variant], n)
    inputs = torch.randn(32, length, 64)
    compiled = torch.compile(model, fullgraph=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with parametrize.cached() if cached else contextlib.nullcontext():
            compiled(inputs).square().sum().backward()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[len(times) // 2:])  # the later half: the first few still settle
    return {"compile_s": times[0] - steady, "step_ms": steady * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16, help="steps of the loop")
    parser.add_argument("--n-power-iterations", type=int, default=10)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] == "1", args.length, args.n_power_iterations)))
        return
    torch.set_num_threads(1)
    print(machine(torch.device("cpu")))
    rows = []
    for cached in (False, True):
        found = {}
        for variant in VARIANTS:
            run = run_cold(__file__, ["--one", variant, str(int(cached)), "--length", str(args.length),
                                      "--n-power-iterations", str(args.n_power_iterations)])
            if run.returncode:
                rows.append([variant, "cached()" if cached else "", "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:80]])
                continue
            found[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        plain, theirs = found.get("no SN"), found.get("upstream param.")
        for variant, r in found.items():
            rows.append([variant, "cached()" if cached else "", f"{r['compile_s']:.1f}",
                         f"{r['compile_s'] / plain['compile_s']:.2f}" if plain else "",
                         f"{r['compile_s'] / theirs['compile_s']:.2f}" if theirs and "safe_norm" in variant else "",
                         f"{r['step_ms']:.1f}"])
    print(f"\nloop of {args.length} steps, 2 normalised layers, n_power_iterations={args.n_power_iterations}, "
          "batch 32, fullgraph, one thread\n")
    rows = [r + [""] * (6 - len(r)) for r in rows]
    print(table(["variant", "", "compile s", "x no SN", "x upstream", "step ms"], rows))


if __name__ == "__main__":
    main()
