"""Whose vectors a layer's state vouches for: its own, judged by their content, also when a
``torch.func.functional_call`` ran it with other buffers; and a checkpoint taken while a
re-convergence is pending holds the vectors the next forward would use, in either library."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from .helpers import APIS, exact_sigma, roundtrip, sn_state

TOL = 1e-4  # the default warm-up tolerance
SHAPE = (300, 200)  # (in, out): both sides above the exact solve's, so Lanczos runs


def _sigma_error(m: nn.Module) -> float:
    """Relative error of the sigma the next eval forward divides by (u, v as they are now)."""
    W, u, v = sn_state(m)
    W = W.detach().double().flatten(1)
    return abs(torch.dot(u.double(), W @ v.double()).item() / exact_sigma(W) - 1)


def _written(api: str) -> nn.Module:
    """A registered layer whose weight was re-initialised afterwards (StudioGAN's init)."""
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(*SHAPE))
    nn.init.orthogonal_(sn_state(m)[0].data, gain=3.0)
    return m


@pytest.mark.parametrize("api", APIS)
def test_functional_call_with_other_buffers_leaves_the_layer_as_it_was(api):
    """The call converges the buffers it was given; the layer's own vectors are not taken as
    converged for it: its next eval forward is what it would have been without the call."""
    m = _written(api)
    before = copy.deepcopy(m)
    x = torch.randn(4, SHAPE[0])
    params = dict(m.named_parameters())
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    out = functional_call(m.eval(), (params, buffers), (x,))
    assert _sigma_error(m) > 0.5  # the call did not touch them: still the old weight's
    expected = before.eval()(x)
    assert torch.equal(m(x), expected)
    assert _sigma_error(m) <= TOL
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)  # the call's own were converged


@pytest.mark.parametrize("api", APIS)
def test_a_checkpoint_taken_while_a_reconvergence_is_pending_is_converged(api):
    """``state_dict()`` after a write settles the re-convergence the next forward would run:
    loaded into a new model of either library, the checkpoint divides by the exact sigma
    (to the tolerance) and gives the original's own next output."""
    ours, theirs = APIS[api]
    m = _written(api)
    sd = roundtrip(m.state_dict())
    assert _sigma_error(m) <= TOL
    x = torch.randn(4, SHAPE[0])
    expected = m.eval()(x)
    for build in (ours, theirs):
        torch.manual_seed(1)
        loaded = build(nn.Linear(*SHAPE))
        loaded.load_state_dict(sd)
        assert _sigma_error(loaded) <= TOL
        assert torch.allclose(loaded.eval()(x), expected, rtol=1e-6, atol=1e-7), build


@pytest.mark.parametrize("api", APIS)
def test_a_checkpoint_of_a_settled_or_trained_layer_changes_nothing(api):
    """With nothing pending, ``state_dict()`` leaves the vectors bitwise as they were, before
    training (converged at registration) and after it (upstream's vectors, as they are)."""
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(*SHAPE))
    for phase in ("registered", "trained"):
        if phase == "trained":
            m.train()(torch.randn(4, SHAPE[0]))
            with torch.no_grad():
                sn_state(m)[0].mul_(1.5)  # a trained layer's writes are upstream's business
        _, u, v = sn_state(m)
        before = u.clone(), v.clone()
        m.state_dict()
        assert torch.equal(u, before[0]) and torch.equal(v, before[1]), phase


def test_a_converted_parametrization_settles_an_assignment_before_a_checkpoint():
    """``safe_norm.convert`` gives upstream's parametrizations the same ``state_dict()``
    settling: after ``m.weight = X`` the checkpoint holds vectors converged for ``X``."""
    import safe_norm

    _, theirs = APIS["parametrization"]
    torch.manual_seed(0)
    m = theirs(nn.Linear(*SHAPE))
    m.train()(torch.randn(4, SHAPE[0]))
    safe_norm.convert(m)
    with torch.no_grad():
        m.weight = 0.3 * torch.randn(SHAPE[1], SHAPE[0])
    loaded = theirs(nn.Linear(*SHAPE))
    loaded.load_state_dict(roundtrip(m.state_dict()))
    assert _sigma_error(loaded) <= TOL
