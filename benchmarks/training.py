"""Training-mode forward+backward of the normalisation alone: upstream vs safe_norm, both APIs.

For each weight size, the time of ``W_sn = SN(W)`` (one power iteration, as in training) plus
the backward of ``W_sn`` with a fixed upstream gradient, as medians from torch.utils.benchmark,
and the ratio safe_norm / upstream for each API.  The last row is the same for the 8 weights of
the SNGAN CIFAR-10 discriminator (benchmarks/tracking.py), one after the other: a training
step's normalisation work in a model of small layers (64x27 ... 512x2304, and 1x8192).

Run:  python benchmarks/training.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb
from torch import nn

from _common import APIS, PAIRS, machine, normalised_weight, table
from tracking import sngan_d

SIZES = [(256, 20), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="skip the 2048 and 4096 layers")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine(device))
    print("training forward+backward of the normalisation alone, median ms\n")
    rows = []
    cases = [(f"{o}x{i}", lambda sn, o=o, i=i: [sn(nn.Linear(i, o, bias=False))])
             for o, i in (SIZES[:3] if args.quick else SIZES)]
    cases.append(("SNGAN D (8)", lambda sn: [m for m in sngan_d(sn)[0] if hasattr(m, "weight")]))
    for label, build in cases:
        times = {}
        for name, sn in APIS.items():
            torch.manual_seed(0)
            layers = [m.to(device).train() for m in build(sn)]
            grads = [torch.randn(normalised_weight(m).shape, device=device) for m in layers]
            step(layers, grads)  # warm: first-call costs, and any re-convergence
            timer = tb.Timer("step(layers, grads)", globals={"step": step, "layers": layers, "grads": grads})
            times[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
        rows.append(
            [label]
            + [f"{times[n] * 1e3:.3f}" for n in APIS]
            + [f"{times[ours] / times[theirs]:.2f}" for ours, theirs in PAIRS]
        )
    print(table(["weight"] + list(APIS) + ["ratio hook", "ratio param."], rows))
    print("\nratio = safe_norm / upstream, same API, same run (lower is faster).")


def step(layers: list[nn.Module], grads: list[torch.Tensor]) -> None:
    for m, grad in zip(layers, grads):
        normalised_weight(m).backward(grad)


if __name__ == "__main__":
    main()
