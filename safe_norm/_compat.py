"""What differs between the torch releases safe_norm runs on, in one place.

Each shim names the release that made it necessary; delete it when the supported range no
longer reaches below that release.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake as _torch_is_fake
from torch.utils.hooks import RemovableHandle

__all__ = ["TORCH", "register_load_pre_hook", "is_compiling", "autocast_enabled", "is_fake", "is_sharded",
           "gathered"]

#: (major, minor) of the installed torch.
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def register_load_pre_hook(module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
    """``module.register_load_state_dict_pre_hook(hook)``: public from torch 2.5; before it,
    the private form with ``with_module=True`` takes the same hook."""
    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is not None:
        return register(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


# torch.compiler.is_compiling exists from torch 2.3; torch._dynamo's before it.
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def is_compiling() -> bool:
    return _is_compiling()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``: the argument form exists from torch 2.4.

    Decided by version, not by catching the ``TypeError``: under ``torch.compile`` of torch 2.1
    to 2.3 the error surfaces as a dynamo internal error instead."""
    if TORCH >= (2, 4):
        return torch.is_autocast_enabled(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled()


_FUNCTIONAL: tuple[type, ...]
try:  # torch 2.2 on
    from torch._subclasses.functional_tensor import FunctionalTensor

    _FUNCTIONAL = (FunctionalTensor,)
except ImportError:  # torch 2.1 functionalises with C++ wrappers only
    _FUNCTIONAL = ()


def is_fake(tensor: torch.Tensor) -> bool:
    """A tensor of a compile or export trace: fake, or functionalised around a fake.  torch
    2.5 to 2.7 export, and torch 2.1 to 2.3 compile a parametrization's forward (an opaque
    module call to dynamo there), without reporting ``is_compiling()``; a value comparison on
    such a tensor cannot be answered.  (Eager ``torch.func.functionalize`` is a functorch
    transform, caught before this.)"""
    if type(tensor) in _PLAIN:
        # torch's is_fake costs ~2 us a call, at every training forward; of a plain type only
        # a functionalised wrapper (C++, torch 2.1) or a functorch one can be a trace's
        # tensor, and functorch's transforms are asked for before this
        return torch._is_functional_tensor(tensor)
    return (
        isinstance(tensor, _FUNCTIONAL)
        or torch._is_functional_tensor(tensor)
        or bool(_torch_is_fake(tensor))
    )


_PLAIN = (torch.Tensor, nn.Parameter)


def is_sharded(tensor: torch.Tensor) -> bool:
    """A ``DTensor``: FSDP2's parameters between forwards (during one they are whole, plain
    tensors; tensor parallelism, whose weights stay sharded inside the forward, is not
    supported).  Asked of ``sys.modules`` so that safe_norm does not import
    ``torch.distributed.tensor`` (a second to import) for programs that never made one; its
    public path is torch 2.5's, and FSDP2 (``fully_shard``) is public from torch 2.6."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # not there in torch 2.1-2.4
    return cls is not None and isinstance(tensor, cls)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (differentiable; a collective: every rank must ask for
    it), any other tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]
