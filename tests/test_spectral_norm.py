"""Hook API: safe_norm.spectral_norm / remove_spectral_norm against torch.nn.utils, side by side."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn.utils import remove_spectral_norm as up_remove
from torch.nn.utils import spectral_norm as up_sn
from torch.nn.utils.spectral_norm import SpectralNorm as UpstreamSpectralNorm

import safe_norm
from safe_norm import remove_spectral_norm, spectral_norm

from .helpers import (
    ZOO,
    close,
    exact_sigma,
    rel,
    trained,
    used_sigma,
)

# --------------------------------------------------------------------------- 1. same surface


def test_public_names_are_functions_not_modules():
    assert inspect.isfunction(safe_norm.spectral_norm)
    assert inspect.isfunction(safe_norm.remove_spectral_norm)
    with pytest.raises(ModuleNotFoundError):
        __import__("safe_norm.spectral_norm")


@pytest.mark.parametrize("ours,theirs", [(spectral_norm, up_sn), (remove_spectral_norm, up_remove)])
def test_signature_extends_upstream_with_keyword_only_options(ours, theirs):
    mine = inspect.signature(ours).parameters
    up = inspect.signature(theirs).parameters
    positional = [p for p in mine.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in up.values()]
    extra = [p for p in mine.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert all(p.default is not inspect.Parameter.empty for p in extra)


def test_returns_the_module():
    m = nn.Linear(3, 4)
    assert spectral_norm(m) is m
    assert remove_spectral_norm(m) is m


@pytest.mark.parametrize(
    "factory,dim",
    [
        (lambda: nn.ConvTranspose1d(4, 6, 3), 1),
        (lambda: nn.ConvTranspose2d(4, 6, 3), 1),
        (lambda: nn.ConvTranspose3d(4, 6, 3), 1),
        (lambda: nn.Conv2d(4, 6, 3), 0),
        (lambda: nn.Linear(4, 6), 0),
    ],
)
def test_default_dim_and_names_match_upstream(factory, dim):
    torch.manual_seed(1)
    up = up_sn(factory())
    torch.manual_seed(1)
    sn = spectral_norm(factory())
    fn = next(h for h in sn._forward_pre_hooks.values() if isinstance(h, safe_norm.SpectralNorm))
    assert fn.dim == dim
    assert isinstance(fn, UpstreamSpectralNorm)
    assert dict(sn.named_parameters()).keys() == dict(up.named_parameters()).keys()
    assert dict(sn.named_buffers()).keys() == dict(up.named_buffers()).keys()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(sn.state_dict())
    assert isinstance(sn.weight, torch.Tensor) and "weight" not in sn._parameters
    assert sn.weight_u.shape == up.weight_u.shape and sn.weight_v.shape == up.weight_v.shape
    assert sn.state_dict()._metadata == up.state_dict()._metadata  # spectral_norm version 1


def _empty_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.empty(0, 4))
    return m


def _int_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.long), requires_grad=False)
    return m


def _scalar_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor(2.0))
    return m


BAD = {
    "n_power_iterations=0": (lambda: nn.Linear(4, 3), dict(n_power_iterations=0)),
    "n_power_iterations=-1": (lambda: nn.Linear(4, 3), dict(n_power_iterations=-1)),
    "missing name": (lambda: nn.Linear(4, 3), dict(name="foo")),
    "buffer name": (lambda: nn.BatchNorm1d(3), dict(name="running_mean")),
    "None parameter": (lambda: nn.Linear(4, 3, bias=False), dict(name="bias")),
    "registered twice": (lambda: spectral_norm(nn.Linear(4, 3)), {}),
    "registered twice (upstream first)": (lambda: up_sn(nn.Linear(4, 3)), {}),
    "dim out of range": (lambda: nn.Linear(4, 3), dict(dim=2)),
    "negative dim": (lambda: nn.Linear(4, 3), dict(dim=-1)),
    "integer weight": (_int_weight_module, {}),
    "0-d weight": (_scalar_weight_module, {}),
    "no rows": (_empty_weight_module, {}),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_upstreams_exception_type_with_a_clear_message(case):
    factory, kwargs = BAD[case]
    with pytest.raises(Exception) as theirs:
        up_sn(factory(), **kwargs)
    with pytest.raises(type(theirs.value)) as mine:
        spectral_norm(factory(), **kwargs)
    message = str(mine.value)
    if not any(word in case for word in ("twice", "n_power", "None")):
        # ours, not upstream's: it names the module and the parameter
        assert "spectral_norm:" in message and kwargs.get("name", "weight") in message, message


def test_clear_error_classes_also_name_the_mistake():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        spectral_norm(_int_weight_module())
    with pytest.raises(IndexError, match="dim=2 is out of range"):
        spectral_norm(nn.Linear(4, 3), dim=2)
    with pytest.raises(ValueError, match="no entries"):
        spectral_norm(_empty_weight_module())
    with pytest.raises(KeyError, match="is a buffer"):
        spectral_norm(nn.BatchNorm1d(3), name="running_mean")


@pytest.mark.parametrize("tol", [0.0, -1e-3, 1.0, float("nan"), "1e-4"])
def test_bad_warmup_tol(tol):
    with pytest.raises(ValueError, match="warmup_tol"):
        spectral_norm(nn.Linear(4, 3), warmup_tol=tol)


def test_inputs_upstream_accepts_are_accepted():
    spectral_norm(nn.Linear(4, 3), name="bias")(torch.randn(2, 4))  # a 1-D weight


def test_remove_spectral_norm_errors_like_upstream():
    with pytest.raises(ValueError):
        up_remove(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="not found"):
        remove_spectral_norm(nn.Linear(3, 4))


# ------------------------------------------------------------------ 2. valid at registration


@pytest.mark.parametrize("layer", ["Linear512", "Conv2d", "Embedding"])
def test_upstream_is_wrong_in_the_same_situation(layer):
    """The seed (PyTorch #51800): upstream's eval sigma is meaningless, ours is not."""
    factory, dim = ZOO[layer]
    torch.manual_seed(0)
    up = up_sn(factory()).eval()
    assert rel(used_sigma(up, dim=dim), exact_sigma(up.weight_orig, dim)) > 0.5


def test_weight_shares_storage_with_orig_until_first_forward():
    m = spectral_norm(nn.Linear(8, 4))
    assert m.weight.data_ptr() == m.weight_orig.data_ptr()
    nn.init.constant_(m.weight, 0.5)  # a user's init after registration still reaches the param
    assert torch.all(m.weight_orig == 0.5)
    net = nn.Sequential(spectral_norm(nn.Linear(8, 4)), spectral_norm(nn.Linear(4, 2)))
    net.apply(lambda mod: nn.init.xavier_uniform_(mod.weight) if isinstance(mod, nn.Linear) else None)
    assert all(torch.equal(layer.weight, layer.weight_orig) for layer in net)


def test_complex_weight_gets_the_right_sigma():
    """Upstream's hook API omits the conjugation; safe_norm's power step and sigma are uᴴWv."""
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(6, 5, dtype=torch.complex128))
    spectral_norm(m)
    W = m.weight_orig.detach()
    sigma = torch.vdot(m.weight_u, W @ m.weight_v)
    exact = torch.linalg.matrix_norm(W, 2)
    assert abs(sigma.imag) < 1e-12 and rel(sigma.real.item(), exact.item()) < 1e-10
    m.train()
    for _ in range(3):  # training steps keep it
        m._forward_pre_hooks[next(iter(m._forward_pre_hooks))](m, ())
    assert rel(torch.linalg.matrix_norm(m.weight.detach(), 2).item(), 1.0) < 1e-10


