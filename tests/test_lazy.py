"""Lazy modules: deferred registration, initialize_now, checkpoints into lazy models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import safe_norm
import safe_norm.parametrizations as sn_param
from safe_norm import initialize_now
from safe_norm._lazy import Pending

from .helpers import APIS, exact_sigma, roundtrip, sn_state

LAZY = {
    "LazyLinear": (lambda: nn.LazyLinear(12), lambda: torch.randn(3, 20), 0),
    "LazyConv1d": (lambda: nn.LazyConv1d(8, 3), lambda: torch.randn(2, 5, 9), 0),
    "LazyConv2d": (lambda: nn.LazyConv2d(8, 3), lambda: torch.randn(2, 5, 9, 9), 0),
    "LazyConv3d": (lambda: nn.LazyConv3d(4, 2), lambda: torch.randn(1, 3, 5, 5, 5), 0),
    "LazyConvTranspose2d": (lambda: nn.LazyConvTranspose2d(6, 3), lambda: torch.randn(2, 5, 7, 7), 1),
}


def _reference(m: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The concrete layer's forward with weight ``W``."""
    if isinstance(m, nn.Linear):
        return F.linear(x, W, m.bias)
    if isinstance(m, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, W, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    return m._conv_forward(x, W, m.bias)


def _no_pending(net: nn.Module) -> bool:
    return not any(
        isinstance(getattr(h, "hook", h), Pending) or isinstance(getattr(getattr(h, "hook", h), "__self__", None), Pending)
        for m in net.modules()
        for hooks in (m._forward_pre_hooks, m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks)
        for h in hooks.values()
    )


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("layer", LAZY)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_first_forward_is_already_normalised(api, layer, mode):
    ours, _ = APIS[api]
    factory, data, dim = LAZY[layer]
    torch.manual_seed(0)
    m = getattr(ours(factory()), mode)()
    x = data()
    y = m(x)
    weight = sn_state(m)[0]
    exact = exact_sigma(weight, dim)
    ref = _reference(m, x, (weight.double() / exact).float())
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert _no_pending(m) and not isinstance(m, nn.modules.lazy.LazyModuleMixin)


@pytest.mark.parametrize("api", APIS)
def test_completed_module_is_indistinguishable_from_eager(api):
    ours, theirs = APIS[api]
    lazy = ours(nn.LazyConvTranspose2d(6, 3))
    lazy(torch.randn(1, 5, 4, 4))
    eager = ours(nn.ConvTranspose2d(5, 6, 3))
    # (parametrize makes a new class per registration: compare what it is made of)
    assert type(lazy).__name__ == type(eager).__name__ and type(lazy).__bases__ == type(eager).__bases__
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    assert lazy.state_dict()._metadata == eager.state_dict()._metadata
    assert [k for k, _ in lazy.named_parameters()] == [k for k, _ in eager.named_parameters()]
    assert [type(h).__name__ for h in lazy._forward_pre_hooks.values()] == [
        type(h).__name__ for h in eager._forward_pre_hooks.values()
    ]
    upstream = theirs(nn.ConvTranspose2d(5, 6, 3))  # and its checkpoint is upstream's format
    upstream.load_state_dict(lazy.state_dict(), strict=True)
    x = torch.randn(1, 5, 4, 4)
    with torch.no_grad():
        assert torch.equal(upstream.eval()(x), lazy.eval()(x))


@pytest.mark.parametrize("api", APIS)
def test_lazy_layers_deep_inside_a_model(api):
    ours, _ = APIS[api]
    net = nn.Sequential(
        nn.Sequential(ours(nn.LazyConv2d(8, 3)), nn.LeakyReLU(0.2), nn.LazyBatchNorm2d()),
        nn.Flatten(),
        nn.Sequential(ours(nn.LazyLinear(16)), nn.ReLU()),
        ours(nn.Linear(16, 1)),  # an eager one next to them (a partially specified model)
    )
    net(torch.randn(4, 3, 8, 8))
    for layer in (net[0][0], net[2][0], net[3]):
        assert sn_state(layer)[0].dim() >= 2 and _no_pending(layer)


@pytest.mark.parametrize("api", APIS)
def test_initialize_now_with_an_example_changes_no_training_state(api):
    ours, _ = APIS[api]
    net = nn.Sequential(ours(nn.LazyLinear(8)), nn.LazyBatchNorm1d(), nn.Dropout(0.5), ours(nn.LazyLinear(1)))
    net.train()
    net[2].eval()  # a mix of modes, restored as it was
    assert initialize_now(net, torch.randn(16, 20)) is net
    assert [m.training for m in net] == [True, True, False, True]
    assert all(m.training for m in net[0].modules()) and all(m.training for m in net[3].modules())
    bn = net[1]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and bn.num_batches_tracked.item() == 0
    assert all(p.grad is None for p in net.parameters())
    assert _no_pending(net)
    for layer in (net[0], net[3]):  # warmed up, and no power iteration since
        W = sn_state(layer)[0]
        _, u, v = sn_state(layer)
        assert abs(torch.dot(u, W @ v).item() - exact_sigma(W)) < 1e-4 * exact_sigma(W)


def test_initialize_now_without_inputs():
    m = safe_norm.spectral_norm(nn.LazyLinear(4))
    m.initialize_parameters(torch.randn(2, 3))  # materialised by hand: the pending one is ready
    initialize_now(m)
    assert sorted(m.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]
    net = nn.Sequential(safe_norm.spectral_norm(nn.LazyLinear(4)), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(RuntimeError, match=r"0, 2 still have uninitialised parameters; pass an example input"):
        initialize_now(net)


def test_initialize_now_bad_input_and_nothing_pending():
    with pytest.raises(TypeError, match="nn.Module"):
        initialize_now(torch.zeros(3))
    net = safe_norm.spectral_norm(nn.Linear(3, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert initialize_now(net) is net and initialize_now(net, torch.randn(1, 3)) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("source", ["safe_norm", "upstream"])
def test_eager_checkpoint_loads_into_a_fresh_lazy_model(api, source):
    ours, theirs = APIS[api]
    make = ours if source == "safe_norm" else theirs
    torch.manual_seed(0)
    src = nn.Sequential(make(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(), make(nn.Linear(8 * 6 * 6, 5)))
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    for _ in range(2):
        src(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step(), opt.zero_grad()
    lazy = nn.Sequential(ours(nn.LazyConv2d(8, 3)), nn.ReLU(), nn.Flatten(), ours(nn.LazyLinear(5)))
    rng = torch.random.get_rng_state()
    lazy.load_state_dict(roundtrip(src.state_dict()), strict=True)
    assert torch.equal(rng, torch.random.get_rng_state())  # a load draws no random numbers
    assert _no_pending(lazy)
    for (k, a), b in zip(src.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 8, 8)
    src.eval(), lazy.eval()
    with torch.no_grad():
        assert torch.equal(lazy(x), src(x))


def test_plain_lazy_checkpoint_loads_and_completes():
    src = nn.LazyLinear(4)
    src(torch.randn(1, 6))
    m = safe_norm.spectral_norm(nn.LazyLinear(4))
    m.load_state_dict(src.state_dict())
    assert torch.equal(m.weight_orig, src.weight)
    assert abs(torch.dot(m.weight_u, m.weight_orig @ m.weight_v).item() - exact_sigma(src.weight)) < 1e-4


def test_registration_errors_that_need_no_shape_are_raised_at_once():
    with pytest.raises(ValueError, match="n_power_iterations"):
        safe_norm.spectral_norm(nn.LazyLinear(3), n_power_iterations=0)
    with pytest.raises(ValueError, match="n_power_iterations"):
        sn_param.spectral_norm(nn.LazyLinear(3), n_power_iterations=0)
    with pytest.raises(RuntimeError, match="two spectral_norm hooks"):
        safe_norm.spectral_norm(safe_norm.spectral_norm(nn.LazyLinear(3)))


# ---------------------------------------------------------- the seed notebook's exercises


@pytest.mark.parametrize("api", APIS)
def test_wrong_input_size_after_initialisation_gets_torchs_usual_error(api):
    ours, _ = APIS[api]
    net = nn.Sequential(ours(nn.LazyLinear(256)), nn.ReLU(), ours(nn.LazyLinear(10)))
    net(torch.rand(2, 20))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        net(torch.rand(2, 30))


@pytest.mark.parametrize("api", APIS)
def test_partially_specified_shapes_initialise_in_one_forward(api):
    ours, _ = APIS[api]
    net = nn.Sequential(ours(nn.Linear(20, 256)), nn.ReLU(), ours(nn.LazyLinear(10)))
    y = net(torch.rand(2, 20))
    assert y.shape == (2, 10) and sn_state(net[2])[0].shape == (10, 256)


@pytest.mark.parametrize("api", APIS)
def test_reinitialising_after_the_first_forward_is_seen(api):
    """The notebook's net.apply(init_weights) after deferred initialisation: never stale."""
    ours, _ = APIS[api]
    net = nn.Sequential(ours(nn.LazyLinear(64)), nn.ReLU(), ours(nn.LazyLinear(10)))
    initialize_now(net, torch.rand(2, 20))

    def init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(sn_state(m)[0], std=2.0)

    net.apply(init_weights)
    net.eval()(torch.rand(2, 20))
    for layer in (net[0], net[2]):
        W, u, v = sn_state(layer)
        assert abs(torch.dot(u, W @ v).item() / exact_sigma(W) - 1) < 1e-4


def test_remove_spectral_norm_before_the_lazy_registration_completed():
    m = safe_norm.spectral_norm(nn.LazyLinear(4))
    assert safe_norm.remove_spectral_norm(m) is m
    m(torch.randn(2, 3))
    assert sorted(m.state_dict()) == ["bias", "weight"] and _no_pending(m)
    with pytest.raises(ValueError, match="not found"):
        safe_norm.remove_spectral_norm(m)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("completion", ["forward", "load_state_dict"])
def test_users_hook_handles_keep_working_after_completion(api, completion):
    ours, _ = APIS[api]
    calls = []
    m = ours(nn.LazyLinear(4))
    handle = m.register_load_state_dict_post_hook(lambda module, keys: calls.append(1))
    if completion == "forward":
        m(torch.randn(2, 3))
    else:
        m.load_state_dict(ours(nn.Linear(3, 4)).state_dict())
    calls.clear()
    handle.remove()  # removes the user's hook from the dict the module still uses
    m.load_state_dict(ours(nn.Linear(3, 4)).state_dict())
    assert calls == []
