"""How far a spectral-normed convolution is from 1-Lipschitz during training.

Every spectral norm (torch's, ours, BigGAN's) divides a convolution by the largest singular
value of its weight reshaped to a matrix.  The layer's Lipschitz constant is the norm of the
convolution as a map on its inputs, which this script measures with
``safe_norm.operator_norm`` (a float64 Lanczos estimate, and a certified upper bound) for each
conv layer of a small discriminator trained with Adam (lr 2e-4, betas (0, 0.9)), hinge loss on
random data, safe_norm's default (reshaped) normalisation.  A layer normalised by the
reshaped sigma acts with ``operator / reshaped`` > 1.

Run from the repository root (about a minute on one CPU thread):
    python examples/operator_sigma.py [--steps 300] [--every 10] [--out examples/operator_sigma.png]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import safe_norm

SHAPE = (3, 16, 16)


def discriminator() -> tuple[nn.Sequential, dict[str, tuple[int, ...]]]:
    """A small CNN discriminator and the input shape of each conv layer."""
    net = nn.Sequential(
        safe_norm.spectral_norm(nn.Conv2d(3, 32, 3, 1, 1)), nn.LeakyReLU(0.1),
        safe_norm.spectral_norm(nn.Conv2d(32, 32, 3, 1, 1)), nn.LeakyReLU(0.1),
        safe_norm.spectral_norm(nn.Conv2d(32, 64, 4, 2, 1)), nn.LeakyReLU(0.1),
        nn.Flatten(), safe_norm.spectral_norm(nn.Linear(64 * 8 * 8, 1)),
    )
    shapes = {"conv 3->32 3x3": (3, 16, 16), "conv 32->32 3x3": (32, 16, 16), "conv 32->64 4x4/2": (32, 16, 16)}
    return net, shapes


def run(steps: int, every: int) -> tuple[list[int], dict[str, list[tuple[float, float]]]]:
    """Steps measured, and per conv layer (operator estimate, certified upper) / reshaped sigma."""
    torch.manual_seed(0)
    net, shapes = discriminator()
    convs = dict(zip(shapes, (net[0], net[2], net[4])))
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
    gen = torch.Generator().manual_seed(0)
    measured: list[int] = []
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
    for step in range(steps + 1):
        if step % every == 0:
            measured.append(step)
            for name, conv in convs.items():
                raw = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
                with torch.no_grad():
                    raw.weight.copy_(conv.weight_orig)
                norm = safe_norm.operator_norm(raw, shapes[name])
                ratios[name].append((norm.estimate / norm.reshaped, norm.upper / norm.reshaped))
        real = torch.randn(16, *SHAPE, generator=gen) + 1
        fake = torch.randn(16, *SHAPE, generator=gen)
        out = net(torch.cat([real, fake]))
        loss = torch.relu(1 - out[:16]).mean() + torch.relu(1 + out[16:]).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    return measured, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="examples/operator_sigma.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    measured, ratios = run(args.steps, args.every)
    print("| layer | at init | after %d steps | max |" % args.steps)
    print("|---|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {values[0][0]:.3f} | {values[-1][0]:.3f} | {max(v[0] for v in values):.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in ratios.items():
        line, = ax.plot(measured, [v[0] for v in values], label=name)
        ax.plot(measured, [v[1] for v in values], ls=":", color=line.get_color())
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("operator norm / reshaped sigma")
    ax.set_title("spectral-normed convs as maps (dotted: certified upper bound)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
