"""Both APIs against their upstream twins: same random draws, same training, same checkpoints."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from .helpers import APIS, close, roundtrip, trained, twin


def _seeded_model(sn):
    torch.manual_seed(1234)
    return nn.Sequential(
        sn(nn.Conv2d(3, 16, 3)),
        nn.LeakyReLU(0.2),
        sn(nn.ConvTranspose2d(16, 8, 4)),
        nn.Flatten(),
        sn(nn.Linear(8 * 33 * 33, 10)),
        sn(nn.Linear(10, 1), n_power_iterations=3),
        sn(nn.Linear(1, 1), name="bias"),  # a 1-D tensor
    )


@pytest.mark.parametrize("api", APIS)
def test_seeded_construction_draws_upstreams_random_numbers(api):
    ours, theirs = APIS[api]
    up = _seeded_model(theirs)
    after_up = torch.random.get_rng_state()
    mine = _seeded_model(ours)
    assert torch.equal(after_up, torch.random.get_rng_state())
    for (k1, p1), (k2, p2) in zip(up.named_parameters(), mine.named_parameters(), strict=True):
        assert k1 == k2 and torch.equal(p1, p2), k1
    assert [k for k, _ in up.named_buffers()] == [k for k, _ in mine.named_buffers()]
    # with the warm-up skipped, the whole state is upstream's, bit for bit
    skipped = _seeded_model(lambda m, **kw: ours(m, warmup_tol=None, **kw))
    for (k1, t1), (k2, t2) in zip(up.state_dict().items(), skipped.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(t1, t2), k1


def _make(kind, shape, seed):
    torch.manual_seed(seed)
    out_c, in_c = shape
    if kind == "linear":
        return nn.Linear(in_c, out_c), (lambda n: torch.randn(n, in_c))
    if kind == "conv":
        return nn.Conv2d(in_c, out_c, 3, padding=1), (lambda n: torch.randn(n, in_c, 6, 6))
    return nn.ConvTranspose2d(in_c, out_c, 3), (lambda n: torch.randn(n, in_c, 5, 5))


def _state(net):
    return {**dict(net.named_parameters()), **dict(net.named_buffers())}


@pytest.mark.parametrize("api", APIS)
@given(
    kind=st.sampled_from(["linear", "conv", "convT"]),
    shape=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    npi=st.integers(1, 3),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_training_trajectory_equals_upstream(api, kind, shape, npi, steps, seed):
    """From identical u, v: outputs, gradients, weights, u and v equal upstream's (1e-5)."""
    # A 1x1 weight normalises to its sign: its gradient is 0 up to the rounding of two
    # cancelling terms, which no relative comparison can judge (test_one_by_one_weight).
    assume(not (kind == "linear" and shape == (1, 1)))
    ours, theirs = APIS[api]
    module, data = _make(kind, shape, seed)
    up, sn = twin(module, ours, theirs, n_power_iterations=npi)
    opt_up = torch.optim.SGD(up.parameters(), lr=0.05, momentum=0.9)
    opt_sn = torch.optim.SGD(sn.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = data(4)
        out_up, out_sn = up(x), sn(x)
        assert close(out_sn, out_up)
        out_up.square().mean().backward()
        out_sn.square().mean().backward()
        for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
            assert close(b.grad, a.grad), name
        opt_up.step(), opt_sn.step()
        opt_up.zero_grad(), opt_sn.zero_grad()
        state_up, state_sn = _state(up), _state(sn)
        assert state_up.keys() == state_sn.keys()
        for name in state_up:
            assert close(state_sn[name], state_up[name]), name
    up.eval(), sn.eval()
    with torch.no_grad():
        x = data(3)
        assert close(sn(x), up(x))


@pytest.mark.parametrize("api", APIS)
@given(kind=st.sampled_from(["linear", "conv"]), seed=st.integers(0, 2**16))
def test_two_forwards_one_backward_and_gradient_penalty(api, kind, seed):
    ours, theirs = APIS[api]
    module, data = _make(kind, (6, 5), seed)
    up, sn = twin(module, ours, theirs)
    for net in (up, sn):
        torch.manual_seed(seed)
        real, fake = data(4), data(4)
        loss = net(real).mean() - net(fake).mean()  # D(real) - D(fake): two forwards, one backward
        x = data(4).requires_grad_(True)
        (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        loss = loss + 10 * (gx.flatten(1).norm(dim=1) - 1).square().mean()
        loss.backward()  # double backward through the normalisation
    for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
        assert close(b.grad, a.grad), name
    for name, a in _state(up).items():
        assert close(_state(sn)[name], a), name


@pytest.mark.parametrize("api", APIS)
def test_one_by_one_weight(api):
    ours, theirs = APIS[api]
    up, sn = twin(nn.Linear(1, 1), ours, theirs)
    for net in (up, sn):
        net(torch.tensor([[3.0]])).sum().backward()
    sigma = up.weight_orig.abs().item() if api == "hook" else up.parametrizations.weight.original.abs().item()
    scale = 3.0 / sigma  # |dL/dW_sn| / sigma: the size of each of the two cancelling terms
    for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max().item() <= 1e-6 * scale, name


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("direction", ["upstream->safe_norm", "safe_norm->upstream"])
def test_state_dict_crosses_over_strict(api, direction):
    ours, theirs = APIS[api]
    src_fn, dst_fn = (theirs, ours) if direction.startswith("up") else (ours, theirs)
    src, dst = trained(src_fn, seed=0), trained(dst_fn, seed=1)
    assert dst.state_dict().keys() == src.state_dict().keys()
    assert dst.state_dict()._metadata == src.state_dict()._metadata
    dst.load_state_dict(roundtrip(src.state_dict()), strict=True)
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", ["linear", "convT"])
def test_double_backward_with_respect_to_the_weight(api, kind):
    """grad of a function of grad_W (a Hessian-vector product), as upstream's autograd gives."""
    ours, theirs = APIS[api]
    module, data = _make(kind, (5, 4), seed=7)
    up, sn = twin(module, ours, theirs)
    torch.manual_seed(1)
    x = data(3)
    for net in (up, sn):
        (weight,) = [p for n, p in net.named_parameters() if "weight" in n]
        (g,) = torch.autograd.grad(net(x).square().sum(), weight, create_graph=True)
        g.square().sum().backward()
    for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
        assert close(b.grad, a.grad, rtol=1e-5), name
