"""For models normalised by upstream: :func:`guard` (the seed's invariant check, for models kept on
upstream) and :func:`convert` (switch them to safe_norm in place, state kept)."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _spectral_norm, parametrizations
from ._inspect import Layer, layers, untrained, warms
from ._spectral_norm import DEFAULT_WARMUP_TOL

__all__ = ["guard", "convert", "Guard"]

T_module = TypeVar("T_module", bound=nn.Module)


class _Watch:
    """One hook-API layer under guard: warns at its first eval forward if no training forward
    (or converged state, from a copy or a load) came before."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.ok = not untrained(layer)

    def forward_pre(self, module: nn.Module, inputs: Any) -> None:
        if self.ok:
            return
        self.ok = True  # a training forward converges u, v; either way, warn once
        if not module.training:
            warnings.warn(
                f"{self.layer.where}: eval forward before any training forward: upstream's "
                "spectral norm divides this weight by a sigma from random u, v (PyTorch issue "
                "#51800). Run a training forward first, or use safe_norm.convert(model).",
                UserWarning,
                stacklevel=2,
            )

    def load_post(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.ok = not untrained(self.layer)  # the checkpoint's u, v decide


class Guard:
    """What :func:`guard` returns: ``remove()`` takes its hooks off; also a context manager."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.watched: list[str] = []  # the layers watched, as "path.name"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def guard(model: nn.Module) -> Guard:
    """Warn when an upstream hook-API spectral norm runs an eval forward before any training
    forward: the invariant PyTorch issue #51800 proposes, for models that stay on upstream.

    One ``UserWarning`` per layer, naming its path.  A layer counts as ready once it has run a
    training forward, or when its ``u``, ``v`` look like a power step's result (a trained model
    loaded from a checkpoint or deep-copied), checked at ``guard()`` and after each
    ``load_state_dict``.  Parametrization-API layers are not watched: upstream warms them up
    at registration (percent-level off, not meaningless; :func:`safe_norm.audit` shows it), nor
    are safe_norm's layers, which are valid from registration.

    Example::

        >>> import warnings
        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.utils.spectral_norm(nn.Linear(8, 1)))
        >>> with safe_norm.guard(net), warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = net.eval()(torch.randn(2, 4))
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        1.weight: eval forward before any training forward: upstream's spectral norm ...
    """
    handle = Guard()
    for layer in layers(model):
        if layer.api != "hook" or warms(layer):
            continue
        watch = _Watch(layer)
        handle.handles.append(layer.module.register_forward_pre_hook(watch.forward_pre, prepend=True))
        handle.handles.append(layer.module.register_load_state_dict_post_hook(watch.load_post))
        handle.watched.append(layer.where)
    return handle


def convert(model: T_module, *, warmup_tol: float | None = DEFAULT_WARMUP_TOL) -> T_module:
    """Replace upstream's spectral norms in ``model`` (both APIs) with safe_norm's, in place.

    The weights, names, ``state_dict`` keys and hook order stay exactly as they are; the hook
    or parametrization object becomes safe_norm's class.  Hook-API layers that never trained
    (:attr:`AuditRow.untrained`: random vectors, told from their content) are warmed up to
    ``warmup_tol`` as at safe_norm's registration; trained ones keep their vectors, so their
    outputs in ``train()`` and ``eval()`` are the source's (to float32 rounding in training,
    MIGRATION B2).  Parametrization-API layers are warmed up whenever their sigma is off by more
    than ``warmup_tol``: their vectors cannot tell upstream's 15 warm-up steps from training, so
    a trained layer's sigma is refined too (its outputs move by its sigma error, towards the
    exact value).  safe_norm's layers are left alone.  ``warmup_tol=None`` warms nothing.
    Returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)), nn.ReLU(),
        ...                     nn.utils.parametrizations.spectral_norm(nn.Linear(16, 1)))
        >>> net = safe_norm.convert(net)
        >>> [(r.library, abs(r.error) < 1e-4) for r in safe_norm.audit(net)]
        [('safe_norm', True), ('safe_norm', True)]
    """
    found = [layer for layer in layers(model) if layer.library == "upstream"]
    for layer in found:
        # decided before anything changes; a parametrization's state cannot tell (see above)
        warm = warmup_tol is not None and untrained(layer) is not False
        if layer.api == "hook":
            hook = _spectral_norm.take_over(layer.module, layer.fn)
            hook.start(layer.module, warmup_tol, converge=warm)
        else:
            parametrizations.take_over(layer.fn, warmup_tol, layer.weight() if warm else None)
    return model
