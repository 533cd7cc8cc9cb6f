"""Never stale: a weight changed outside training gets u, v re-converged at the next forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safe_norm

from .helpers import APIS, rel, sn_state, trained, used_sigma


def _weight(m):
    """The tensor a user re-initialises: the parameter itself in either API."""
    return sn_state(m)[0] if hasattr(m, "parametrizations") else m.weight_orig


def _sigma_error(m):
    W = _weight(m).detach().double()
    return rel(used_sigma(m), torch.linalg.matrix_norm(W, 2).item())


CHANGES = {
    "nn.init on the parameter": lambda m: nn.init.normal_(_weight(m), std=3.0),
    "copy_ under no_grad": lambda m: _no_grad(lambda: _weight(m).copy_(torch.randn_like(_weight(m)) * 5)),
    "net.apply(init_fn)": lambda m: nn.Sequential(m).apply(
        lambda mod: nn.init.kaiming_uniform_(_weight(mod), a=5) if mod is m else None
    ),
    "to(float64)": lambda m: m.double(),
}


def _no_grad(fn):
    with torch.no_grad():
        fn()


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_change_before_training_is_seen_at_the_next_forward(api, change, mode):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    m, up = ours(nn.Linear(96, 64)), theirs(nn.Linear(96, 64))
    for net in (m, up):
        CHANGES[change](net)
        getattr(net, mode)()
        net(torch.randn(2, 96, dtype=_weight(net).dtype))
    assert _sigma_error(m) < 1e-4
    if change != "to(float64)":  # same values: upstream's vectors are as good as before
        assert _sigma_error(up) > 1e-3  # upstream's stale (or random) vectors


def test_hook_api_init_through_module_weight_reaches_and_is_seen():
    """`net.apply(init_fn)` writing `m.weight` (shared storage until the first forward)."""
    m = safe_norm.spectral_norm(nn.Linear(96, 64))
    nn.init.normal_(m.weight, std=3.0)
    assert torch.equal(m.weight, m.weight_orig)
    m.eval()(torch.randn(2, 96))
    assert _sigma_error(m) < 1e-4


@pytest.mark.parametrize("api", APIS)
def test_after_training_starts_it_is_upstream(api):
    """A change after a training forward is left to the power iteration, as upstream does."""
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(32, 16))
    m(torch.randn(2, 32))  # training has started
    twin = theirs(nn.Linear(32, 16))
    twin.load_state_dict(m.state_dict())
    for net in (m, twin):
        with torch.no_grad():
            _weight(net).mul_(2).add_(1)
        net(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    for (k, a), b in zip(twin.state_dict().items(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_load_keeps_the_checkpoints_u_v_and_outputs_bit_for_bit(api, mode):
    ours, theirs = APIS[api]
    for source_fn in (ours, theirs):
        src = trained(source_fn, seed=3)
        fresh = trained(ours, seed=4, steps=0)  # never trained: watching for changes
        fresh.load_state_dict(src.state_dict(), strict=True)
        src.train(mode == "train"), fresh.train(mode == "train")
        x = torch.randn(5, 6)
        assert torch.equal(fresh(x), src(x))
        for (k, a), b in zip(src.state_dict().items(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_warm_up_skipped_means_no_checks():
    m = safe_norm.spectral_norm(nn.Linear(32, 16), warmup_tol=None)
    u = m.weight_u.clone()
    nn.init.normal_(m.weight_orig)
    m.eval()(torch.randn(2, 32))
    assert torch.equal(m.weight_u, u)
