"""Training-mode forward+backward of the normalisation alone: upstream vs safe_norm, both APIs.

For each weight size, the time of ``W_sn = SN(W)`` (one power iteration, as in training) plus
the backward of ``W_sn`` with a fixed upstream gradient, as medians from torch.utils.benchmark,
and the ratio safe_norm / upstream for each API.

Run:  python benchmarks/training.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb
from torch import nn

from _common import APIS, PAIRS, machine, normalised_weight, table

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
    for out_f, in_f in SIZES[:3] if args.quick else SIZES:
        times = {}
        for name, sn in APIS.items():
            torch.manual_seed(0)
            m = sn(nn.Linear(in_f, out_f, bias=False)).to(device).train()
            grad = torch.randn(out_f, in_f, device=device)
            normalised_weight(m).backward(grad)  # warm: first-call costs, and any re-convergence
            timer = tb.Timer(
                "normalised_weight(m).backward(grad)",
                globals={"normalised_weight": normalised_weight, "m": m, "grad": grad},
            )
            times[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
        rows.append(
            [f"{out_f}x{in_f}"]
            + [f"{times[n] * 1e3:.3f}" for n in APIS]
            + [f"{times[ours] / times[theirs]:.2f}" for ours, theirs in PAIRS]
        )
    print(table(["weight"] + list(APIS) + ["ratio hook", "ratio param."], rows))
    print("\nratio = safe_norm / upstream, same API, same run (lower is faster).")


if __name__ == "__main__":
    main()
