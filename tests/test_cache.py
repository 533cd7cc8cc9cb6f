"""The eval cache: the normalised weight is reused while nothing changed, and only then."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from .helpers import APIS, close, sn_state, twin


def _eval_weight(m, x):
    m(x)
    return m.weight


@pytest.mark.parametrize("api", APIS)
def test_reused_under_no_grad_and_equal_to_upstream(api):
    ours, theirs = APIS[api]
    up, sn = twin(nn.Linear(8, 5), ours, theirs)
    up.eval(), sn.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = _eval_weight(sn, x)
        assert _eval_weight(sn, x) is first
        assert torch.equal(sn(x), up(x))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    "change",
    ["weight in place", "u in place", "load_state_dict", "to(float64)", "training step"],
)
def test_invalidated_by_every_change(api, change):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(8, 5))
    m(torch.randn(2, 8))  # training has started: changes are left to upstream's logic
    m.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = _eval_weight(m, x).clone()
    weight, u, v = sn_state(m)
    if change == "weight in place":
        with torch.no_grad():
            weight[0].mul_(3)
    elif change == "u in place":
        with torch.no_grad():
            u.copy_(-u)  # the sign of u flips the sign of sigma
    elif change == "load_state_dict":
        other = ours(nn.Linear(8, 5))
        other(torch.randn(2, 8))
        m.load_state_dict(other.state_dict())
    elif change == "to(float64)":
        m.double()
        x = x.double()
    else:
        m.train()
        m(torch.randn(2, 8)).sum().backward()
        torch.optim.SGD(m.parameters(), lr=1.0).step()
        m.eval()
    with torch.no_grad():
        after = _eval_weight(m, x)
    twin_up = theirs(nn.Linear(8, 5)).to(after.dtype).eval()
    twin_up.load_state_dict(m.state_dict())
    with torch.no_grad():
        twin_up(x.to(after.dtype))
    if change == "to(float64)":
        assert after.dtype == torch.float64
    else:
        assert not torch.equal(after, before)
    assert close(after, twin_up.weight, rtol=1e-6)  # what upstream computes from the same state


@pytest.mark.parametrize("api", APIS)
def test_grad_enabled_in_eval_builds_the_graph(api):
    ours, _ = APIS[api]
    m = ours(nn.Linear(8, 5)).eval()
    x = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        m(x)
    out = m(x)  # e.g. a gradient-based attack on an eval model
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("api", APIS)
def test_inference_mode_then_no_grad(api):
    ours, _ = APIS[api]
    m = ours(nn.Linear(8, 5)).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        a = m(x)
        assert _eval_weight(m, x) is _eval_weight(m, x)
    with torch.no_grad():
        b = m(x)
        assert not m.weight.is_inference()
    assert torch.equal(a, b)


@pytest.mark.parametrize("api", APIS)
def test_copies_and_pickles_do_not_share_the_cache(api):
    ours, _ = APIS[api]
    m = ours(nn.Linear(8, 5)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        m(x)
        c = copy.deepcopy(m)
        with torch.no_grad():
            sn_state(c)[0].mul_(3)
        assert not torch.equal(c(x), m(x))
    if api == "hook":  # the parametrization API refuses torch.save(module), as upstream does
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))


@pytest.mark.parametrize("api", APIS)
def test_an_edit_of_the_cached_weight_is_undone_as_upstream_would(api):
    ours, theirs = APIS[api]
    up, sn = twin(nn.Linear(8, 5), ours, theirs)
    up.eval(), sn.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        for m in (up, sn):
            m(x)
            if api == "hook":
                m.weight.mul_(0)  # an in-place edit of the normalised weight
        assert torch.equal(sn(x), up(x))
