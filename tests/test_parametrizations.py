"""Parametrization API: safe_norm.parametrizations.spectral_norm against torch's, side by side."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as UpstreamSN
from torch.nn.utils.parametrizations import spectral_norm as up_sn

import safe_norm
from safe_norm import _compat
from safe_norm.parametrizations import spectral_norm

from .helpers import (
    ZOO,
    close,
    exact_sigma,
    rel,
    twin,
    used_sigma,
)


def _sn_module(m, name="weight"):
    return m.parametrizations[name][0]


# --------------------------------------------------------------------------- 1. same surface


def test_both_import_paths():
    import safe_norm.parametrizations as p

    assert safe_norm.parametrizations is p and p.spectral_norm is spectral_norm
    assert spectral_norm is not safe_norm.spectral_norm  # the hook API's function


def test_signature_extends_upstream_with_keyword_only_options():
    mine = inspect.signature(spectral_norm).parameters
    up = inspect.signature(up_sn).parameters
    positional = [p for p in mine.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in up.values()]


@pytest.mark.parametrize(
    "factory,dim",
    [(lambda: nn.ConvTranspose2d(4, 6, 3), 1), (lambda: nn.Conv2d(4, 6, 3), 0), (lambda: nn.Linear(4, 6), 0)],
)
def test_prints_keys_and_dims_as_upstream(factory, dim):
    up, ours = up_sn(factory()), spectral_norm(factory())
    assert repr(ours) == repr(up)
    assert isinstance(_sn_module(ours), UpstreamSN) and _sn_module(ours).dim == dim
    assert ours.state_dict().keys() == up.state_dict().keys()
    assert {"parametrizations.weight.original", "parametrizations.weight.0._u",
            "parametrizations.weight.0._v"} <= set(ours.state_dict())
    assert parametrize.is_parametrized(ours, "weight")


def _module_with(weight):
    m = nn.Module()
    m.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
    return m


BAD = {
    "dim out of range": (lambda: nn.Linear(4, 3), dict(dim=2)),
    "dim too negative": (lambda: nn.Linear(4, 3), dict(dim=-3)),
    "n_power_iterations=0": (lambda: nn.Linear(4, 3), dict(n_power_iterations=0)),
    "missing name": (lambda: nn.Linear(4, 3), dict(name="foo")),
    "None parameter": (lambda: nn.Linear(4, 3, bias=False), dict(name="bias")),
    "integer weight": (lambda: _module_with(torch.ones(3, 4, dtype=torch.long)), {}),
    "0-d weight": (lambda: _module_with(torch.tensor(2.0)), {}),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_upstreams_exception_type(case):
    factory, kwargs = BAD[case]
    with pytest.raises(Exception) as theirs:
        up_sn(factory(), **kwargs)
    with pytest.raises(type(theirs.value)):
        spectral_norm(factory(), **kwargs)


def test_integer_weight_gets_a_clear_message():
    with pytest.raises(TypeError, match="Module.weight has dtype torch.int64"):
        spectral_norm(_module_with(torch.ones(3, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="warmup_tol"):
        spectral_norm(nn.Linear(3, 4), warmup_tol=0)


@pytest.mark.parametrize(
    "case",
    ["buffer", "negative dim", "twice"],
)
def test_inputs_upstream_accepts_are_accepted(case):
    make = {
        "buffer": (lambda: nn.BatchNorm1d(3), dict(name="running_mean")),
        "negative dim": (lambda: nn.Linear(4, 3), dict(dim=-1)),
        "twice": (lambda: up_sn(nn.Linear(4, 3)), {}),
    }[case]
    factory, kwargs = make
    up_sn(factory(), **kwargs)
    m = spectral_norm(factory(), **kwargs)
    getattr(m, kwargs.get("name", "weight"))


def test_vector_takes_upstreams_exact_normalize_path():
    up, ours = twin(nn.Linear(5, 7), spectral_norm, up_sn, name="bias")
    assert torch.equal(ours.bias, up.bias)
    assert torch.equal(ours.bias, F.normalize(ours.parametrizations.bias.original, dim=0))


def test_complex_weight_works_as_upstreams():
    torch.manual_seed(0)
    m = _module_with(torch.randn(6, 5, dtype=torch.complex64))
    up, ours = twin(m, spectral_norm, up_sn)
    if _compat.TORCH >= (2, 3):
        assert close(ours.weight, up.weight)  # same state -> same forward
    else:  # MIGRATION O1: upstream's sigma omits the conjugate (torch.dot) before torch 2.3
        p = ours.parametrizations.weight
        W = p.original.detach()
        assert close(ours.weight, W / torch.vdot(p[0]._u, W @ p[0]._v))
        assert rel(torch.linalg.matrix_norm(up.weight.detach(), 2).item(), 1.0) > 0.1
    fresh = spectral_norm(_module_with(torch.randn(6, 5, dtype=torch.complex128))).eval()
    assert rel(torch.linalg.matrix_norm(fresh.weight.detach(), 2).item(), 1.0) < 1e-4


# ------------------------------------------------------------------ 2. valid at registration


@pytest.mark.parametrize("layer", ["Linear512", "Conv2d", "Embedding", "ConvTranspose2d"])
def test_upstreams_fixed_warm_up_is_percent_level_off(layer):
    factory, dim = ZOO[layer]
    torch.manual_seed(0)
    up = up_sn(factory()).eval()
    assert rel(used_sigma(up, dim=dim), exact_sigma(up.parametrizations.weight.original, dim)) > 5e-3


# ------------------------------------------------------------- 3. parametrize machinery works


@pytest.mark.parametrize("leave", [True, False])
def test_remove_parametrizations(leave):
    up, ours = twin(nn.Linear(6, 4), spectral_norm, up_sn)
    for m in (up, ours):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave)
        assert not parametrize.is_parametrized(m) and isinstance(m.weight, nn.Parameter)
    # (leave_parametrized=True runs a training forward: sigma reuses W v, 1-ulp apart)
    assert close(ours.weight, up.weight, rtol=1e-6)


def test_cached_and_functional_call_match_upstream():
    up, ours = twin(nn.Linear(6, 4), spectral_norm, up_sn)
    up.eval(), ours.eval()
    x = torch.randn(3, 6)
    with parametrize.cached():
        assert torch.equal(ours(x), up(x)) and torch.equal(ours(x), ours(x))
    W2 = torch.randn(4, 6)
    key = "parametrizations.weight.original"
    exact = F.linear(x.double(), W2.double() / torch.linalg.matrix_norm(W2.double(), 2), ours.bias.double())
    with torch.no_grad():
        out = functional_call(ours, {key: W2}, (x,))
        # never stale: another weight gets its own sigma (upstream divides by the old one's)
        assert torch.allclose(out.double(), exact, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(functional_call(up, {key: W2}, (x,)).double(), exact, rtol=1e-2)
        W = ours.parametrizations.weight.original.double()  # and back to its own weight:
        own = F.linear(x.double(), W / torch.linalg.matrix_norm(W, 2), ours.bias.double())
        assert torch.allclose(ours(x).double(), own, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_assignment_reconverges_u_v(mode):
    torch.manual_seed(0)
    new = torch.randn(64, 48) * 3
    for fn, expect_valid in ((spectral_norm, True), (up_sn, False)):
        m = getattr(fn(nn.Linear(48, 64)), mode)()
        m.weight = new  # goes through right_inverse
        assert torch.equal(m.parametrizations.weight.original, new)
        with torch.no_grad():
            m(torch.randn(2, 48))
            norm = torch.linalg.matrix_norm(m.weight.double(), 2).item()
        assert (abs(norm - 1) < 1e-4) == expect_valid, (fn.__module__, norm)


def test_assignment_with_warm_up_skipped_is_upstreams():
    torch.manual_seed(0)
    up = up_sn(nn.Linear(8, 6))
    torch.manual_seed(0)
    ours = spectral_norm(nn.Linear(8, 6), warmup_tol=None)
    new = torch.randn(6, 8)
    up.weight, ours.weight = new, new
    assert torch.equal(up.state_dict()["parametrizations.weight.0._u"],
                       ours.state_dict()["parametrizations.weight.0._u"])


def test_u_v_updated_in_place_and_deepcopy_works():
    m = spectral_norm(nn.Linear(6, 4))
    sn = _sn_module(m)
    ptr = sn._u.data_ptr(), sn._v.data_ptr()
    m(torch.randn(2, 6))
    assert (sn._u.data_ptr(), sn._v.data_ptr()) == ptr
    c = copy.deepcopy(m).eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(c(x), m.eval()(x))


# ----------------------------------------------------------------- 5. checkpoints (both ways)


def test_checkpoint_from_upstream_keeps_its_u_v_exactly():
    up = up_sn(nn.Linear(16, 8))
    ours = spectral_norm(nn.Linear(16, 8))
    ours.load_state_dict(up.state_dict(), strict=True)  # load_state_dict is not an assignment
    for k, v in up.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