def test_warmup_can_be_skipped_for_upstreams_behaviour():
    torch.manual_seed(3)
    up = up_sn(nn.Linear(64, 32))
    torch.manual_seed(3)
    ours = spectral_norm(nn.Linear(64, 32), warmup_tol=None)
    assert torch.equal(up.weight_u, ours.weight_u) and torch.equal(up.weight_v, ours.weight_v)


# ------------------------------------------------------------------------ 5. checkpoints cross


def test_old_version_less_checkpoint_loads():
    src = trained(up_sn).train()
    src(torch.randn(2, 6))  # so that the stored `weight` is W_orig / sigma of the stored u, v
    src.eval()
    old = src.state_dict()
    # The pre-1.0 layout: `weight` (normalised) stored, no `weight_v`, no version metadata.
    old = {k: v for k, v in old.items()}
    for prefix in ("0.", "2."):
        layer = src[int(prefix[0])]
        with torch.no_grad():
            old[prefix + "weight"] = layer.weight.detach().clone()
        del old[prefix + "weight_v"]
    ours, theirs = trained(spectral_norm, seed=5), trained(up_sn, seed=5)
    ours.load_state_dict(copy.deepcopy(old), strict=True)
    theirs.load_state_dict(copy.deepcopy(old), strict=True)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert close(ours(x), src(x), rtol=1e-4)


