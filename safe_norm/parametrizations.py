"""Parametrization API: drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

Usage::

    from safe_norm.parametrizations import spectral_norm   # was: torch.nn.utils.parametrizations

Every other public name of ``torch.nn.utils.parametrizations`` (``weight_norm``,
``orthogonal``, ...) is upstream's own object, forwarded: ``from
safe_norm.parametrizations import spectral_norm, weight_norm`` works as the upstream line.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils import parametrizations as _upstream
from torch.nn.utils.parametrizations import _SpectralNorm as _UpstreamSpectralNorm

from . import _compat, _core, _exports, _power
from ._errors import (
    check_coeff,
    check_dtype,
    check_finite,
    check_not_empty,
    check_options,
    check_warmup_tol,
)
from ._lazy import Pending, copy_loaded_
from ._operator import ConvMap, conv_map, operator_vectors
from ._operator import check_options as check_operator_options
from ._spectral_norm import DEFAULT_WARMUP_TOL

# spectral_norm, then upstream's others (orthogonal, weight_norm): as `from
# torch.nn.utils.parametrizations import *` gives, with safe_norm's spectral_norm.
__all__ = ["spectral_norm"]
__all__ += _exports.others(__all__, _upstream)

# Upstream's fixed warm-up, kept for warmup_tol=None.
_UPSTREAM_WARMUP_ITERATIONS = 15


class _SpectralNorm(_UpstreamSpectralNorm):
    """Upstream's parametrization with a warm-up to tolerance instead of 15 fixed iterations;
    what its forward does is decided in :mod:`safe_norm._core`, as for the hook API.

    A subclass (same name, so the module prints as upstream's) so that ``isinstance`` checks
    keep working.  Upstream's power step runs ``u`` first, then ``v``.
    """

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        *,
        warmup_tol: float | None = DEFAULT_WARMUP_TOL,
        track_tol: float | None = None,
        coeff: float | None = None,
        op: ConvMap | None = None,
    ) -> None:
        # Not upstream's __init__: its 15 fixed iterations are what the warm-up replaces.
        # Its checks, messages and random draws are reproduced exactly.
        nn.Module.__init__(self)
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(
                "Dimension out of range (expected to be in range of "
                f"[-{ndim}, {ndim - 1}] but got {dim})"
            )
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.warmup_tol = warmup_tol
        if coeff is not None:  # only then an attribute: the default module is upstream's
            self.coeff = coeff
        if op is not None:
            self.op = op
        self._state: _core.State | None = None  # a vector is normalised exactly: no u, v
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._reshape_weight_to_matrix(weight)
            if op is None:
                h, w = weight_mat.size()
                u = weight_mat.new_empty(h).normal_(0, 1)
                v = weight_mat.new_empty(w).normal_(0, 1)
                self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
                self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            else:
                u, v = operator_vectors(weight, op, eps)
                self.register_buffer("_u", u)
                self.register_buffer("_v", v)
            if warmup_tol is None:
                self._power_method(weight_mat if op is None else weight, _UPSTREAM_WARMUP_ITERATIONS)
            # else the warm-up runs in the forward that register_parametrization makes
            self._state = _core.State(warmup_tol, track=track_tol)
        _compat.register_load_pre_hook(self, _adopt_on_load)

    # Soft normalisation (spectral_norm's ``coeff``); None: upstream's W / sigma.
    coeff: float | None = None
    # The layer as a map on inputs of one shape (spectral_norm's ``input_shape``); None: the
    # reshaped weight, as upstream.
    op: ConvMap | None = None

    def view(self, weight: Tensor) -> _core.View:
        return _core.View(weight, self._u, self._v, self.dim, self.eps, self.n_power_iterations, u_first=True,
                          coeff=self.coeff, op=self.op)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:  # exact: no u, v (as upstream)
            if self.coeff is not None:
                return weight / torch.clamp(torch.linalg.vector_norm(weight) / self.coeff, min=1)
            return F.normalize(weight, dim=0, eps=self.eps)
        return _core.forward(self._state, self.view(weight), self.training)

    def watch(self, weight: Tensor) -> None:
        """Registration's state: ``u``, ``v`` converged for ``weight``, changes watched until the
        first training forward (registration's own forward, which converged them, does not
        count)."""
        if self._state is not None and self._state.tol is not None:
            _core.watch(self._state, self.view(weight))

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        """Upstream's power iterations (with ``input_shape``: ``weight_mat`` is the weight, and
        they run through the operator)."""
        A = weight_mat if self.op is None else _power.Map(self.op, weight_mat)
        _power.power_iteration_(A, self._u, self._v, n_power_iterations, self.eps, u_first=True, estimate=False)

    def right_inverse(self, value: Tensor) -> Tensor:
        """Identity, as upstream; and ``u``, ``v`` are re-converged for ``value``.

        parametrize calls this on ``module.weight = X``: the next forward, train or eval,
        divides by a sigma valid for ``X`` (upstream keeps the previous weight's vectors).
        """
        if self._state is not None:
            self._state.force()
        return value


def take_over(
    p: _UpstreamSpectralNorm, warmup_tol: float | None, converge_for: Tensor | None = None, *,
    owner: parametrize.ParametrizationList | None = None,
) -> _SpectralNorm:
    """Make upstream's parametrization safe_norm's, state untouched unless ``converge_for``
    (the weight) is given; without it, it behaves as one that has trained (no watching; an
    assignment still re-converges, P2).  ``owner``: the parametrization list holding it, whose
    ``state_dict()`` then settles a pending re-convergence first."""
    p.__class__ = _SpectralNorm
    ours = cast(_SpectralNorm, p)
    _compat.register_load_pre_hook(ours, _adopt_on_load)
    if owner is not None:
        settle_on_save(owner)
    ours.warmup_tol = warmup_tol
    ours._state = _core.State(warmup_tol, watching=False) if hasattr(ours, "_u") else None
    if ours._state is not None and converge_for is not None and warmup_tol is not None:
        ours._state.force()
        ours.watch(converge_for)
    return ours


def settle_on_save(owner: parametrize.ParametrizationList) -> None:
    """Have ``owner.state_dict()`` first run a re-convergence that its next forward would: the
    checkpoint then holds vectors converged for the weight it holds."""
    owner.register_state_dict_pre_hook(_settle)


def _settle(owner: parametrize.ParametrizationList, prefix: str, keep_vars: bool) -> None:
    for p in owner:
        if isinstance(p, _SpectralNorm) and p._state is not None:
            _core.settle(p._state, p.view(owner.original))


def _adopt_on_load(module: _SpectralNorm, state_dict: dict, prefix: str, *args: object) -> None:
    # A load is not a weight change: the checkpoint's u, v belong to its weight.  Only a
    # checkpoint that holds the layer (torch hands each module only its own entries, so its
    # vectors tell): a partial load leaves a pending re-convergence as it is.
    if module._state is not None and prefix + "_u" in state_dict and prefix + "_v" in state_dict:
        module._state.adopt()


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    warmup_tol: float | None = DEFAULT_WARMUP_TOL,
    track_tol: float | None = None,
    coeff: float | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    r"""Apply spectral normalisation to a tensor of ``module`` through a parametrization; a
    drop-in for :func:`torch.nn.utils.parametrizations.spectral_norm`.

    .. math:: \mathbf{W}_{SN} = \mathbf{W} / \sigma(\mathbf{W})

    Same arguments, names (``parametrizations.<name>.original``, ``...0._u``, ``...0._v``),
    exceptions and random draws as upstream; all of ``torch.nn.utils.parametrize`` works on the
    result.  The differences: the warm-up at registration runs to ``warmup_tol`` (relative sigma
    error) instead of 15 fixed power iterations (1–3 % off on default-initialised layers), and
    assigning ``module.<name> = W`` re-converges ``u``, ``v`` for ``W``.

    On a lazy module the registration is deferred until the tensor exists, as in
    :func:`safe_norm.spectral_norm`.

    Args:
        module: containing module.
        name: name of the weight tensor.
        n_power_iterations: power iterations per training forward (as upstream).
        eps: epsilon for numerical stability in calculating norms.
        dim: dimension corresponding to the outputs; default ``0``, except ``1`` for
            ``ConvTranspose{1,2,3}d``.
        warmup_tol: relative sigma accuracy of the warm-up; ``None`` gives upstream's 15
            iterations and upstream's assignment behaviour.
        track_tol: opt-in: keep sigma within this relative tolerance of the exact one at
            every training forward, as in :func:`safe_norm.spectral_norm`; ``None``
            (default): upstream's training step.  Not saved in the ``state_dict``.
        coeff: opt-in soft normalisation (Lipschitz networks): the weight is divided by
            ``max(1, sigma / coeff)``, so its spectral norm is at most ``coeff`` and a weight
            already within it is used as it is (the ``spectral_norm_fc(module, coeff)`` of
            invertible ResNets).  ``None`` (default): ``W / sigma``.  Not saved in the
            ``state_dict``: pass it again when rebuilding the model.
        input_shape: opt-in, for a convolution's weight: sigma is the layer's norm as a map
            on inputs of this shape, as in :func:`safe_norm.spectral_norm`; ``_u`` and ``_v``
            are then output- and input-sized.

    Returns:
        The original module with a new parametrization registered to ``name``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from safe_norm.parametrizations import spectral_norm
        >>> m = spectral_norm(nn.Linear(20, 40)).eval()
        >>> m.parametrizations.weight.original.shape
        torch.Size([40, 20])
        >>> with torch.no_grad():  # the normalised weight has spectral norm 1 right away
        ...     print(f"{torch.linalg.matrix_norm(m.weight.double(), 2).item():.4f}")
        1.0000
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    check_warmup_tol(warmup_tol)
    check_warmup_tol(track_tol, "track_tol")
    check_coeff(coeff)
    check_options(module, name, n_power_iterations, eps)
    check_operator_options(module, name, dim, input_shape)
    if dim is None:
        dim = _power.default_dim(module)
    if is_lazy(weight):
        if n_power_iterations <= 0:  # the one check that needs no shape; the rest come later
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        register = partial(_register, name=name, n_power_iterations=n_power_iterations, eps=eps,
                           dim=dim, warmup_tol=warmup_tol, track_tol=track_tol, coeff=coeff,
                           input_shape=input_shape)
        keys = partial(_checkpoint_keys, name=name)
        Pending("parametrization", name, register, keys, partial(_restore, name=name)).install(module)
        return module
    check_dtype(module, name, weight)
    check_not_empty(module, name, weight)
    check_finite(module, name, weight)
    op = None if input_shape is None else conv_map(module, input_shape, weight, who="spectral_norm")
    sn = _SpectralNorm(weight, n_power_iterations, dim, eps, warmup_tol=warmup_tol, track_tol=track_tol,
                       coeff=coeff, op=op)
    if sn._state is not None:
        sn._state.label = f"{type(module).__name__}.{name}"
    parametrize.register_parametrization(module, name, sn)
    owner = cast(parametrize.ParametrizationList, module.parametrizations[name])  # type: ignore[index]
    sn.watch(owner.original)
    settle_on_save(owner)
    return module


def _register(module: nn.Module, **kwargs: Any) -> None:
    spectral_norm(module, **kwargs)


def _checkpoint_keys(prefix: str, name: str) -> tuple[str, str, str]:
    group = f"{prefix}parametrizations.{name}."
    return group + "original", group + "0._u", group + "0._v"


def _restore(module: nn.Module, u: Tensor, v: Tensor, name: str) -> None:
    plist = cast(nn.ModuleDict, module.parametrizations)[name]
    sn = cast(_SpectralNorm, cast(parametrize.ParametrizationList, plist)[0])
    copy_loaded_(sn._u, u, f"parametrizations.{name}.0._u")
    copy_loaded_(sn._v, v, f"parametrizations.{name}.0._v")
    if sn._state is not None:
        sn._state.adopt()


# Last, so that nothing here is ever taken for upstream's while this module is being built.
# Other public names are upstream's; private ones (_SpectralNorm, which pickles by this
# module's name) stay this module's own.
def __getattr__(attr: str) -> Any:
    return _exports.lookup(__name__, _upstream, attr)


def __dir__() -> list[str]:
    return _exports.names(__name__, _upstream)
