"""Reading spectral norms from a model, any library and either API: :func:`sigma`, :func:`audit`.

Both work on safe_norm's layers and on upstream's (``torch.nn.utils.spectral_norm`` and
``torch.nn.utils.parametrizations.spectral_norm``), in any mix, without changing their state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _UpstreamParametrization
from torch.nn.utils.spectral_norm import SpectralNorm as _UpstreamHook

from . import _compat, _core, _power
from ._spectral_norm import SpectralNorm
from .parametrizations import _SpectralNorm

__all__ = ["sigma", "audit", "Audit", "AuditRow"]

# |cos| between u and W v (hook API) above which u counts as the result of a power step.  A
# training forward leaves |cos| = 1 and an optimizer step moves it by ~1e-5; a random u has
# |cos| ~ 1/sqrt(len(u)).  See looks_untrained.
_ALIGNED = 0.99


@dataclass(frozen=True)
class Layer:
    """One spectral-normed tensor found in a model."""

    path: str  # the module's path in the model ("" for the model itself)
    module: nn.Module
    name: str
    api: str  # "hook" or "parametrization"
    fn: Any  # the hook object, or the parametrization module
    index: int = 0  # position in the parametrization list

    @property
    def library(self) -> str:
        """``"safe_norm"``, ``"upstream"``, or ``"other"``: a subclass of upstream's from another
        library (the ``SpectralNormConv`` that uncertainty models copy, whose vectors are
        shaped for a convolution's input and output), whose forward is its own."""
        if isinstance(self.fn, SpectralNorm if self.api == "hook" else _SpectralNorm):
            return "safe_norm"
        return "upstream" if type(self.fn) in (_UpstreamHook, _UpstreamParametrization) else "other"

    @property
    def where(self) -> str:
        return f"{self.path}.{self.name}" if self.path else self.name

    def weight(self) -> Tensor:
        """The tensor the layer divides by its sigma (whole: gathered from every rank where
        FSDP2 has sharded it)."""
        if self.api == "hook":
            return _compat.gathered(cast(Tensor, getattr(self.module, self.name + "_orig")))
        plist = cast(parametrize.ParametrizationList, self.module.parametrizations[self.name])  # type: ignore[index,union-attr]
        x = _compat.gathered(cast(Tensor, plist.original))
        for p in list(plist)[: self.index]:
            x = p(x)
        return x

    def vectors(self) -> tuple[Tensor, Tensor]:
        if self.api == "hook":
            return getattr(self.module, self.name + "_u"), getattr(self.module, self.name + "_v")
        return self.fn._u, self.fn._v


def layers(model: nn.Module) -> Iterator[Layer]:
    """Every spectral-normed tensor in ``model`` (lazy registrations not yet completed aside)."""
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _UpstreamHook):
                yield Layer(path, module, hook.name, "hook", hook)
        if parametrize.is_parametrized(module):
            for name, plist in cast(nn.ModuleDict, module.parametrizations).items():
                for i, p in enumerate(cast(parametrize.ParametrizationList, plist)):
                    # a 1-D tensor is normalised exactly, with no u, v and no sigma estimate
                    if isinstance(p, _UpstreamParametrization) and hasattr(p, "_u"):
                        yield Layer(path, module, name, "parametrization", p, i)


def _matrix(layer: Layer) -> Tensor | _power.Map:
    """What the layer's sigma is the norm of: its reshaped weight, or (``input_shape``) the
    operator with its weight."""
    op = getattr(layer.fn, "op", None)
    if op is not None:
        return _power.Map(op, layer.weight().detach())
    return _power.weight_to_matrix(layer.weight().detach(), layer.fn.dim)


def _readable(layer: Layer) -> bool:
    """Whether ``uᴴ W v`` means something for the layer: not for another library's subclass
    whose vectors do not fit the reshaped weight."""
    if layer.library != "other":
        return True
    u, v = layer.vectors()
    return tuple(_matrix(layer).shape) == (u.numel(), v.numel())


def next_sigma(layer: Layer) -> Tensor:
    """What the layer's next eval forward divides by, as a detached 0-d tensor (NaN for
    another library's layer whose vectors do not fit its reshaped weight)."""
    u, v = layer.vectors()
    if not _readable(layer):
        return torch.tensor(math.nan, dtype=u.dtype)
    if layer.api == "hook" and layer.library != "safe_norm":
        with torch.no_grad():  # upstream's hook omits the conjugate (MIGRATION H2)
            return torch.dot(u, _matrix(layer).mv(v))
    view = _core.View(layer.weight(), u, v, layer.fn.dim, layer.fn.eps, 1, u_first=layer.api != "hook",
                      coeff=getattr(layer.fn, "coeff", None), op=getattr(layer.fn, "op", None))
    return _core.next_sigma(getattr(layer.fn, "_state", None), view).real


