"""PyTorch issue #51800, side by side: a spectral-normed network put in eval() right away.

Upstream's hook API leaves ``u`` and ``v`` as random draws until the first *training* forward,
so an eval forward before it divides every weight by a meaningless sigma.  safe_norm warms
``u`` and ``v`` up at registration.  Both models are built from the same seed, so they hold the
same weights; only the sigma each one divides by differs.

Run:  python examples/bug_repro.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm as upstream_spectral_norm

from safe_norm import spectral_norm as safe_spectral_norm


def build(sn) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Linear(64, 256)),
        nn.LeakyReLU(0.2),
        sn(nn.Linear(256, 256)),
        nn.LeakyReLU(0.2),
        sn(nn.Linear(256, 1)),
    )


def exact_forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The network with each weight divided by its exact spectral norm, in float64."""
    h = x.double()
    for m in net:
        if isinstance(m, nn.Linear):
            W = m.weight_orig.detach().double()
            h = F.linear(h, W / torch.linalg.matrix_norm(W, 2), m.bias.detach().double())
        else:
            h = m(h)
    return h


def main() -> None:
    nets = {"upstream": build(upstream_spectral_norm), "safe_norm": build(safe_spectral_norm)}
    header = f"{'layer':>5} {'exact sigma':>12} | " + " | ".join(
        f"{name + ' sigma':>16} {'rel. error':>11}" for name in nets
    )
    print("eval() right after construction, no training forward:\n")
    print(header)
    print("-" * len(header))
    layers = [i for i, m in enumerate(nets["upstream"]) if isinstance(m, nn.Linear)]
    for i in layers:
        W = nets["upstream"][i].weight_orig.detach().double()
        exact = torch.linalg.matrix_norm(W, 2).item()
        cells = []
        for net in nets.values():
            m = net[i]
            used = torch.dot(m.weight_u.double(), W @ m.weight_v.double()).item()
            cells.append(f"{used:>16.6f} {(used - exact) / exact:>+11.2e}")
        print(f"{i:>5} {exact:>12.6f} | " + " | ".join(cells))

    print("\noutput of the whole network on 512 inputs, against exact normalisation:\n")
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = exact_forward(nets["upstream"], x)
        for name, net in nets.items():
            out = net.eval()(x).double()
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"  {name:>9}: relative output error {err:.2e}")


if __name__ == "__main__":
    main()
