"""Eval forward with safe_norm's cached normalised weight, and the EMA-generator pattern.

1. Eval forward (``model.eval()``, ``torch.no_grad()``) of an MLP 1024 -> 4096 -> 4096 -> 1,
   batch 64: the plain network and the four spectral norms of ``_common.APIS`` on all three
   Linear layers, each built from the same seed and warmed by one forward (safe_norm builds its
   cache of ``W / sigma`` there).  Timed with ``torch.utils.benchmark.Timer.blocked_autorange``
   in R interleaved rounds; reported: the median over rounds of each variant's median, and its
   ratio to the plain network (median over rounds of the ratio within the round; target:
   safe_norm <= 1.10x).  Also prints the memory safe_norm's
   eval cache holds (one normalised copy of each weight).

2. EMA copy of a never-trained DCGAN-style generator (latent 128, ngf 64, 3x32x32, spectral norm
   on every conv), once per API: ``G_ema = copy.deepcopy(G).eval()``, one warm eval forward, then
   per iteration: G perturbed in place (a stand-in for a training step; *not* timed), then timed
   together the EMA update ``p_ema.lerp_(p, 1 - 0.999)`` over ``parameters()`` and an eval
   forward of G_ema under no_grad on 16 latents.  Every iteration needs a fresh update, so this
   section uses a plain ``time.perf_counter`` loop (3 warm-up iterations, then the median of N,
   the four variants interleaved within each iteration) instead of torch.utils.benchmark.
   Reported: ms per (update + forward), the ratio safe_norm / upstream per API (median of the
   per-iteration ratios; target <= 1.5x), and, after the loop, the worst relative error
   over G_ema's layers of the sigma its next eval forward divides by against the exact largest
   singular value (``safe_norm.audit``, float64).

Both sections run with ``--threads`` intra-op threads (default: torch's default), also inside
the Timer (whose own default is 1).

Run:  python benchmarks/eval_and_ema.py [--device cuda] [--rounds 3] [--min-run-time 1.0] [--iters 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.utils.benchmark as tb
from torch import nn

import safe_norm
from _common import APIS, PAIRS, machine, table

LATENT = 128
NGF = 64


def mlp(sn=lambda m: m) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Linear(1024, 4096)), nn.ReLU(),
        sn(nn.Linear(4096, 4096)), nn.ReLU(),
        sn(nn.Linear(4096, 1)),
    )


def generator(sn) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.ConvTranspose2d(LATENT, NGF * 8, 4, 1, 0, bias=False)), nn.BatchNorm2d(NGF * 8), nn.ReLU(),  # 4x4
        sn(nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1, bias=False)), nn.BatchNorm2d(NGF * 4), nn.ReLU(),  # 8x8
        sn(nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False)), nn.BatchNorm2d(NGF * 2), nn.ReLU(),  # 16x16
        sn(nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False)), nn.BatchNorm2d(NGF), nn.ReLU(),  # 32x32
        sn(nn.Conv2d(NGF, 3, 3, 1, 1)), nn.Tanh(),
    )


def cache_bytes(model: nn.Module) -> int:
    """Bytes held by safe_norm's eval caches in ``model`` (normalised weight and its checks)."""
    from safe_norm import _inspect  # private: the benchmark reads what the cache holds

    total = 0
    for layer in _inspect.layers(model):
        cached = getattr(getattr(layer.fn, "_state", None), "cache", None)
        if cached is not None:
            total += sum(t.numel() * t.element_size() for t in cached if isinstance(t, torch.Tensor))
    return total


