"""PyTorch issue #51800, side by side: a spectral-normed network put in eval() right away.

Upstream's hook API (``torch.nn.utils.spectral_norm``) leaves ``u`` and ``v`` as random draws
until the first *training* forward, so an eval forward before it divides every weight by a
meaningless sigma.  Upstream's parametrization API warms up with 15 fixed power iterations and
is still a few percent off.  safe_norm converges ``u`` and ``v`` at registration, in both APIs.
All four models are built from the same seed, so they hold the same weights; only the sigma each
one divides by differs.

Then the first training steps: the error of the sigma each training forward divides by, with
two more models: upstream's hook API with 20 power iterations per step, and safe_norm with the
opt-in ``track_tol=1e-4`` (sigma kept within it at every training forward).
``--plot PATH`` draws both (needs matplotlib: ``pip install "safe_norm[plot]"``).

Run:  python -m safe_norm demo [--plot sigma_error.png]   (or: python examples/bug_repro.py)
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations
from safe_norm._inspect import layers

APIS = {
    "upstream hook": upstream_hook,
    "upstream param.": parametrizations.spectral_norm,
    "safe_norm hook": safe_norm.spectral_norm,
    "safe_norm param.": safe_norm.parametrizations.spectral_norm,
}
# The training part adds more power iterations, and safe_norm's opt-in tracking.
TRAINING = {
    **APIS,
    "upstream, 20 it.": partial(upstream_hook, n_power_iterations=20),
    "safe_norm tracked": partial(safe_norm.spectral_norm, track_tol=1e-4),
}


def build(sn) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Linear(64, 256)),
        nn.LeakyReLU(0.2),
        sn(nn.Linear(256, 256)),
        nn.LeakyReLU(0.2),
        sn(nn.Linear(256, 1)),
    )


def weight(layer: nn.Module) -> torch.Tensor:
    """The weight before normalisation, for either API."""
    return next(layers(layer)).weight().detach()


def exact_forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The network with each weight divided by its exact spectral norm, in float64."""
    h = x.double()
    for m in net:
        if isinstance(m, nn.Linear):
            W = weight(m).double()
            h = F.linear(h, W / torch.linalg.matrix_norm(W, 2), m.bias.detach().double())
        else:
            h = m(h)
    return h


def training_errors(steps: int) -> dict[str, list[float]]:
    """Per model: the largest relative sigma error over its layers, at an eval forward before
    training (entry 0) and at each of ``steps`` training forwards (Adam, betas (0, 0.9), as in
    GAN training, on a hinge loss of random data; all models see the same data)."""
    errors: dict[str, list[float]] = {}
    for name, sn in TRAINING.items():
        net = build(sn)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            net.eval()(torch.randn(8, 64, generator=gen))
        errors[name] = [_worst(net)]
        net.train()
        for _ in range(steps):
            real, fake = torch.randn(32, 64, generator=gen) + 1, torch.randn(32, 64, generator=gen)
            out = net(torch.cat([real, fake]))
            errors[name].append(_worst(net))  # what this forward divided by
            loss = F.relu(1 - out[:32]).mean() + F.relu(1 + out[32:]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return errors


def _worst(net: nn.Module) -> float:
    return max(abs(row.error) for row in safe_norm.audit(net))


def plot(errors: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, values), style in zip(errors.items(), ["o-", "s-", "^--", "v--", "x:", "D-"]):
        ax.plot(range(len(values)), [max(e, 1e-9) for e in values], style, ms=4, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step (0: eval() right after construction; then training forwards)")
    ax.set_ylabel("largest relative sigma error")
    ax.set_title("sigma each forward divides by vs exact (3-layer MLP, Adam)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safe_norm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PATH", help="save a plot of the sigma errors (PNG, SVG, PDF)")
    parser.add_argument("--steps", type=int, default=20, help="training steps to follow (default 20)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('safe_norm demo: error: --plot needs matplotlib: pip install "safe_norm[plot]"', file=sys.stderr)
            return 2
    _tables()
    errors = training_errors(args.steps)
    print("\nlargest relative sigma error over the layers, eval() before training, then training forwards:\n")
    shown = sorted({s for s in (1, 2, 3, 5, 10, args.steps) if s <= args.steps})
    print(f"{'model':>18}{'eval':>10}" + "".join(f"{f'step {s}':>10}" for s in shown))
    for name, values in errors.items():
        print(f"{name:>18}{values[0]:>10.1e}" + "".join(f"{values[s]:>10.1e}" for s in shown))
    if args.plot:
        plot(errors, args.plot)
        print(f"\nplot saved to {args.plot}")
    return 0


def _tables() -> None:
    nets = {name: build(sn) for name, sn in APIS.items()}
    print("relative error of the sigma each layer divides by in eval(), right after construction:\n")
    print(f"{'layer':>5} {'exact sigma':>12}" + "".join(f"{name:>18}" for name in nets))
    linear = [i for i, m in enumerate(nets["upstream hook"]) if isinstance(m, nn.Linear)]
    for i in linear:
        W = weight(nets["upstream hook"][i]).double()
        exact = torch.linalg.matrix_norm(W, 2).item()
        row = f"{i:>5} {exact:>12.6f}"
        for net in nets.values():
            used = safe_norm.sigma(net[i]).item()
            row += f"{(used - exact) / exact:>+18.2e}"
        print(row)

    print("\nrelative error of the whole network's eval output on 512 inputs (exact: float64 SVD):\n")
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = exact_forward(nets["upstream hook"], x)
        for name, net in nets.items():
            out = net.eval()(x).double()
            print(f"  {name:>16}: {((out - ref).norm() / ref.norm()).item():.2e}")


if __name__ == "__main__":
    sys.exit(main())
