"""Zero and non-finite weights (issue 6, items 1-2): finite outputs, no u/v trap, clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from .helpers import APIS, exact_sigma, rel, sn_state, used_sigma


def _zero_layer(ours):
    m = nn.Linear(16, 8)
    nn.init.zeros_(m.weight)
    return ours(m)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_weight_gives_zeros_not_nan(api, mode):
    ours, theirs = APIS[api]
    m = getattr(_zero_layer(ours), mode)()
    x = torch.randn(4, 16)
    out = m(x)
    out.sum().backward()
    assert torch.equal(out, m.bias.expand(4, 8))  # W_sn = 0: the output is the bias
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    _, u, v = sn_state(m)
    assert u.norm() > 0.99 and v.norm() > 0.99  # unit vectors still, not 0
    up = getattr(_zero_layer(theirs), mode)()
    assert torch.isnan(up(x)).all()  # upstream: 0/0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("repair", ["nn.init in place", "load_state_dict"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_at_registration_then_real_weights(api, repair, mode):
    ours, _ = APIS[api]
    m = _zero_layer(ours)
    m(torch.randn(2, 16))  # a forward on the zero weight (training mode): u, v must survive it
    if repair == "nn.init in place":
        m = _zero_layer(ours)  # never trained: the change is watched
        nn.init.normal_(sn_state(m)[0])
    else:
        source = ours(nn.Linear(16, 8))
        source(torch.randn(2, 16))
        m.load_state_dict(source.state_dict())
    getattr(m, mode)()
    m(torch.randn(2, 16))
    assert rel(used_sigma(m), exact_sigma(sn_state(m)[0])) < (1e-4 if repair.startswith("nn") else 1e-2)


@pytest.mark.parametrize("api", APIS)
def test_power_iteration_resumes_after_a_zero_weight_in_training(api):
    """Training on an all-zero weight, then real values: upstream is NaN forever, we resume."""
    ours, theirs = APIS[api]
    for fn, expect_finite in ((ours, True), (theirs, False)):
        torch.manual_seed(0)
        m = _zero_layer(fn)
        m(torch.randn(2, 16))  # training forward on zeros
        with torch.no_grad():
            sn_state(m)[0].copy_(torch.randn(8, 16))
        for _ in range(30):
            out = m(torch.randn(2, 16))
        assert bool(torch.isfinite(out).all()) == expect_finite


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_at_registration_is_an_error(api, bad):
    ours, _ = APIS[api]
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"Linear\.weight contains NaN or infinite values"):
        ours(m)


@pytest.mark.parametrize("api", APIS)
def test_a_transient_nan_does_not_poison_u_v(api):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(16, 8))
    m(torch.randn(2, 16))  # training has started
    weight = sn_state(m)[0]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    m(torch.randn(2, 16))  # a training forward on the broken weight
    _, u, v = sn_state(m)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    with torch.no_grad():
        weight.copy_(saved)
    m(torch.randn(2, 16))
    assert rel(used_sigma(m), exact_sigma(weight)) < 1e-4


@settings(max_examples=30)
@given(
    api=st.sampled_from(list(APIS)),
    rows=st.integers(1, 160),
    cols=st.integers(1, 160),
    rank=st.integers(1, 4),
    log_scale=st.sampled_from([-30, -10, 0, 10, 30]),
    seed=st.integers(0, 2**16),
)
def test_degenerate_shapes_ranks_and_scales(api, rows, cols, rank, log_scale, seed):
    """Rank-one and rank-deficient, 1xn, nx1, 1x1, scaled by 1e-30 ... 1e30 (float32)."""
    ours, _ = APIS[api]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g, dtype=torch.float64)
    W = (W / W.abs().max() * 10.0**log_scale).float()
    assume(bool(W.abs().max() > 0) and bool(torch.isfinite(W).all()))
    m = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        m.weight.copy_(W)
    m = ours(m)
    exact = exact_sigma(sn_state(m)[0])
    assert rel(used_sigma(m), exact) < 1e-4
    for mode in ("train", "eval"):
        getattr(m, mode)()
        out = m(torch.randn(2, cols))
        assert torch.isfinite(out).all()
        normalised = torch.linalg.matrix_norm(m.weight.detach().double(), 2).item()
        assert normalised <= 1 + 1e-3
