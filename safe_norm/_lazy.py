"""Deferred registration on lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ...).

Upstream refuses them.  Here ``spectral_norm(nn.LazyLinear(10))`` records a :class:`Pending`
registration on the module, completed by eager registration as soon as the parameter exists:

* at the first forward: the pending hook runs right after the lazy module's own hook, which
  has just materialised the parameters, so that forward already uses a normalised weight;
* at ``load_state_dict`` of a checkpoint of the normalised layer: the checkpoint gives the shape,
  and its ``u``, ``v`` are kept exactly as saved;
* at :func:`initialize_now`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from . import _compat

__all__ = ["Pending", "initialize_now", "pending_hooks", "pending_on", "finish_lazy"]

# register(module) does the eager registration; it returns the hook to run once in the forward
# that completed it (the hook API's: hooks added during a forward only run from the next one).
Register = Callable[[nn.Module], Any]
# restore(module, u, v) puts a checkpoint's vectors into the completed registration, as loaded.
Restore = Callable[[nn.Module, Tensor, Tensor], None]


class Pending:
    """A spectral norm recorded on a module whose parameter is not materialised yet.

    Installed as the module's forward pre-hook and load-state-dict pre- and post-hook.
    ``keys(prefix)`` names the normalised layer's checkpoint entries: weight, u, v.
    """

    def __init__(
        self,
        api: str,
        name: str,
        register: Register,
        keys: Callable[[str], tuple[str, str, str]],
        restore: Restore,
    ) -> None:
        self.api = api
        self.name = name
        self.register = register
        self.keys = keys
        self.restore = restore
        self._loaded: tuple[Tensor, Tensor] | None = None
        self._handles: list[RemovableHandle] = []

    def install(self, module: nn.Module) -> None:
        self._handles = [
            module.register_forward_pre_hook(self),
            _compat.register_load_pre_hook(module, self.load_pre),
            module.register_load_state_dict_post_hook(self.load_post),
        ]

    def ready(self, module: nn.Module) -> bool:
        return not is_lazy(getattr(module, self.name))

    def complete(self, module: nn.Module, *, loading: bool = False) -> Any:
        self.uninstall(module, loading=loading)
        finish_lazy(module)
        return self.register(module)

    # -- forward pre-hook
    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if self.ready(module):
            hook = self.complete(module)
            if hook is not None:
                hook(module, inputs)

    # -- load_state_dict: the checkpoint of a normalised layer gives the shape and u, v
    def load_pre(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        weight_key, u_key, v_key = self.keys(prefix)
        if weight_key not in state_dict:
            return  # a checkpoint of the plain (lazy) layer: the lazy module handles it
        weight = getattr(module, self.name)
        if is_lazy(weight):
            with torch.no_grad():
                weight.materialize(state_dict[weight_key].shape)
        # Load the weight into the plain layer now; u, v once the registration exists.
        state_dict[prefix + self.name] = state_dict.pop(weight_key)
        if u_key in state_dict and v_key in state_dict:
            self._loaded = (state_dict.pop(u_key), state_dict.pop(v_key))

    def load_post(self, module: nn.Module, incompatible_keys: Any) -> None:
        if not self.ready(module) or self not in pending_hooks(module):
            return
        loaded, self._loaded = self._loaded, None
        if loaded is None:  # shapes came from a plain checkpoint: an ordinary registration
            self.complete(module, loading=True)
            return
        weight = getattr(module, self.name)
        devices = [weight.device] if weight.is_cuda else []
        with torch.random.fork_rng(devices=devices):  # a load draws no random numbers
            self.complete(module, loading=True)
        self.restore(module, *loaded)

    def uninstall(self, module: nn.Module, *, loading: bool = False) -> None:
        # Through the handles: the module's hook dicts stay the same objects, so users'
        # handles keep working.  While torch runs the load post-hooks it iterates their dict
        # (no entry may go), so from load_post our entry is swapped for an inert function.
        forward, load_pre, load_post = self._handles
        forward.remove()
        load_pre.remove()
        if loading:
            module._load_state_dict_post_hooks[load_post.id] = _inert
        else:
            load_post.remove()


def _inert(module: nn.Module, incompatible_keys: Any) -> None:
    """What is left of a completed registration's load post-hook (see Pending.uninstall)."""


