"""For models normalised by upstream: :func:`guard` (the seed's invariant check, for models kept on
upstream) and :func:`convert` (switch them to safe_norm in place, state kept)."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar, cast

from torch import nn
from torch.nn.utils import parametrize
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


def convert(
    model: T_module, *, warmup_tol: float | None = DEFAULT_WARMUP_TOL, rewarm_parametrizations: bool = False
) -> T_module:
    """Replace upstream's spectral norms in ``model`` (both APIs) with safe_norm's, in place,
    without changing a trained model's outputs.

    The weights, names, ``state_dict`` keys and hook order stay exactly as they are; the hook
    or parametrization object becomes safe_norm's class.  Layers keep their ``u``, ``v`` bit for
    bit, so their outputs in ``eval()`` are the source's bit for bit (in ``train()``, to float32
    rounding: MIGRATION B2), with one exception: hook-API layers that never trained
    (:attr:`AuditRow.untrained`: upstream's random vectors, told from their content, whose
    sigma is meaningless) are warmed up to ``warmup_tol`` as at safe_norm's registration.
    A parametrization-API layer's vectors cannot tell upstream's 15 warm-up steps from
    training, so they are kept too, and its sigma stays as far off as it was (1-3 % on a
    freshly built layer; :func:`safe_norm.audit` shows it).  ``rewarm_parametrizations=True``
    warms those up whenever their sigma is off by more than ``warmup_tol``: right for a model
    that has not trained yet, and on a trained one it moves the outputs by the sigma error,
    towards the exact value.  safe_norm's layers are left alone.  ``warmup_tol=None`` warms
    nothing.  Returns ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)), nn.ReLU(),
        ...                     nn.utils.parametrizations.spectral_norm(nn.Linear(16, 4)))
        >>> x = torch.randn(3, 8)
        >>> _ = net(x)  # a training forward: the hook-API layer's u, v are no longer random
        >>> with torch.no_grad():
        ...     before = net.eval()(x)
        ...     net = safe_norm.convert(net)
        ...     torch.equal(net(x), before)
        True
        >>> fresh = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 4))  # never trained
        >>> fresh = safe_norm.convert(fresh, rewarm_parametrizations=True)
        >>> [(r.library, abs(r.error) < 1e-4) for r in safe_norm.audit(fresh)]
        [('safe_norm', True)]
    """
    if rewarm_parametrizations and warmup_tol is None:
        raise ValueError("rewarm_parametrizations=True needs a warmup_tol (got None)")
    found = [layer for layer in layers(model) if layer.library == "upstream"]
    others = [layer.where for layer in layers(model)
              if layer.library == "other"]
    if others:
        warnings.warn(f"convert: left as they are (another library's subclasses of upstream's spectral norm, "
                      f"whose forward is their own): {', '.join(others)}", stacklevel=2)
    for layer in found:
        if layer.api == "hook":
            # decided before anything changes: only random vectors are replaced
            warm = warmup_tol is not None and bool(untrained(layer))
            hook = _spectral_norm.take_over(layer.module, layer.fn)
            hook.start(layer.module, warmup_tol, converge=warm)
        else:
            weight = layer.weight() if rewarm_parametrizations else None
            owner = cast(parametrize.ParametrizationList, layer.module.parametrizations[layer.name])  # type: ignore[index,union-attr]
            parametrizations.take_over(layer.fn, warmup_tol, weight, owner=owner)
    return model
