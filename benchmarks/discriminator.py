"""A DCGAN-style discriminator (batch 64, 3x32x32): training step and eval forward, without
spectral norm, with upstream's and with safe_norm's (both APIs), from one run.

Prints median times (torch.utils.benchmark), the SN overhead over the plain network in %, and
the ratio of safe_norm's overhead to upstream's for each API.

Run:  python benchmarks/discriminator.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.utils.benchmark as tb
from torch import nn

from _common import APIS, PAIRS, machine, table


def discriminator(sn=lambda m: m) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Conv2d(3, 64, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(64, 128, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(128, 256, 4, 2, 1)), nn.LeakyReLU(0.2),
        nn.Flatten(), sn(nn.Linear(256 * 4 * 4, 1)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--number", type=int, default=3, help="calls per variant per round")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine(device))
    x = torch.randn(64, 3, 32, 32, device=device)
    variants = {"no SN": discriminator(), **{name: discriminator(sn) for name, sn in APIS.items()}}
    # Rounds interleave the variants, so that the shared machine's drifts hit all alike; the
    # overhead is taken per round against the plain network of the same round, then the median.
    timers = {"step": {}, "eval": {}}
    for name, net in variants.items():
        net.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))

        def train_step(net=net, opt=opt):
            net.train()
            opt.zero_grad(set_to_none=True)
            net(x).mean().backward()
            opt.step()

        def eval_forward(net=net):
            net.eval()
            with torch.no_grad():
                net(x)

        train_step(), eval_forward()  # warm: first-call costs, caches
        timers["step"][name] = tb.Timer("f()", globals={"f": train_step})
        timers["eval"][name] = tb.Timer("f()", globals={"f": eval_forward})
    samples = {kind: {name: [] for name in variants} for kind in timers}
    for _ in range(args.rounds):
        for kind, by_name in timers.items():
            for name, timer in by_name.items():
                samples[kind][name].append(timer.timeit(args.number).median)
    step = {name: statistics.median(t) for name, t in samples["step"].items()}
    evaluation = {name: statistics.median(t) for name, t in samples["eval"].items()}

    def overhead(kind, name):
        per_round = [t / p - 1 for t, p in zip(samples[kind][name], samples[kind]["no SN"])]
        return 100 * statistics.median(per_round)

    for kind, title, times in (
        ("step", "training step (forward, backward, Adam step)", step),
        ("eval", "eval forward (no_grad)", evaluation),
    ):
        print(f"\n{title}, median ms, and SN overhead over the plain network\n")
        rows = [
            [name, f"{times[name] * 1e3:.2f}", "" if name == "no SN" else f"{overhead(kind, name):+.1f} %"]
            for name in variants
        ]
        print(table(["variant", "median ms", "SN overhead"], rows))
        for ours, theirs in PAIRS:
            a, b = overhead(kind, ours), overhead(kind, theirs)
            print(f"  {ours} overhead / {theirs} overhead: " + (f"{a / b:.2f}" if b > 0 else "n/a (upstream's <= 0)"))
    print(f"\n{args.rounds} interleaved rounds of {args.number} calls per variant; overhead = median over")
    print("rounds of (variant / plain network in the same round) - 1.")


if __name__ == "__main__":
    main()
