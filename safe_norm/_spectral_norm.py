"""Hook API: drop-in for ``torch.nn.utils.spectral_norm`` / ``remove_spectral_norm``.

Private module name on purpose: in torch, ``torch.nn.utils.spectral_norm`` is both a module and
the function that shadows it.  Here ``safe_norm.spectral_norm`` is only ever the function.
"""

from __future__ import annotations

import copy
import weakref
from functools import partial
from typing import Any, Sequence, TypeVar, cast

from torch import Tensor, nn
from torch.nn.utils.spectral_norm import (
    SpectralNorm as _UpstreamSpectralNorm,
    SpectralNormLoadStateDictPreHook,
    SpectralNormStateDictHook,
    remove_spectral_norm as _upstream_remove_spectral_norm,
)

from . import _core, _krylov, _power
from ._errors import check_coeff, check_options, check_warmup_tol, check_weight
from ._lazy import Pending, copy_loaded_, pending_hooks, pending_on
from ._operator import ConvMap, conv_map, operator_vectors
from ._operator import check_options as check_operator_options

__all__ = [
    "SpectralNorm",
    "SpectralNormLoadStateDictPreHook",
    "SpectralNormStateDictHook",
    "spectral_norm",
    "remove_spectral_norm",
]

T_module = TypeVar("T_module", bound=nn.Module)

DEFAULT_WARMUP_TOL = _krylov.DEFAULT_WARMUP_TOL


