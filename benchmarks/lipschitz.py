"""Lipschitz residual networks: safe_norm's ``input_shape=`` / ``coeff=`` against the scheme
that invertible ResNets, Residual Flows and uncertainty models (DUE, DDU) copy into their
repositories (``spectral_norm_conv(module, coeff, input_dim, n_power_iterations=1)``): a
power iteration through the convolution and its transpose at a fixed input shape, one per
training step, random vectors at registration, soft normalisation ``W / max(1, sigma/coeff)``.
That scheme is re-implemented here (``IResNetConv``), on the same operator products.

Model: an i-ResNet-style network on 3x16x16 inputs: a 3->C 3x3 stem, B residual blocks
``x + g(x)`` with ``g = conv3x3 -> ELU -> conv3x3`` (C channels, zero padding 1), each conv
normalised with ``coeff=0.9`` at its input shape; a linear head.  Adam(lr 1e-3), MSE to a
random target, 64 samples a step.  The stem and head stay plain.

1. Error: at every training step, for every normalised conv, ``|sigma used / exact - 1|``
   (sigma used: ``uᵀ A v`` of the vectors that forward divided by, A the raw weight's
   operator; exact: the operator norm by float64 Lanczos to 1e-10, ``safe_norm``'s
   ``operator_norm`` machinery).  Worst and median.
2. Cost: ms per training step (one thread), median over R interleaved rounds of K steps, and
   the ratio to the i-ResNet scheme's (median of per-round ratios).
   Target (issue): safe_norm with ``track_tol`` <= 1e-4 at every step, <= 1.5x its step time.

Run:  python benchmarks/lipschitz.py [--steps 30] [--rounds 5] [--k 5] [--channels 32] [--blocks 2]

3. ``--sweep SEEDS [--steps 100] [--tols 1e-3,1e-4]``: instead, the accuracy of ``track_tol``
   with ``input_shape`` over seeds, both APIs, as is and with every weight multiplied by
   ``1 + 1e-7 N(0, 1)`` before each step (another machine's rounding), against the dense
   operator's norm: forwards above the tolerance and the worst error / tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import safe_norm
import safe_norm.parametrizations
from safe_norm._operator import ConvMap, conv_map, measure

SHAPE = (3, 16, 16)
COEFF = 0.9


class IResNetConv:
    """The copied scheme as a forward pre-hook: ``u``, ``v`` random until trained, one power
    iteration per training forward through the conv and its transpose, ``W / max(1, σ/coeff)``."""

    def __init__(self, module: nn.Conv2d, coeff: float, input_shape: tuple[int, ...]) -> None:
        self.coeff = coeff
        self.op: ConvMap = conv_map(module, input_shape)
        weight = module.weight
        del module._parameters["weight"]
        module.register_parameter("weight_orig", weight)
        with torch.no_grad():
            module.register_buffer("weight_u", F.normalize(torch.randn(self.op.shape[0]), dim=0))
            module.register_buffer("weight_v", F.normalize(torch.randn(self.op.shape[1]), dim=0))
        module.register_forward_pre_hook(self)
        self(module, ())

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        W, u, v = module.weight_orig, module.weight_u, module.weight_v
        if module.training:
            with torch.no_grad():
                v.copy_(F.normalize(self.op.adjoint(W, u), dim=0, eps=1e-12))
                u.copy_(F.normalize(self.op.apply(W, v), dim=0, eps=1e-12))
        sigma = torch.dot(u.clone(), self.op.apply(W, v.clone()))
        module.weight = W / torch.clamp(sigma / self.coeff, min=1)


def iresnet(module: nn.Conv2d, shape: tuple[int, ...]) -> nn.Conv2d:
    IResNetConv(module, COEFF, shape)
    return module


SCHEMES: dict[str, Callable[[nn.Conv2d, tuple[int, ...]], nn.Module]] = {
    "no normalisation": lambda m, shape: m,
    "i-ResNet copy, 1 power iteration": iresnet,
    "safe_norm input_shape, coeff": lambda m, shape: safe_norm.spectral_norm(m, coeff=COEFF, input_shape=shape),
    "safe_norm input_shape, coeff, track_tol=1e-4": lambda m, shape: safe_norm.spectral_norm(
        m, coeff=COEFF, input_shape=shape, track_tol=1e-4),
}
BASELINE = "i-ResNet copy, 1 power iteration"


class Block(nn.Module):
    def __init__(self, channels: int, sn: Callable[[nn.Conv2d, tuple[int, ...]], nn.Module]) -> None:
        super().__init__()
        shape = (channels, *SHAPE[1:])
        self.a = sn(nn.Conv2d(channels, channels, 3, padding=1), shape)
        self.b = sn(nn.Conv2d(channels, channels, 3, padding=1), shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(F.elu(self.a(x)))


def network(scheme: str, channels: int, blocks: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    sn = SCHEMES[scheme]
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1),
                         *[Block(channels, sn) for _ in range(blocks)],
                         nn.Flatten(), nn.Linear(channels * SHAPE[1] * SHAPE[2], 1))


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for b in net if isinstance(b, Block) for m in (b.a, b.b)]


def _state(m: nn.Module) -> tuple[Tensor, Tensor, Tensor, ConvMap]:
    if hasattr(m, "weight_orig"):
        hook = next(h for h in m._forward_pre_hooks.values() if hasattr(h, "op"))
        return m.weight_orig.detach(), m.weight_u, m.weight_v, hook.op
    raise TypeError("not normalised")


def _step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    loss = F.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def errors(scheme: str, channels: int, blocks: int, steps: int) -> list[float]:
    net = network(scheme, channels, blocks).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    found = []
    for _ in range(steps):
        x, y = torch.randn(64, *SHAPE, generator=gen), torch.randn(64, 1, generator=gen)
        weights = [_state(m)[0].clone() for m in _convs(net)]
        _step(net, opt, x, y)  # the forward divided by uᵀAv of the vectors it left
        for m, W in zip(_convs(net), weights):
            _, u, v, op = _state(m)
            used = torch.dot(u.double(), op.apply(W.double(), v.double())).item()
            exact = measure(m, W, op.in_shape, 1e-10, 500).estimate
            found.append(abs(used / exact - 1))
    return found


def cost(schemes: list[str], channels: int, blocks: int, rounds: int, k: int) -> dict[str, list[float]]:
    nets = {s: network(s, channels, blocks).train() for s in schemes}
    opts = {s: torch.optim.Adam(n.parameters(), lr=1e-3) for s, n in nets.items()}
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(64, *SHAPE, generator=gen), torch.randn(64, 1, generator=gen)) for _ in range(k)]
    for s in schemes:  # past the first steps (a tracked layer's first ones build its kept vectors)
        for _ in range(2):
            for x, y in data:
                _step(nets[s], opts[s], x, y)
    times: dict[str, list[float]] = {s: [] for s in schemes}
    for _ in range(rounds):
        for s in schemes:
            start = time.perf_counter()
            for x, y in data:
                _step(nets[s], opts[s], x, y)
            times[s].append((time.perf_counter() - start) / k * 1e3)
    return times


def _dense_norm(op: ConvMap, W: Tensor) -> float:
    return torch.linalg.matrix_norm(_power_map(op, W.double()).dense(), 2).item()


def _power_map(op: ConvMap, W: Tensor):  # noqa: ANN202 - safe_norm._power.Map
    from safe_norm._power import Map  # noqa: PLC0415

    return Map(op, W)


def sweep_run(api: str, tol: float, seed: int, steps: int, perturb: float) -> list[float]:
    """``|sigma used / exact - 1|`` at every training forward of a two-conv network tracked with
    ``input_shape`` (two 3x3 convs 4->8->8 at 8x8, both 256->512 maps or larger, so both take
    the block-Krylov path), Adam(2e-4, (0, 0.9)), hinge loss on random data; exact: the dense
    operator's float64 norm.  ``perturb``: weights times ``1 + perturb * N(0, 1)`` before each step."""
    sn = safe_norm.spectral_norm if api == "hook" else safe_norm.parametrizations.spectral_norm
    torch.manual_seed(seed)
    net = nn.Sequential(sn(nn.Conv2d(4, 8, 3, padding=1), input_shape=(4, 8, 8), track_tol=tol), nn.LeakyReLU(0.1),
                        sn(nn.Conv2d(8, 8, 3, padding=1), input_shape=(8, 8, 8), track_tol=tol), nn.LeakyReLU(0.1),
                        nn.Flatten(), nn.Linear(8 * 64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
    gen, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)
    layers = [(net[0], (4, 8, 8)), (net[2], (8, 8, 8))]

    def state(m: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        if api == "hook":
            return m.weight_orig.detach(), m.weight_u, m.weight_v
        p = m.parametrizations.weight
        return p.original.detach(), p[0]._u, p[0]._v

    found = []
    for _ in range(steps):
        if perturb:
            with torch.no_grad():
                for m, _ in layers:
                    W = state(m)[0]
                    W.mul_(1 + perturb * torch.randn(W.shape, generator=noise))
        x = torch.cat([torch.randn(16, 4, 8, 8, generator=gen) + 1, torch.randn(16, 4, 8, 8, generator=gen)])
        weights = [state(m)[0].clone() for m, _ in layers]
        out = net(x)
        for (m, shape), W in zip(layers, weights):
            _, u, v = state(m)
            op = conv_map(m, shape, W)
            used = torch.dot(u.double(), op.apply(W.double(), v.double())).item()
            found.append(abs(used / _dense_norm(op, W) - 1))
        loss = torch.relu(1 - out[:16]).mean() + torch.relu(1 + out[16:]).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    return found


def sweep(seeds: int, steps: int, tols: list[float]) -> None:
    print(f"input_shape tracking sweep: {seeds} seeds x {steps} steps, two 3x3 convs at 8x8\n")
    print("| API | track_tol | rounding | forwards | above tol | worst err/tol |")
    print("|---|---|---|---|---|---|")
    for api in ("hook", "parametrization"):
        for tol in tols:
            for perturb in (0.0, 1e-7):
                errors = [e for seed in range(seeds) for e in sweep_run(api, tol, seed, steps, perturb)]
                print(f"| {api} | {tol:g} | {'perturbed' if perturb else 'as is'} | {len(errors)} "
                      f"| {sum(e > tol for e in errors)} | {max(errors) / tol:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--sweep", type=int, default=0, metavar="SEEDS",
                        help="instead: the tracking sweep over this many seeds (--steps steps each)")
    parser.add_argument("--tols", default="1e-3,1e-4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sweep:
        sweep(args.sweep, args.steps, [float(t) for t in args.tols.split(",")])
        return
    print(f"torch {torch.__version__}, 1 thread; {args.blocks} residual blocks of {args.channels} channels "
          f"at 16x16 ({2 * args.blocks} normalised convs, operator {args.channels * 256}x{args.channels * 256}); "
          f"{args.steps} steps for the errors, {args.rounds} rounds x {args.k} steps for the cost\n")
    schemes = list(SCHEMES)
    times = cost(schemes, args.channels, args.blocks, args.rounds, args.k)
    print("| scheme | worst error | median error | ms / step | x i-ResNet copy |")
    print("|---|---|---|---|---|")
    for s in schemes:
        e = errors(s, args.channels, args.blocks, args.steps) if s != "no normalisation" else []
        ratio = statistics.median(a / b for a, b in zip(times[s], times[BASELINE]))
        worst = f"{max(e):.1e}" if e else "-"
        median = f"{statistics.median(e):.1e}" if e else "-"
        print(f"| {s} | {worst} | {median} | {statistics.median(times[s]):.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
