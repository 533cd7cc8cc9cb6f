"""Every private torch name safe_norm relies on, each checked with a message that names it and
where it is used, so that a torch release that changes one fails here, clearly, first.

The public doors (forward pre-hooks and their handles, `parametrize`, `right_inverse`,
`register_load_state_dict_pre_hook` / `_post_hook`) need no such guard.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrizations

from safe_norm import _compat, _patch


def _why(name: str, where: str) -> str:
    return f"torch {torch.__version__} changed {name}, which safe_norm relies on in {where}"


def test_upstream_parametrization_class():
    cls = getattr(parametrizations, "_SpectralNorm", None)
    assert isinstance(cls, type) and issubclass(cls, nn.Module), _why(
        "torch.nn.utils.parametrizations._SpectralNorm (subclassed)", "safe_norm/parametrizations.py")
    for attr in ("_reshape_weight_to_matrix", "_power_method", "right_inverse", "forward"):
        assert hasattr(cls, attr), _why(f"_SpectralNorm.{attr}", "safe_norm/parametrizations.py")
    p = parametrizations.spectral_norm(nn.Linear(3, 2)).parametrizations.weight[0]
    assert isinstance(p._u, torch.Tensor) and isinstance(p._v, torch.Tensor), _why(
        "the _u / _v buffers of _SpectralNorm", "safe_norm/parametrizations.py, _inspect.py")


def test_upstream_hook_classes():
    from torch.nn.utils.spectral_norm import (
        SpectralNorm,
        SpectralNormLoadStateDictPreHook,
        SpectralNormStateDictHook,
    )

    m = nn.utils.spectral_norm(nn.Linear(3, 2))
    hook = next(h for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm))
    for attr in ("name", "dim", "n_power_iterations", "eps"):
        assert hasattr(hook, attr), _why(f"SpectralNorm.{attr}", "safe_norm/_spectral_norm.py")
    assert callable(SpectralNorm.apply) and callable(SpectralNormStateDictHook)
    loads = [getattr(h, "hook", h) for h in m._load_state_dict_pre_hooks.values()]
    assert any(isinstance(h, SpectralNormLoadStateDictPreHook) and h.fn is hook for h in loads), _why(
        "the load pre-hook SpectralNorm.apply registers (its class, its .fn)", "safe_norm/_spectral_norm.py take_over")


def test_module_hook_dicts():
    """Read (and, for the load hooks upstream's remove leaves behind, edited) directly."""
    m = nn.Linear(2, 2)
    for name in ("_forward_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        assert isinstance(getattr(m, name, None), dict), _why(
            f"Module.{name}", "safe_norm/_spectral_norm.py, _lazy.py, _inspect.py, _errors.py")
    handle = _compat.register_load_pre_hook(m, lambda *a: None)
    wrapped = m._load_state_dict_pre_hooks[handle.id]
    assert callable(getattr(wrapped, "hook", wrapped)), _why(
        "the wrapping of load pre-hooks (_WrappedHook.hook)", "safe_norm/_spectral_norm.py")
    post = m.register_load_state_dict_post_hook(lambda *a: None)
    assert post.id in m._load_state_dict_post_hooks, _why(
        "RemovableHandle.id as the key of Module._load_state_dict_post_hooks", "safe_norm/_lazy.py uninstall")


def test_lazy_module_internals():
    m = nn.LazyLinear(3)
    assert isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
    for attr in ("_initialize_hook", "_load_hook", "cls_to_become"):
        assert hasattr(m, attr), _why(f"LazyModuleMixin.{attr}", "safe_norm/_lazy.py finish_lazy")
    assert hasattr(m._initialize_hook, "remove") and m.cls_to_become is nn.Linear


def test_transform_detection():
    assert callable(getattr(torch._C, "_are_functorch_transforms_active", None)), _why(
        "torch._C._are_functorch_transforms_active", "safe_norm/_power.py transformed")
    assert isinstance(getattr(forward_ad, "_current_level", None), int), _why(
        "torch.autograd.forward_ad._current_level", "safe_norm/_power.py transformed")


def test_fake_tensor_detection():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2)
    assert _compat.is_fake(fake) and not _compat.is_fake(torch.empty(2)), _why(
        "torch._subclasses.fake_tensor.is_fake", "safe_norm/_compat.py is_fake")
    assert callable(getattr(torch, "_is_functional_tensor", None)), _why(
        "torch._is_functional_tensor", "safe_norm/_compat.py is_fake")
    if _compat.TORCH >= (2, 2):
        from torch._subclasses.functional_tensor import FunctionalTensor

        assert _compat._FUNCTIONAL == (FunctionalTensor,), _why(
            "torch._subclasses.functional_tensor.FunctionalTensor", "safe_norm/_compat.py is_fake")


def test_patch_anchors_are_in_the_installed_source():
    root = _patch.installed_torch_root()
    hook = (root / _patch.HOOK_FILE).read_text(encoding="utf-8")
    param = (root / _patch.PARAM_FILE).read_text(encoding="utf-8")
    assert _patch._ANCHOR.search(hook), _why(
        f"the text of {_patch.HOOK_FILE} around the random draw of v", "safe_norm/_patch.py _ANCHOR")
    assert _patch._PARAM_WARM_UP.search(param), _why(
        f"the 15-iteration warm-up in {_patch.PARAM_FILE}", "safe_norm/_patch.py _PARAM_WARM_UP")