def _member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a parameter or buffer, from its dict: ``Module.__getattr__``
    costs ~1 us a call, three at every forward (on small layers a few percent of the step)."""
    found: Tensor | None = module._parameters.get(name)
    if found is None:
        found = module._buffers.get(name)
    return getattr(module, name) if found is None else found


class SpectralNorm(_UpstreamSpectralNorm):
    """Upstream's forward pre-hook; what its forward does is decided in :mod:`safe_norm._core`.

    A subclass, so that ``isinstance`` checks in users' code and upstream's own
    ``torch.nn.utils.remove_spectral_norm`` keep working on safe_norm modules.  The state-dict
    format is upstream's.
    """

    # None only on an instance made outside apply(): upstream's behaviour.
    _state: _core.State | None = None
    # The module this hook normalises, for __deepcopy__ (weak: the module holds the hook).
    _module: weakref.ref[nn.Module] | None = None
    # Soft normalisation (spectral_norm's ``coeff``); None: upstream's W / sigma.
    coeff: float | None = None
    # The layer as a map on inputs of one shape (spectral_norm's ``input_shape``); None: the
    # reshaped weight, as upstream.
    op: ConvMap | None = None

    def view(self, module: nn.Module) -> _core.View:
        name = self.name
        return _core.View(_member(module, name + "_orig"), _member(module, name + "_u"),
                          _member(module, name + "_v"), self.dim, self.eps, self.n_power_iterations,
                          False, self.coeff, self.op)

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if self._module is None:  # after unpickling (the reference is not pickled)
            self._module = weakref.ref(module)
        setattr(module, self.name, _core.forward(self._state, self.view(module), module.training))

    def __deepcopy__(self, memo: dict[int, Any]) -> SpectralNorm:
        # After a forward with autograd on, `module.<name>` is W / sigma with its graph, and
        # torch refuses to deep-copy a non-leaf tensor, so upstream's modules cannot be
        # deep-copied then (an EMA copy mid-training, for instance).  A module's hooks are
        # copied before its attributes, so when this hook is copied as part of its module,
        # the copy of that tensor is decided here: its values, detached (the copy's next
        # forward recomputes it anyway).
        module = self._module() if self._module is not None else None
        if module is not None and id(module) in memo:
            weight = module.__dict__.get(self.name)
            if isinstance(weight, Tensor) and not weight.is_leaf and id(weight) not in memo:
                memo[id(weight)] = weight.detach().clone()
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        copied = memo.get(id(module)) if module is not None else None
        new._module = weakref.ref(copied) if isinstance(copied, nn.Module) else None
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_module"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        return _power.weight_to_matrix(weight, self.dim)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> Tensor:
        """What a forward computes (upstream's ``remove`` calls this: a weight changed since
        the last convergence is re-converged before it is baked in)."""
        return _core.forward(self._state, self.view(module), do_power_iteration)

    @staticmethod
    def apply(  # type: ignore[override]
        module: nn.Module,
        name: str,
        n_power_iterations: int,
        dim: int,
        eps: float,
        warmup_tol: float | None = DEFAULT_WARMUP_TOL,
        track_tol: float | None = None,
        coeff: float | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> SpectralNorm:
        check_weight(module, name, dim, n_power_iterations)
        op = None if input_shape is None else conv_map(module, input_shape, who="spectral_norm")
        # Upstream's registration verbatim: its checks and exception types, parameter and buffer
        # names, state-dict hooks, and its random draws of u and v in its order (so a seeded
        # script builds the same model).  It hard-codes its own class, so re-class the hook.
        ours = take_over(module, _UpstreamSpectralNorm.apply(module, name, n_power_iterations, dim, eps))
        if coeff is not None:  # only then an attribute of the hook: the default's is upstream's
            ours.coeff = coeff
        if op is not None:
            ours.op = op
            weight = getattr(module, name + "_orig")
            u, v = operator_vectors(weight, op, eps)
            module.register_buffer(name + "_u", u)
            module.register_buffer(name + "_v", v)
        ours.start(module, warmup_tol, label=f"{type(module).__name__}.{name}", track=track_tol)
        return ours

    def start(self, module: nn.Module, tol: float | None, *, converge: bool = True, label: str = "",
              track: float | None = None) -> None:
        """safe_norm's state, on a hook that has upstream's: ``u``, ``v`` converged now (unless
        ``converge`` is false: a trained layer taken over), the weight watched until training."""
        self._state = _core.State(tol, watching=converge, label=label, track=track)
        if converge and tol is not None:
            _core.converge(self._state, self.view(module))
        module.register_state_dict_pre_hook(self.settle)

    def settle(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        """Before ``state_dict()``: a pending re-convergence now, so that the checkpoint holds
        the vectors the next forward would use (a load keeps them exactly)."""
        _core.settle(self._state, self.view(module))


def take_over(module: nn.Module, fn: _UpstreamSpectralNorm) -> SpectralNorm:
    """Make upstream's hook on ``module`` (and its load hook) safe_norm's, state untouched."""
    fn.__class__ = SpectralNorm
    cast(SpectralNorm, fn)._module = weakref.ref(module)
    for hook in module._load_state_dict_pre_hooks.values():
        inner = getattr(hook, "hook", hook)  # torch wraps it in _WrappedHook
        if isinstance(inner, SpectralNormLoadStateDictPreHook) and inner.fn is fn:
            inner.__class__ = _LoadPreHook
    return cast(SpectralNorm, fn)


class _LoadPreHook(SpectralNormLoadStateDictPreHook):
    """Upstream's load hook (old-format conversion), and: a load is not a weight change."""

    def __call__(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super().__call__(state_dict, prefix, *args, **kwargs)
        state = getattr(self.fn, "_state", None)
        # Only a checkpoint that holds the layer (after upstream's conversion of the old
        # format): a partial load leaves the others' pending re-convergence as it is.
        if state is not None and all(prefix + self.fn.name + s in state_dict for s in ("_orig", "_u", "_v")):
            state.adopt()


def spectral_norm(
    module: T_module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    warmup_tol: float | None = DEFAULT_WARMUP_TOL,
    track_tol: float | None = None,
    coeff: float | None = None,
    input_shape: Sequence[int] | None = None,
) -> T_module:
    r"""Apply spectral normalisation to a parameter of ``module``; a drop-in for
    :func:`torch.nn.utils.spectral_norm`.

    .. math:: \mathbf{W}_{SN} = \mathbf{W} / \sigma(\mathbf{W})

    Same arguments, names (``<name>_orig``, ``<name>_u``, ``<name>_v``), state-dict format,
    exceptions and random draws as upstream.  The difference: ``u`` and ``v`` are converged at
    registration (Golub–Kahan–Lanczos warm-up), so sigma is right before the first forward, in
    ``train()`` or ``eval()``; upstream leaves them random until the first training forward.

    On a lazy module (``nn.LazyLinear``, ...) the registration is recorded and completed as soon
    as the parameter exists: at the first forward (which already uses the normalised weight),
    at ``load_state_dict`` of a normalised checkpoint, or at :func:`safe_norm.initialize_now`.

    Args:
        module: containing module.
        name: name of the weight parameter.
        n_power_iterations: power iterations per training forward (as upstream).
        eps: epsilon for numerical stability in calculating norms.
        dim: dimension corresponding to the outputs; default ``0``, except ``1`` for
            ``ConvTranspose{1,2,3}d``.
        warmup_tol: relative sigma accuracy the warm-up aims for at registration; ``None``
            skips the warm-up and gives upstream's state exactly.
        track_tol: opt-in: keep sigma within this relative tolerance of the exact one at
            every training forward (Lanczos from the current vectors, instead of
            ``n_power_iterations`` power iterations; README "Tracking"; a tolerance looser than
            1e-4 is tracked as 1e-4).  ``None`` (default): upstream's training step.  Not saved in the ``state_dict``: pass it again when
            rebuilding the model.
        coeff: opt-in soft normalisation (Lipschitz networks): the weight is divided by
            ``max(1, sigma / coeff)``, so its spectral norm is at most ``coeff`` and a weight
            already within it is used as it is (the ``spectral_norm_fc(module, coeff)`` of
            invertible ResNets).  ``None`` (default): ``W / sigma``.  Not saved in the
            ``state_dict``: pass it again when rebuilding the model.
        input_shape: opt-in, for a ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` weight: the
            shape of one input sample, ``(channels, *spatial)`` (or the spatial sizes alone).
            Sigma is then the layer's norm as the linear map it is on such inputs (stride,
            zero or circular padding, dilation, groups, output padding: its Lipschitz
            constant), not that of the reshaped weight, by power iteration through the
            convolution and its transpose; ``u`` and ``v`` are flat output- and input-sized
            vectors (so a checkpoint built without the option, or with another shape, does not
            load into it: the sizes differ).  ``dim`` is then left out.

    Returns:
        The original module, with the spectral-norm hook.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from safe_norm import spectral_norm
        >>> m = spectral_norm(nn.Linear(20, 40)).eval()
        >>> m.weight_u.size()
        torch.Size([40])
        >>> W = m.weight_orig.detach()
        >>> sigma = torch.dot(m.weight_u, W @ m.weight_v)
        >>> exact = torch.linalg.matrix_norm(W.double(), 2)
        >>> bool(abs(sigma - exact) / exact < 1e-4)
        True
    """
    check_warmup_tol(warmup_tol)
    check_warmup_tol(track_tol, "track_tol")
    check_coeff(coeff)
    check_options(module, name, n_power_iterations, eps)
    check_operator_options(module, name, dim, input_shape)
    if dim is None:
        dim = _power.default_dim(module)
    if isinstance(module._parameters.get(name), nn.parameter.UninitializedParameter):
        SpectralNorm(name, n_power_iterations, dim, eps)  # upstream's argument checks, now
        if pending_on(module, "hook", name):
            raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
        register = partial(SpectralNorm.apply, name=name, n_power_iterations=n_power_iterations,
                           dim=dim, eps=eps, warmup_tol=warmup_tol, track_tol=track_tol, coeff=coeff,
                           input_shape=input_shape)
        keys = partial(_checkpoint_keys, name=name)
        Pending("hook", name, register, keys, partial(_restore, name=name)).install(module)
        return module
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps, warmup_tol, track_tol, coeff, input_shape)
    return module


