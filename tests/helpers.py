"""Shared test helpers: the layer zoo, exact references, the upstream twin."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import spectral_norm as upstream_spectral_norm

from safe_norm import _power

# name -> (factory, dim).  Default-initialised, as users build them.
ZOO = {
    "Linear20x256": (lambda: nn.Linear(256, 20), 0),
    "Linear256x20": (lambda: nn.Linear(20, 256), 0),
    "Linear512": (lambda: nn.Linear(512, 512), 0),
    "Linear1024x4096": (lambda: nn.Linear(4096, 1024), 0),
    "Conv1d": (lambda: nn.Conv1d(64, 128, 5), 0),
    "Conv2d": (lambda: nn.Conv2d(128, 256, 3), 0),
    "Conv2d_rgb": (lambda: nn.Conv2d(3, 64, 4), 0),
    "Conv3d": (lambda: nn.Conv3d(16, 32, 3), 0),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(256, 128, 4), 1),
    "Embedding": (lambda: nn.Embedding(1000, 128), 0),
}
BIG = {
    "Linear2048": (lambda: nn.Linear(2048, 2048), 0),
    "Linear4096": (lambda: nn.Linear(4096, 4096), 0),
}


def exact_sigma(weight: torch.Tensor, dim: int = 0) -> float:
    """The exact spectral norm of the reshaped weight, in float64."""
    W = _power.weight_to_matrix(weight.detach(), dim).double()
    return torch.linalg.matrix_norm(W, 2).item()


def used_sigma(module: nn.Module, name: str = "weight", dim: int = 0) -> float:
    """The sigma a hook-API eval forward divides by now: uᵀ W v from the module's state."""
    W = _power.weight_to_matrix(getattr(module, name + "_orig").detach(), dim)
    u, v = getattr(module, name + "_u"), getattr(module, name + "_v")
    return _power.sigma(W.double(), u.double(), v.double()).real.item()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def twin(module: nn.Module, ours, **kwargs):
    """(upstream-normalised copy, safe_norm-normalised copy) with identical u, v."""
    up = upstream_spectral_norm(copy.deepcopy(module), **kwargs)
    sn = ours(copy.deepcopy(module), **kwargs)
    with torch.no_grad():
        for key, value in up.state_dict().items():
            sn.state_dict()[key].copy_(value)
    return up, sn


def example_input(module: nn.Module) -> torch.Tensor:
    """A small valid input for a zoo layer."""
    if isinstance(module, nn.Embedding):
        return torch.arange(min(4, module.num_embeddings))
    if isinstance(module, nn.Linear):
        return torch.randn(3, module.in_features)
    spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose2d: 2}[type(module)]
    return torch.randn(1, module.in_channels, *([6] * spatial))
