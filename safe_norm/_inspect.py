"""Reading spectral norms from a model: the sigma a layer divides by (any library, either API)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _UpstreamParametrization
from torch.nn.utils.spectral_norm import SpectralNorm as _UpstreamHook

from . import _power

__all__ = ["sigma"]


@torch.no_grad()
def sigma(module: nn.Module, name: str = "weight") -> Tensor:
    """The sigma that ``module.<name>``'s next eval forward divides by: ``uᴴ W v`` from the
    layer's current state, as a detached 0-d tensor on the weight's device.

    Works on safe_norm's and upstream's spectral norms, hook or parametrization API alike; one
    mat-vec, no host synchronisation, so it is cheap enough to log every step (neither upstream
    API exposes it).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> m = safe_norm.spectral_norm(nn.Linear(20, 40))
        >>> exact = torch.linalg.matrix_norm(m.weight_orig.detach().double(), 2)
        >>> bool(abs(safe_norm.sigma(m) / exact - 1) < 1e-4)
        True
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _UpstreamHook) and hook.name == name:
            W = hook.reshape_weight_to_matrix(getattr(module, name + "_orig"))
            return _power.sigma(W, getattr(module, name + "_u"), getattr(module, name + "_v")).real
    if parametrize.is_parametrized(module, name):
        plist = cast(parametrize.ParametrizationList, module.parametrizations[name])  # type: ignore[index]
        x = cast(Tensor, plist.original)
        for p in plist:
            if isinstance(p, _UpstreamParametrization) and x.ndim > 1:
                W = p._reshape_weight_to_matrix(x)
                return _power.sigma(W, p._u, p._v).real
            x = p(x)
    raise ValueError(f"no spectral norm on {type(module).__name__}.{name}")