def _checkpoint_keys(prefix: str, name: str) -> tuple[str, str, str]:
    return prefix + name + "_orig", prefix + name + "_u", prefix + name + "_v"


def _restore(module: nn.Module, u: Tensor, v: Tensor, name: str) -> None:
    copy_loaded_(getattr(module, name + "_u"), u, name + "_u")
    copy_loaded_(getattr(module, name + "_v"), v, name + "_v")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm) and hook.name == name and hook._state is not None:
            hook._state.adopt()


def remove_spectral_norm(module: T_module, name: str = "weight") -> T_module:
    """Remove spectral normalisation (safe_norm's or upstream's) from ``module``.

    Leaves a plain ``Parameter`` ``<name>`` equal to the normalised weight, as upstream does.
    Unlike upstream (torch 2.13), it also removes the load-state-dict hook, so the plain module
    loads a plain ``state_dict`` with ``strict=True`` afterwards.

    Example::

        >>> from torch import nn
        >>> from safe_norm import spectral_norm, remove_spectral_norm
        >>> m = remove_spectral_norm(spectral_norm(nn.Linear(40, 10)))
        >>> sorted(m.state_dict())
        ['bias', 'weight']
        >>> _ = m.load_state_dict(nn.Linear(40, 10).state_dict())
    """
    for pending in pending_hooks(module):
        if pending.api == "hook" and pending.name == name:
            pending.uninstall(module)  # a lazy module's registration that never completed
            return module
    _upstream_remove_spectral_norm(module, name)
    for key, hook in list(module._state_dict_pre_hooks.items()):
        owner = getattr(hook, "__self__", None)  # SpectralNorm.settle, bound
        if isinstance(owner, SpectralNorm) and owner.name == name:
            del module._state_dict_pre_hooks[key]
    # Upstream looks for its hook class among the load pre-hooks, but torch stores them
    # wrapped in _WrappedHook, so upstream never finds it; unwrap and remove it here.
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = getattr(hook, "hook", hook)
        if isinstance(inner, SpectralNormLoadStateDictPreHook) and inner.fn.name == name:
            del module._load_state_dict_pre_hooks[key]
    return module
