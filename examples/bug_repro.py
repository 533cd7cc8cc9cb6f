"""PyTorch issue #51800, side by side: a spectral-normed network put in eval() right away.

Upstream's hook API (``torch.nn.utils.spectral_norm``) leaves ``u`` and ``v`` as random draws
until the first *training* forward, so an eval forward before it divides every weight by a
meaningless sigma.  Upstream's parametrization API warms up with 15 fixed power iterations and
is still a few percent off.  safe_norm converges ``u`` and ``v`` at registration, in both APIs.
All four models are built from the same seed, so they hold the same weights; only the sigma each
one divides by differs.

Run:  python examples/bug_repro.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations

APIS = {
    "upstream hook": upstream_hook,
    "upstream param.": parametrizations.spectral_norm,
    "safe_norm hook": safe_norm.spectral_norm,
    "safe_norm param.": safe_norm.parametrizations.spectral_norm,
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


def state(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight before normalisation, u, v), for either API."""
    if hasattr(layer, "parametrizations"):
        plist = layer.parametrizations.weight
        return plist.original.detach(), plist[0]._u, plist[0]._v
    return layer.weight_orig.detach(), layer.weight_u, layer.weight_v


def exact_forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The network with each weight divided by its exact spectral norm, in float64."""
    h = x.double()
    for m in net:
        if isinstance(m, nn.Linear):
            W = state(m)[0].double()
            h = F.linear(h, W / torch.linalg.matrix_norm(W, 2), m.bias.detach().double())
        else:
            h = m(h)
    return h


def main() -> None:
    nets = {name: build(sn) for name, sn in APIS.items()}
    print("relative error of the sigma each layer divides by in eval(), right after construction:\n")
    print(f"{'layer':>5} {'exact sigma':>12}" + "".join(f"{name:>18}" for name in nets))
    layers = [i for i, m in enumerate(nets["upstream hook"]) if isinstance(m, nn.Linear)]
    for i in layers:
        W = state(nets["upstream hook"][i])[0].double()
        exact = torch.linalg.matrix_norm(W, 2).item()
        row = f"{i:>5} {exact:>12.6f}"
        for net in nets.values():
            _, u, v = state(net[i])
            used = torch.dot(u.double(), W @ v.double()).item()
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
    main()
