"""Input checks with clear messages.

Each error is raised where upstream would also fail, and its class derives from the exception
type upstream raises there (so existing ``except`` clauses keep working) and from the type that
names the mistake.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm as _UpstreamSpectralNorm

from ._krylov import WarmUp, max_abs

__all__ = [
    "NotATensorError",
    "WeightDtypeError",
    "DimError",
    "EmptyWeightError",
    "check_weight",
    "check_dtype",
    "check_finite",
    "check_not_empty",
    "check_options",
    "check_warmup_tol",
    "warn_if_short",
]


class NotATensorError(KeyError):
    """``name`` is not a parameter of the module (upstream: ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class WeightDtypeError(TypeError, NotImplementedError):
    """The weight is not floating point or complex (upstream: ``NotImplementedError``)."""


class DimError(IndexError, RuntimeError):
    """``dim`` does not index the weight (upstream: ``RuntimeError``/``IndexError``)."""


class EmptyWeightError(ValueError, RuntimeError):
    """The weight has no entries (upstream: ``RuntimeError`` for some shapes, accepts others)."""


def _where(module: nn.Module, name: str) -> str:
    return f"{type(module).__name__}.{name}"


def check_weight(module: nn.Module, name: str, dim: int, n_power_iterations: int) -> None:
    """Raise a clear error for a weight that upstream's registration would fail on obscurely.

    The checks upstream makes itself (registered twice, ``n_power_iterations <= 0``, a ``None``
    or uninitialised parameter) are left to it, in its order and with its messages.
    """
    if any(
        isinstance(hook, _UpstreamSpectralNorm) and hook.name == name
        for hook in module._forward_pre_hooks.values()
    ) or n_power_iterations <= 0:
        return
    if name not in module._parameters:
        kind = "a buffer" if name in module._buffers else "not a parameter"
        raise NotATensorError(
            f"spectral_norm: {_where(module, name)} is {kind}; expected the name of a parameter "
            f"of {type(module).__name__}, one of {sorted(module._parameters)}"
        )
    weight = module._parameters[name]
    if weight is None or isinstance(weight, nn.parameter.UninitializedParameter):
        return
    check_dtype(module, name, weight)
    check_finite(module, name, weight)
    if weight.dim() == 0 or not 0 <= dim < weight.dim():
        raise DimError(
            f"spectral_norm: dim={dim} is out of range for {_where(module, name)} of shape "
            f"{tuple(weight.shape)}; expected 0 <= dim < {max(weight.dim(), 1)}"
            + (" (a 0-d weight cannot be normalised)" if weight.dim() == 0 else "")
        )
    check_not_empty(module, name, weight)


def check_not_empty(module: nn.Module, name: str, weight: Tensor) -> None:
    if weight.numel() == 0:
        raise EmptyWeightError(
            f"spectral_norm: {_where(module, name)} of shape {tuple(weight.shape)} has no "
            "entries; there is nothing to normalise"
        )


def check_dtype(module: nn.Module, name: str, weight: Tensor) -> None:
    if not (weight.is_floating_point() or weight.is_complex()):
        raise WeightDtypeError(
            f"spectral_norm: {_where(module, name)} has dtype {weight.dtype}; expected a "
            f"floating-point or complex tensor"
        )


def warn_if_short(result: WarmUp, tol: float, what: str) -> None:
    """Say so when a warm-up stopped at its step bound before reaching ``tol``."""
    if result.error_estimate > tol and result.steps > 0:
        warnings.warn(
            f"spectral_norm warm-up of {what} stopped after {result.steps} steps with an "
            f"estimated relative sigma error of {result.error_estimate:.1e} (asked: {tol:.0e})",
            stacklevel=3,
        )


def check_finite(module: nn.Module, name: str, weight: Tensor) -> None:
    # Once, at registration; the training step itself carries no check (see _power).  A meta
    # weight has no values yet: the warm-up waits for them.
    if not weight.is_meta and weight.numel() and not bool(torch.isfinite(max_abs(weight.detach()))):
        raise ValueError(
            f"spectral_norm: {_where(module, name)} contains NaN or infinite values; "
            "a spectral norm of it would be meaningless (initialise it first)"
        )


def check_options(module: nn.Module, name: str, n_power_iterations: object, eps: object) -> None:
    """Arguments upstream takes without complaint and then fails on, or silently misuses."""
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, numbers.Integral):
        # upstream: TypeError at the first training forward, from range()
        raise TypeError(
            f"spectral_norm of {_where(module, name)}: n_power_iterations must be an int, "
            f"got {n_power_iterations!r}"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and float(eps) > 0):
        raise ValueError(
            f"spectral_norm of {_where(module, name)}: eps must be a finite number > 0, got {eps!r}"
        )


def check_warmup_tol(tol: float | None, name: str = "warmup_tol") -> None:
    if tol is None:
        return
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"spectral_norm: {name} must be in (0, 1) or None, got {tol!r}")


def check_coeff(coeff: float | None) -> None:
    if coeff is None:
        return
    if isinstance(coeff, bool) or not (isinstance(coeff, numbers.Real) and math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"spectral_norm: coeff must be a positive finite number or None, got {coeff!r}")