def warms(layer: Layer) -> bool:
    """A safe_norm layer that converges its vectors (not built with ``warmup_tol=None``)."""
    state = getattr(layer.fn, "_state", None)
    return state is not None and state.tol is not None


def cosine(a: Tensor, M: Tensor | _power.Map, b: Tensor) -> float | None:
    """``|cos|`` between ``a`` and ``M b``; ``None`` when ``M b`` has no direction (zero or
    not finite).  A power step leaves ``u`` along ``W v`` and ``v`` along ``Wᴴ u``."""
    image = M.to(a.dtype).mv(b)
    norm = torch.linalg.vector_norm(image)
    if not bool(torch.isfinite(norm)) or norm == 0:
        return None
    return (torch.vdot(a, image).abs() / (norm * torch.linalg.vector_norm(a))).item()


def looks_untrained(W: Tensor | _power.Map, u: Tensor, v: Tensor) -> bool:
    """Whether hook-API vectors look like the random draws of registration, not a power step.

    After any training forward ``u = normalize(W v)``; a random ``u`` is almost never aligned
    with ``W v`` (chance ``1 - 0.99`` for ``len(u) = 3``, 9 % for 2).  With one row, ``u`` is
    ±1 and always aligned, so ``v`` is tested against ``Wᴴ u`` instead (one step aligns it).
    """
    cos = cosine(u, W, v) if u.numel() > 1 else cosine(v, W.mH, u)
    return cos is not None and cos < _ALIGNED  # no direction to compare with: nothing to tell


def untrained(layer: Layer) -> bool | None:
    """Whether the layer's ``u``, ``v`` never saw a training forward and were never converged
    (hook API: upstream's random draws, decided from the vectors).  For upstream's
    parametrization API the vectors cannot tell: its 15 warm-up steps align them as training
    does, so the answer is ``None``.  safe_norm's layers converge at registration, so they are
    never untrained unless built with ``warmup_tol=None``."""
    if warms(layer):
        return False
    if layer.api == "hook" and _readable(layer):
        u, v = layer.vectors()
        return looks_untrained(_matrix(layer), u, v)
    return None


@dataclass(frozen=True)
class AuditRow:
    """One spectral-normed tensor.  ``error`` is ``(sigma - exact) / exact``."""

    module: str  # path in the model ("" for the model itself)
    name: str
    api: str  # "hook" or "parametrization"
    library: str | None  # "safe_norm", "upstream", "other" (another library's subclass), or None (a checkpoint)
    shape: tuple[int, ...]
    dim: int
    sigma: float  # what the next eval forward divides by
    exact: float  # the largest singular value, float64 (nan when not computed)
    error: float
    untrained: bool | None  # never trained, never converged (None: cannot tell)
    # With audit(input_shapes=...): the normalised layer's norm as a map on inputs of that
    # shape (operator_norm's estimate, attained) and its certified upper bound; nan otherwise
    operator: float = math.nan
    operator_upper: float = math.nan