def test_remove_leaves_the_normalised_weight_as_a_parameter():
    net = trained(spectral_norm)
    with torch.no_grad():
        net(torch.randn(2, 6))  # eval forward: `weight` is W_orig / sigma of the current state
    expected = net[0].weight.detach().clone()
    remove_spectral_norm(net[0])
    assert isinstance(net[0].weight, nn.Parameter)
    assert torch.equal(net[0].weight.detach(), expected)
    assert {"weight_orig", "weight_u", "weight_v"}.isdisjoint(net[0].state_dict())
    assert not net[0]._forward_pre_hooks and not net[0]._state_dict_hooks
    net[0].load_state_dict(nn.Linear(6, 8).state_dict(), strict=True)  # upstream fails here


def test_upstream_remove_works_on_safe_norm_and_ours_on_upstream():
    ours = spectral_norm(nn.Linear(6, 3))
    expected = ours.weight_orig.detach() / used_sigma(ours)
    up_remove(ours)
    assert isinstance(ours.weight, nn.Parameter)
    assert torch.allclose(ours.weight.detach(), expected, rtol=1e-5)
    theirs = up_sn(nn.Linear(6, 3))
    remove_spectral_norm(theirs)
    assert isinstance(theirs.weight, nn.Parameter) and not theirs._load_state_dict_pre_hooks


def test_upstream_leaves_a_load_hook_behind_that_we_remove():
    """Documents the upstream defect the difference above fixes (torch 2.13)."""
    m = up_remove(up_sn(nn.Linear(4, 3)))
    with pytest.raises(RuntimeError, match="weight_orig"):
        m.load_state_dict(nn.Linear(4, 3).state_dict(), strict=True)


# --------------------------------------------------------------------- 6. DataParallel semantics


def test_power_iteration_updates_buffers_in_place_and_uses_clones():
    m = spectral_norm(nn.Linear(6, 4))
    u_ptr, v_ptr = m.weight_u.data_ptr(), m.weight_v.data_ptr()
    u_before = m.weight_u.clone()
    m.train()
    nn.init.normal_(m.weight_orig)  # change W so that the step visibly moves u
    m(torch.randn(2, 6))
    assert m.weight_u.data_ptr() == u_ptr and m.weight_v.data_ptr() == v_ptr
    assert not torch.equal(m.weight_u, u_before)
    # eval: no update
    m.eval()
    u_eval = m.weight_u.clone()
    m(torch.randn(2, 6))
    assert torch.equal(m.weight_u, u_eval)


def test_dataparallel_wrapping_runs_on_cpu():
    m = spectral_norm(nn.Linear(6, 4))
    dp = nn.DataParallel(m)  # no GPU: runs the module directly, as upstream documents
    out = dp(torch.randn(3, 6))
    out.sum().backward()
    assert m.weight_orig.grad is not None
