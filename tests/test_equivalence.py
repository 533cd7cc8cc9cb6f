"""Both APIs against their upstream twins: same random draws, same training, same checkpoints."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .helpers import APIS, PATHS, close, normalisation_path, roundtrip, sn_state, trained, twin


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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", APIS)
@given(
    kind=st.sampled_from(["linear", "conv", "convT"]),
    shape=st.tuples(st.integers(2, 48), st.integers(1, 48)),
    npi=st.integers(1, 3),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_training_trajectory_equals_upstream(api, path, kind, shape, npi, steps, seed):
    with normalisation_path(path):
        _training_trajectory_equals_upstream(api, kind, shape, npi, steps, seed)


def _training_trajectory_equals_upstream(api, kind, shape, npi, steps, seed):
    """From identical u, v: outputs, gradients, weights, u and v equal upstream's (1e-5).

    Measured over about 400 random draws of these strategies per API, each also twice with the
    weights x (1 + 1e-7 N(0, 1)) (another machine's rounding): at most 0.15 of the 1e-5 on
    gradients, 0.07 on outputs and state."""
    # Weight matrices with both sides >= 2 (a conv's are out x in*9; shape[0] is the output
    # side).  A single row or column normalises to W/|W|: its gradient is the difference of
    # two terms that cancel as the gradient turns towards W (for 1x1, always), so a comparison
    # relative to the result's own size fails on rounding (seen: 56x the 1e-5 for a 2x1
    # weight, 4x for 1x25); test_vector_weights compares those at the terms' size.
    assume(not (kind == "linear" and shape[1] == 1))
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", APIS)
@given(kind=st.sampled_from(["linear", "conv"]), seed=st.integers(0, 2**16))
def test_two_forwards_one_backward_and_gradient_penalty(api, path, kind, seed):
    """Measured over 900 random draws per API, each also with the weights x (1 + 1e-7 N(0, 1)):
    at most 0.21 of the 1e-5."""
    ours, theirs = APIS[api]
    module, data = _make(kind, (6, 5), seed)
    up, sn = twin(module, ours, theirs)
    for net, where in ((up, "as shipped"), (sn, path)):
        with normalisation_path(where):
            torch.manual_seed(seed)
            real, fake = data(4), data(4)
            loss = net(real).mean() - net(fake).mean()  # D(real) - D(fake): two forwards, one backward
            x = data(4).requires_grad_(True)
            (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
            # R1's |grad_x D|^2, not WGAN-GP's (|grad_x D| - 1)^2: a normalised layer has
            # |grad_x D| close to 1, and the rounding of |grad_x D| - 1, either library's, is then
            # amplified by 1 / ||grad_x D| - 1| (seen: 0.68 of the 1e-5 at |grad_x D| - 1 = -0.033;
            # upstream against itself with its weights x (1 + 1e-7 N(0, 1)): up to 0.49 there).
            loss = loss + 10 * gx.flatten(1).norm(dim=1).square().mean()
            loss.backward()  # double backward through the normalisation
    for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
        assert close(b.grad, a.grad), name
    for name, a in _state(up).items():
        assert close(_state(sn)[name], a), name


class _Ops(TorchDispatchMode):
    """The aten ops dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("api", APIS)
def test_small_layers_train_on_upstreams_graph(api):
    """Below ``_power.FUSED_MIN`` entries a training step is upstream's autograd graph (no
    Python ``autograd.Function``) and dispatches at most 5 ops more than upstream's forward (an
    ``eq`` and a ``where`` per normalisation keep zero or non-finite vectors; ``eq``, cast and
    ``add`` divide a zero weight by 1) and no more than its backward: on small layers the op
    count is the step's cost (256x20 on one CPU thread: 21 against 16-17 forward ops, 1.15-1.2x
    upstream's time, benchmarks/training.py).  Fails with the Function or a ``torch.where``
    guard."""
    ours, theirs = APIS[api]
    counts = {}
    for name, sn in (("ours", ours), ("upstream", theirs)):
        torch.manual_seed(0)
        layer = sn(nn.Linear(20, 256, bias=False)).train()
        grad = torch.randn(256, 20)
        layer(torch.randn(1, 20))  # first-call costs, and safe_norm's first training forward
        layer.weight.grad = None
        with _Ops() as forward:
            out = layer(torch.randn(1, 20))
        weight = layer.weight  # the parametrization's is computed again: its own count
        with _Ops() as backward:
            (out.sum() + (weight * grad).sum()).backward()
        counts[name] = (len(forward.names), len(backward.names))
        if name == "ours":
            assert type(weight.grad_fn).__name__ == "DivBackward0"
    (fwd, bwd), (fwd_up, bwd_up) = counts["ours"], counts["upstream"]
    assert fwd <= fwd_up + 5 and bwd <= bwd_up, counts


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", ["linear", "conv", "convT"])
def test_small_layers_train_bit_for_bit_as_upstream(api, kind):
    """From identical u, v, a small layer (upstream's graph, its power step with guards that
    keep the same values where a norm is usable) gives upstream's outputs, gradients, weights
    and vectors bitwise over SGD steps: the same ops on the same values in the same order, so
    on any machine.  (The closed form, above ``FUSED_MIN``, agrees to rounding instead.)"""
    ours, theirs = APIS[api]
    for seed in range(3):
        module, data = _make(kind, (12, 10), seed)
        up, sn = twin(module, ours, theirs)
        opt_up = torch.optim.SGD(up.parameters(), lr=0.05, momentum=0.9)
        opt_sn = torch.optim.SGD(sn.parameters(), lr=0.05, momentum=0.9)
        for _ in range(5):
            x = data(4)
            out_up, out_sn = up(x), sn(x)
            assert torch.equal(out_sn, out_up)
            out_up.square().mean().backward()
            out_sn.square().mean().backward()
            for a, b in zip(up.parameters(), sn.parameters(), strict=True):
                assert torch.equal(b.grad, a.grad)
            opt_up.step(), opt_sn.step()
            opt_up.zero_grad(), opt_sn.zero_grad()
        for name, a in _state(up).items():
            assert torch.equal(_state(sn)[name], a), name


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 48), (48, 1)])
def test_vector_weights(api, shape):
    """A weight with one row or one column normalises to W/|W|; its gradient g/σ - <g, W/σ> W/σ²
    (g = dL/d(W/σ)) is the difference of two terms of size |g|/σ, which cancel as g turns
    towards W (for a 1x1 weight, always).  Compared at the terms' size: rounding of each is a
    few float32 ulps of it (measured: at most 2.4e-7 |g|/σ over 100 seeds per shape and API, each
    also with the weights x (1 + 1e-7 N(0, 1)), one in ten with g parallel to a row W)."""
    ours, theirs = APIS[api]
    rows, cols = shape
    for seed in range(8):
        torch.manual_seed(seed)
        up, sn = twin(nn.Linear(cols, rows), ours, theirs)
        W = sn_state(up)[0]
        x = W.clone() if seed == 0 and rows == 1 else torch.randn(3, cols)  # g parallel to W
        for net in (up, sn):
            net(x).sum().backward()
        g = x.sum(0).expand(rows, cols)  # dL/dW_sn of L = sum(x W_snᵀ + b)
        scale = (g.norm() / W.norm()).item()  # σ = |W| for a single row or column
        for (name, a), b in zip(up.named_parameters(), sn.parameters(), strict=True):
            assert (a.grad - b.grad).abs().max().item() <= 1e-6 * scale, (seed, name)


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