class Audit(list):  # type: ignore[type-arg]
    """A list of :class:`AuditRow`; ``str()`` is a table."""

    _COLUMNS = ("module", "name", "api", "library", "shape", "sigma", "exact", "rel. error", "untrained")

    def __str__(self) -> str:
        operators = any(not math.isnan(r.operator) for r in self)
        rows = [self._COLUMNS + (("operator", "op. upper") if operators else ())] + [
            (
                r.module or "(model)",
                r.name,
                r.api,
                r.library or "-",
                "x".join(map(str, r.shape)),
                f"{r.sigma:.6g}",
                f"{r.exact:.6g}",
                f"{r.error:+.1e}",
                {True: "YES", False: "no", None: "?"}[r.untrained],
            ) + ((f"{r.operator:.6g}", f"{r.operator_upper:.6g}") if operators else ())
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def exact_sigma(W: Tensor) -> float:
    dtype = torch.complex128 if W.is_complex() else torch.float64
    return torch.linalg.matrix_norm(W.detach().to(dtype), 2).item()


def make_row(
    module: str, name: str, api: str, library: str | None, weight: Tensor, dim: int,
    used: Tensor, untrained: bool | None, exact: bool, reference: float | None = None,
) -> AuditRow:
    """``reference``: the exact sigma where it is not the reshaped weight's (an operator norm)."""
    used_value = float(used.real if used.is_complex() else used)
    if not exact:
        true = math.nan
    elif reference is not None:
        true = reference
    else:
        true = exact_sigma(_power.weight_to_matrix(weight, dim))
    error = (used_value - true) / true if true else math.nan
    return AuditRow(module, name, api, library, tuple(weight.shape), dim, used_value, true, error, untrained)


@torch.no_grad()
def audit(model: nn.Module, *, exact: bool = True,
          input_shapes: Mapping[str, Sequence[int]] | None = None) -> Audit:
    """One :class:`AuditRow` per spectral-normed tensor in ``model``: safe_norm's and
    upstream's, hook and parametrization API, in any mix.  Nothing in the model changes.

    ``sigma`` is what the next eval forward divides by (a sigma, also for ``coeff`` layers,
    which divide by ``max(1, sigma / coeff)``), ``exact`` the largest singular value (float64
    SVD; for a layer built with ``input_shape``, its norm as that map, by float64 Lanczos;
    ``exact=False`` skips it, for very large models), ``untrained`` whether the layer's ``u``,
    ``v`` are still registration's unconverged ones (PyTorch issue #51800: an upstream
    hook-API layer put in ``eval()`` before any training forward).  ``print`` it for a table.
    ``library`` is ``"other"`` for another library's subclass of upstream's (its sigma is
    NaN where its vectors do not fit the reshaped weight: a convolution-shaped copy).  A lazy
    module's registration that has not completed yet (no shape) is not listed: run
    :func:`safe_norm.initialize_now` first.

    ``input_shapes`` maps convolution layers' paths to the shape of one input sample
    (``(channels, *spatial)``); their rows then also hold the normalised layer's norm as the map
    it is on such inputs, and a certified upper bound (:func:`safe_norm.operator_norm`): a 3x3
    convolution's is typically 1.5-1.7x the sigma it is divided by.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)),
        ...                     safe_norm.spectral_norm(nn.Linear(16, 1)))
        >>> [(r.module, r.library, r.untrained, abs(r.error) < 1e-4) for r in safe_norm.audit(net)]
        [('0', 'upstream', True, False), ('1', 'safe_norm', False, True)]
        >>> print(safe_norm.audit(net))  # doctest: +SKIP
        module  name    api   library    shape  sigma     exact    rel. error  untrained
        0       weight  hook  upstream   16x8   0.0735... 1.35...  -9.5e-01    YES
        1       weight  hook  safe_norm  1x16   0.989...  0.989... +3.4e-08    no
    """
    from ._operator import measure, operator_norm  # noqa: PLC0415 - it reads layers through this module

    shapes = dict(input_shapes or {})
    rows = Audit()
    for layer in layers(model):
        op = getattr(layer.fn, "op", None)
        reference = None
        if op is not None and exact:  # built with input_shape: its sigma is the operator's norm
            reference = measure(layer.module, layer.weight().detach(), op.in_shape, 1e-10, 500).estimate
        row = make_row(
            layer.path, layer.name, layer.api, layer.library, layer.weight().detach(), layer.fn.dim,
            next_sigma(layer), untrained(layer), exact, reference,
        )
        if layer.path in shapes and layer.name == "weight":
            found = operator_norm(layer.module, shapes.pop(layer.path))
            row = dataclasses.replace(row, operator=found.estimate, operator_upper=found.upper)
        rows.append(row)
    if shapes:
        raise ValueError(f"audit: input_shapes names {sorted(shapes)}, which hold no spectral-normed weight")
    return rows


def sigma(module: nn.Module, name: str = "weight") -> Tensor:
    """The sigma that ``module.<name>``'s next eval forward divides by, as a detached 0-d
    tensor on the weight's device.

    Works on safe_norm's and upstream's spectral norms, hook or parametrization API alike.  On
    a trained layer (and on upstream's) it costs one mat-vec and no host synchronisation, so it
    is cheap enough to log every step (neither upstream API exposes it).  Before the first
    training forward a safe_norm layer also compares its weight with the one its ``u``, ``v``
    were converged for (a synchronisation), and if it changed, the next forward re-converges:
    the value returned is then that one, computed on copies.  A layer built with ``coeff``
    divides by ``max(1, sigma / coeff)`` of it; one built with ``input_shape`` estimates the
    operator norm.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> m = safe_norm.spectral_norm(nn.Linear(20, 40))
        >>> exact = torch.linalg.matrix_norm(m.weight_orig.detach().double(), 2)
        >>> bool(abs(safe_norm.sigma(m) / exact - 1) < 1e-4)
        True
    """
    for layer in layers(module):
        if layer.module is module and layer.name == name:
            return next_sigma(layer)
    raise ValueError(f"no spectral norm on {type(module).__name__}.{name}")