def copy_loaded_(current: Tensor, loaded: Tensor, key: str) -> None:
    """A checkpoint's vector into a registration completed at its load, refused with
    ``load_state_dict``'s error where the sizes differ (``copy_`` would broadcast: a 1-entry
    vector would load into a 16-entry one)."""
    if current.shape != loaded.shape:
        raise RuntimeError(f"Error(s) in loading state_dict: size mismatch for {key}: copying a param with "
                           f"shape {loaded.shape} from checkpoint, the shape in current model is {current.shape}.")
    with torch.no_grad():
        current.copy_(loaded)


def pending_hooks(module: nn.Module) -> list[Pending]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, Pending)]


def pending_on(module: nn.Module, api: str, name: str) -> bool:
    return any(p.api == api and p.name == name for p in pending_hooks(module))


def finish_lazy(module: nn.Module) -> None:
    """End a lazy module's life once all its parameters exist, as its first forward would.

    LazyModuleMixin does this in its forward pre-hook; a registration completed outside that
    forward (a load, initialize_now) must do it first, or the lazy module's next forward would
    turn the class back into its ``cls_to_become`` and drop the parametrization's class.
    """
    if not isinstance(module, LazyModuleMixin) or module.has_uninitialized_params():
        return
    if hasattr(module, "_initialize_hook"):
        module._initialize_hook.remove()
        module._load_hook.remove()
        delattr(module, "_initialize_hook")
        delattr(module, "_load_hook")
    if module.cls_to_become is not None:
        module.__class__ = module.cls_to_become


def _lazy_modules(module: nn.Module) -> list[str]:
    return [
        name or type(module).__name__
        for name, m in module.named_modules()
        if any(is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()))
    ]


def initialize_now(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> nn.Module:
    """Materialise lazy parameters and complete every pending spectral norm in ``module``.

    With example inputs, one forward materialises every lazy parameter of the tree; it changes
    no training state (it runs in ``eval()`` under ``torch.no_grad()``, so no BatchNorm
    statistics move and no power iteration runs, and the modes are restored).  Without inputs,
    the pending registrations whose parameters already exist are completed, and lazy parameters
    that remain are an error.  Call it before creating the optimizer or wrapping the model in
    ``DistributedDataParallel``: both need the final parameters.

    Returns:
        ``module``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from safe_norm import initialize_now, spectral_norm
        >>> net = nn.Sequential(spectral_norm(nn.LazyLinear(8)), nn.ReLU(), nn.LazyLinear(1))
        >>> _ = initialize_now(net, torch.zeros(1, 20))
        >>> sorted(net[0].state_dict())
        ['bias', 'weight_orig', 'weight_u', 'weight_v']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"initialize_now expects an nn.Module, got {type(module).__name__}")
    if (example_inputs or example_kwargs) and _lazy_modules(module):
        modes = [(m, m.training) for m in module.modules()]
        try:
            module.eval()
            with torch.no_grad():
                module(*example_inputs, **example_kwargs)
        finally:
            # Parents first: modules the forward created (parametrizations) take their parent's.
            for m, training in modes:
                m.train(training)
    for m in list(module.modules()):
        for pending in pending_hooks(m):
            if pending.ready(m):
                pending.complete(m)
    left = _lazy_modules(module)
    if left:
        raise RuntimeError(
            f"initialize_now: {', '.join(left)} still {'has' if len(left) == 1 else 'have'} "
            "uninitialised parameters; pass an example input, as in "
            "initialize_now(model, example_batch), so that one forward can infer their shapes"
        )
    return module