# ------------------------------------------------------------- training, as a user observes it
#
# From identical u, v the first step's gradients agree with upstream's to float32 rounding (the
# fused backward computes the same closed form with other roundings).  After that, no two runs
# agree more closely than their rounding lets them: Adam with betas (0, 0.9) takes sign-like
# steps, so a rounding difference in a small gradient entry becomes a full step of difference.
# The claim is therefore relative to a control: after STEPS steps safe_norm is no further from
# upstream than upstream is from itself when every gradient is multiplied by 1 + 1e-7 N(0, 1)
# (or its weights once, before the first step: a stand-in for another machine's rounding).
#
# SiLU, not LeakyReLU: with a kink, a pre-activation within rounding of 0 switches a unit's
# slope, and a gradient differs by 1e-2 between any two roundings, upstream's own included (seen
# on a 64-256-256-1 LeakyReLU discriminator: one seed in 20, a pre-activation at 4.5e-8, in its
# first step); that says nothing about the spectral norm.

STEPS = 20
SEEDS = range(5)


def _discriminator(sn):
    return nn.Sequential(sn(nn.Conv2d(3, 16, 4, 2, 1)), nn.SiLU(), sn(nn.Conv2d(16, 32, 4, 2, 1)), nn.SiLU(),
                         nn.Flatten(), sn(nn.Linear(32 * 4 * 4, 1)))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def _train(net, optimizer, seed: int, grad_noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameters after STEPS GAN discriminator steps on seeded data, the first step's gradient)."""
    net = copy.deepcopy(net)
    opt = optimizer(net.parameters())
    data = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    first = None
    for _ in range(STEPS):
        real, fake = (torch.randn(8, 3, 16, 16, generator=data) for _ in range(2))
        loss = F.softplus(-net(real)).mean() + F.softplus(net(fake)).mean()
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = _flat(p.grad for p in net.parameters())
        for p in net.parameters() if grad_noise else ():
            p.grad.mul_(1 + grad_noise * torch.randn(p.grad.shape, generator=noise))
        opt.step()
    return _flat(net.parameters()), first


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", APIS)
def test_training_is_as_close_to_upstream_as_upstream_is_to_itself(api, path):
    """Measured (2 APIs x 40 seeds x 3 roundings: as here, and the weights x (1 + 1e-7 N) first;
    the statistics over groups of 5 seeds), with d = |p - p_upstream| / |p_upstream - p_start|:

    * first gradient, |g - g_up| / |g_up| over all parameters: <= 4.6e-7 (bound 1e-5);
    * SGD: d <= 1.12x the control's, every seed (bound 2x); |p - p_up| / |p_up| <= 3.5e-8 (1e-5);
    * Adam: one seed in ten is 3-40x the gradient control's (a small entry's sign); median over
      5 seeds <= 1.09x it (bound 2x), and <= 0.35x the weight control's (bound 1x).

    Broken on purpose (the fused backward's gradient x (1 + f N(0, 1)), or x (1 + 1e-4)), the
    sweep gives: f = 1e-5, 1.1e-5 on the first gradient, Adam 5x and 1.7x the controls' medians,
    SGD 6-7x; f = 1e-4, Adam about 40x and 13x, SGD 50-60x; the scale 1e-4 shows on the first
    gradient and SGD (57x), not in Adam (invariant to scale).  This test, with
    ``_Normalise.backward`` so patched in the running process, fails: x (1 + 1e-4) and
    f = 1e-5 at the first gradient, f = 3e-6 at the SGD control, and f >= 1e-5 on Adam's steps
    only at the Adam median.  (Measured on the closed form; the graph, taken as shipped by this
    model's small layers, is upstream's own.)"""
    with normalisation_path(path):
        _training_is_as_close_to_upstream_as_upstream_is_to_itself(api)


def _training_is_as_close_to_upstream_as_upstream_is_to_itself(api):
    ours, theirs = APIS[api]
    adam = lambda p: torch.optim.Adam(p, lr=2e-4, betas=(0.0, 0.9))
    sgd = lambda p: torch.optim.SGD(p, lr=1e-2)
    adam_d = {"ours": [], "gradients": [], "weights": []}
    for seed in SEEDS:
        torch.manual_seed(seed)
        up = _discriminator(theirs)
        sn = _discriminator(ours)
        sn.load_state_dict(up.state_dict())  # identical weights, u and v
        rounded = copy.deepcopy(up)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 2)
            for p in rounded.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
        start = _flat(up.parameters())
        for name, optimizer in (("adam", adam), ("sgd", sgd)):
            p_up, g_up = _train(up, optimizer, seed)
            p_sn, g_sn = _train(sn, optimizer, seed)
            p_ctl, _ = _train(up, optimizer, seed, grad_noise=1e-7)
            moved = (p_up - start).norm()
            d_sn, d_ctl = (p_sn - p_up).norm() / moved, (p_ctl - p_up).norm() / moved
            if name == "sgd":
                assert (g_sn - g_up).norm() <= 1e-5 * g_up.norm(), seed
                assert d_sn <= 2 * d_ctl, (seed, d_sn.item(), d_ctl.item())
                assert (p_sn - p_up).norm() <= 1e-5 * p_up.norm(), seed
            else:
                p_w, _ = _train(rounded, optimizer, seed)
                adam_d["ours"].append(d_sn.item())
                adam_d["gradients"].append(d_ctl.item())
                adam_d["weights"].append(((p_w - p_up).norm() / moved).item())
    median = {k: statistics.median(v) for k, v in adam_d.items()}
    assert median["ours"] <= 2 * median["gradients"], adam_d
    assert median["ours"] <= median["weights"], adam_d