def eval_section(args, device: torch.device) -> None:
    x = torch.randn(64, 1024, device=device)
    variants = {"no SN": mlp(), **{name: mlp(sn) for name, sn in APIS.items()}}
    timers = {}
    for name, net in variants.items():
        net.to(device).eval()

        def forward(net=net):
            with torch.no_grad():
                net(x)

        forward()  # warm: first-call costs; safe_norm builds its cache here
        timers[name] = tb.Timer("f()", globals={"f": forward}, num_threads=args.threads)
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, so that the machine's drifts hit all alike
        for name, timer in timers.items():
            samples[name].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    print("\n1. eval forward (no_grad), MLP 1024-4096-4096-1, batch 64, SN on all three Linear layers\n")
    ratio = {name: statistics.median(t / p for t, p in zip(s, samples["no SN"])) for name, s in samples.items()}
    rows = [[name, f"{ms[name] * 1e3:.2f}", f"{ratio[name]:.2f}"] for name in variants]
    print(table(["variant", "ms", "x plain"], rows))
    print(f"\nms = median over {args.rounds} interleaved rounds of each round's blocked_autorange median")
    print(f"(min_run_time {args.min_run_time} s); x plain = median over rounds of (variant / plain network in")
    print("the same round); target for safe_norm <= 1.10.")
    weights = sum(m.weight.numel() * m.weight.element_size() for m in variants["no SN"] if isinstance(m, nn.Linear))
    held = {name: cache_bytes(variants[name]) for name in ("safe_norm hook", "safe_norm param.")}
    print(
        f"memory safe_norm keeps in eval: one normalised copy of each weight = {weights / 2**20:.1f} MiB "
        f"(cache measured: hook {held['safe_norm hook'] / 2**20:.1f} MiB, "
        f"param. {held['safe_norm param.'] / 2**20:.1f} MiB)"
    )


def ema_section(args, device: torch.device) -> None:
    z = torch.randn(16, LATENT, 1, 1, device=device, generator=torch.Generator(device).manual_seed(1))
    pairs, steps = {}, {}
    for name, sn in APIS.items():
        G = generator(sn).to(device)
        G_ema = copy.deepcopy(G).eval()
        with torch.no_grad():
            G_ema(z)  # warm
        pairs[name] = G, G_ema
        steps[name] = torch.Generator(device).manual_seed(2)  # the same perturbations for every variant

    @torch.no_grad()
    def perturb(G, gen):  # stand-in for a training step of G: not timed
        for p in G.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * 1e-3 * p.std())

    @torch.no_grad()
    def update_and_forward(G, G_ema):
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.data.lerp_(p.data, 1 - 0.999)
        G_ema(z)

    samples = {name: [] for name in APIS}
    for i in range(3 + args.iters):
        for name, (G, G_ema) in pairs.items():  # interleaved, as in section 1
            perturb(G, steps[name])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            update_and_forward(G, G_ema)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(s) for name, s in samples.items()}
    errors = {name: max(abs(row.error) for row in safe_norm.audit(G_ema)) for name, (_, G_ema) in pairs.items()}
    print(f"\n2. EMA generator (DCGAN-style, latent {LATENT}, ngf {NGF}, 3x32x32, SN on all 5 convs, never trained)")
    print("   one iteration = EMA update (lerp_, decay 0.999) + eval forward of G_ema (no_grad, 16 latents)\n")
    rows = [[name, f"{times[name] * 1e3:.2f}", f"{errors[name]:.1e}"] for name in APIS]
    print(table(["variant", "ms / iteration", "worst |sigma err|"], rows))
    for ours, theirs in PAIRS:
        ratio = statistics.median(a / b for a, b in zip(samples[ours], samples[theirs]))
        print(f"  {ours} / {theirs}: {ratio:.2f}  (target <= 1.5)")
    print(f"\nms = median of {args.iters} iterations (time.perf_counter, after 3 warm-up ones; variants interleaved")
    print("per iteration), G perturbed untimed before each; ratio = median over iterations of ours / upstream's")
    print("in the same iteration; sigma err = worst over G_ema's layers, after the loop, of (sigma the next")
    print("eval forward divides by - exact) / exact, exact in float64 (safe_norm.audit).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (section 1)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange (section 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (section 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine(device))
    eval_section(args, device)
    ema_section(args, device)


if __name__ == "__main__":
    main()
