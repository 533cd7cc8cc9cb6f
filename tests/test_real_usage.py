"""Code shaped like real repositories', side by side with upstream: DCGAN initialisation, EMA
generators, deepcopy for EMA, meta-device construction, inference mode, swap_tensors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import safe_norm
from safe_norm import _core

from .helpers import APIS, rel, sn_state

TOL = 1e-4


def _orig(m: nn.Module) -> torch.Tensor:
    return m.weight_orig if hasattr(m, "weight_orig") else m.parametrizations.weight.original


def _state(m: nn.Module) -> _core.State:
    if hasattr(m, "parametrizations"):
        return m.parametrizations.weight[0]._state
    return next(h for h in m._forward_pre_hooks.values() if isinstance(h, safe_norm.SpectralNorm))._state


def _mlp(sn) -> nn.Sequential:
    return nn.Sequential(sn(nn.Linear(24, 160)), nn.LeakyReLU(0.2), sn(nn.Linear(160, 140)), nn.LeakyReLU(0.2),
                         sn(nn.Linear(140, 1)))


def _worst_error(net: nn.Module) -> float:
    """Worst relative error of the sigma the next eval forward divides by, over the layers."""
    return max(abs(r.error) for r in safe_norm.audit(net))


def _sigma_read_off_output(m: nn.Linear, x: torch.Tensor) -> float:
    """The sigma an eval forward under no_grad divided by, read off its output."""
    with torch.no_grad():
        y = (m.eval()(x) - m.bias).double()
        z = (x @ _orig(m).detach().T).double()
    return ((z * z).sum() / (z * y).sum()).item()


def weights_init(m: nn.Module) -> None:
    # pytorch/examples DCGAN
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


@pytest.mark.parametrize("api", APIS)
def test_dcgan_weights_init_right_after_registration(api):
    ours, theirs = APIS[api]
    for sn, expect_right in ((ours, True), (theirs, False)):
        torch.manual_seed(0)
        netD = nn.Sequential(sn(nn.Conv2d(3, 64, 4, 2, 1)), nn.LeakyReLU(0.2), nn.BatchNorm2d(64),
                             sn(nn.Conv2d(64, 128, 4, 2, 1)))
        if api == "hook":
            netD.apply(weights_init)
        else:  # m.weight is computed there (the tutorial's init would write into a result)
            for layer in (netD[0], netD[3]):
                nn.init.normal_(_orig(layer).data, 0.0, 0.02)
        netD.eval()(torch.randn(2, 3, 16, 16))
        if expect_right:
            assert _worst_error(netD) <= TOL
        elif api == "hook":
            assert _worst_error(netD) > 0.5  # pytorch#51800


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("update", ["state_dict .data.copy_", "parameters .data.lerp_", "copy_(lerp) under no_grad"])
def test_ema_generator_copied_right_after_init_is_sampled_right(api, update):
    """StudioGAN / ema-pytorch shape: G_ema = deepcopy(G) right after init; G trains, G_ema gets
    EMA updates and is sampled in eval() under no_grad, and never trains."""
    ours, theirs = APIS[api]
    errors = {}
    for name, sn in (("ours", ours), ("upstream", theirs)):
        torch.manual_seed(0)
        G = _mlp(sn)
        G.apply(lambda m: nn.init.orthogonal_(_orig(m), gain=2.0) if isinstance(m, nn.Linear) else None)
        G_ema = copy.deepcopy(G)
        opt = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.0, 0.9))
        worst = 0.0
        for step in range(4):
            G.train()(torch.randn(8, 24)).square().mean().backward()
            opt.step(), opt.zero_grad()
            d = 0.9
            with torch.no_grad():
                if update == "state_dict .data.copy_":
                    ema_sd, sd = G_ema.state_dict(), G.state_dict()
                    for k in ema_sd:
                        ema_sd[k].data.copy_(ema_sd[k].data * d + sd[k].data * (1 - d))
                elif update == "parameters .data.lerp_":
                    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                        p_ema.data.lerp_(p.data, 1 - d)
                else:
                    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                        p_ema.copy_(p.lerp(p_ema, d))
                G_ema.eval()(torch.randn(16, 24))  # samples for FID / image grids
            worst = max(worst, _worst_error(G_ema))
        errors[name] = worst
    assert errors["ours"] <= TOL, errors
    assert errors["upstream"] > 10 * TOL, errors  # stale (hook: random) vectors


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", [(512, 384), (512, 64)])  # Lanczos; a small side (exact when cold)
def test_ema_reconvergence_after_a_small_update_is_cheap(api, shape):
    """Re-convergence starts from the current vectors: a 0.999-EMA step costs a few Lanczos
    steps, not a cold warm-up or an exact solve (step counts, not times: the machine is noisy)."""
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(*shape))
    # the generator being trained: near the EMA copy, as a few optimizer steps leave it
    target = _orig(m).detach() + torch.randn(shape[1], shape[0]) * 0.1 * _orig(m).detach().std()
    view = _view(m)
    cold = safe_norm._krylov.warm_up_(_orig(m).detach().clone(), torch.randn(shape[1]), torch.randn(shape[0]),
                                     tol=TOL, exact_side=0)
    warm_steps = []
    for _ in range(5):
        with torch.no_grad():
            _orig(m).data.lerp_(target, 1 - 0.999)
        warm_steps.append(_core.converge(_state(m), view).steps)  # 0 would mean an exact solve
        exact = torch.linalg.matrix_norm(_orig(m).double(), 2).item()
        assert rel(_sigma_read_off_output(m, torch.randn(4, shape[0])), exact) <= TOL
    assert 2 <= min(warm_steps) and max(warm_steps) <= cold.steps // 3, (warm_steps, cold.steps)


def _view(m: nn.Module) -> _core.View:
    if hasattr(m, "parametrizations"):
        return m.parametrizations.weight[0].view(_orig(m))
    return next(h for h in m._forward_pre_hooks.values() if isinstance(h, safe_norm.SpectralNorm)).view(m)


@pytest.mark.parametrize("api", APIS)
def test_deepcopy_right_after_a_change_carries_the_pending_reconvergence(api):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(160, 140))
    with torch.no_grad():
        _orig(m).copy_(torch.randn(140, 160) * 3)  # never trained: re-converged at the next forward
    x = torch.randn(4, 160)
    copies = [copy.deepcopy(m)]
    if api == "hook":  # upstream refuses to pickle a parametrized module
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        copies.append(torch.load(buffer, weights_only=False))
    with torch.no_grad():
        expected = m.eval()(x)
        for c in copies:
            assert torch.equal(c.eval()(x), expected)
    exact = torch.linalg.matrix_norm(_orig(m).double(), 2).item()
    assert rel(_sigma_read_off_output(copies[0], x), exact) <= TOL


@pytest.mark.parametrize("api", APIS)
def test_a_copy_never_carries_a_stale_cached_weight(api):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(16, 12))
    m(torch.randn(2, 16))  # trained: changes are left to the power iteration, as upstream
    x = torch.randn(3, 16)
    with torch.no_grad():
        m.eval()(x)  # the cache is warm
    c = copy.deepcopy(m)
    assert _state(c).cache is None
    with torch.no_grad():
        _orig(c).data.mul_(-2)
        twin = theirs(nn.Linear(16, 12)).eval()
        twin.load_state_dict(c.state_dict())
        assert torch.equal(c(x), twin(x))


@pytest.mark.parametrize("api", APIS)
def test_the_cache_lives_in_eval_only(api):
    ours, _ = APIS[api]
    m = ours(nn.Linear(16, 12)).eval()
    with torch.no_grad():
        m(torch.randn(2, 16))
    assert _state(m).cache is not None
    m.train()(torch.randn(2, 16))
    assert _state(m).cache is None  # no full copy of the weight kept alive during training


@pytest.mark.parametrize("api", APIS)
def test_meta_device_then_load_state_dict_reproduces_the_checkpoint(api):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    source = _mlp(theirs)
    source.train()(torch.randn(8, 24))
    with torch.device("meta"):
        net = _mlp(ours)
    net.to_empty(device="cpu")
    net.load_state_dict(source.state_dict())
    x = torch.randn(5, 24)
    source.eval(), net.eval()
    assert torch.equal(net(x), source(x))
    source.train(), net.train()
    assert torch.allclose(net(x), source(x), rtol=1e-6, atol=1e-7)  # the same step, to rounding
    for (k, a), b in zip(source.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_meta_device_then_init_is_exact_at_the_first_forward(api, mode):
    ours, _ = APIS[api]
    with torch.device("meta"):
        net = _mlp(ours)
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (net[0], net[2], net[4]):
            nn.init.kaiming_uniform_(_orig(layer), a=5**0.5)
            nn.init.zeros_(layer.bias)
    net.train(mode == "train")(torch.randn(3, 24))
    if mode == "eval":
        assert _worst_error(net) <= TOL
    else:  # the forward converged, then ran its power step (which only improves the estimate)
        assert _worst_error(net) <= 2 * TOL


@pytest.mark.parametrize("api", APIS)
def test_built_and_run_under_inference_mode(api):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    with torch.inference_mode():
        net = _mlp(ours).eval()
        y = net(torch.randn(3, 24))
        assert y.is_inference()
        assert torch.equal(net(torch.ones(3, 24)), net(torch.ones(3, 24)))
        assert _worst_error(net) <= TOL


@pytest.fixture
def swap_on_conversion():
    if not hasattr(torch.__future__, "set_swap_module_params_on_conversion"):
        pytest.skip("swapping module tensors on conversion exists from torch 2.3")
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(old)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("route", ["to(float64)", "double()", "load_state_dict(assign=True)", "remove"])
def test_swap_tensors_paths(api, route, swap_on_conversion):
    """torch.utils.swap_tensors refuses tensors with weak references: none are held."""
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    up = theirs(nn.Linear(16, 12))
    m = ours(nn.Linear(16, 12))
    m.load_state_dict(up.state_dict())
    x = torch.randn(3, 16)
    for net in (m, up):
        net.train()(x)
        with torch.no_grad():  # upstream's hook API keeps the graph of m.weight, which blocks swapping
            net.eval()(x)
    for net in (m, up):
        if route == "to(float64)":
            net.to(torch.float64)
        elif route == "double()":
            net.double()
        elif route == "load_state_dict(assign=True)":
            net.load_state_dict({k: t.clone() for k, t in up.state_dict().items()}, assign=True)
        elif api == "hook":
            (safe_norm.remove_spectral_norm if net is m else nn.utils.remove_spectral_norm)(net)
        else:
            parametrize.remove_parametrizations(net, "weight")
    x = x.to(_weight_dtype(m))
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), up.eval()(x), rtol=1e-6, atol=1e-7)


def _weight_dtype(m: nn.Module) -> torch.dtype:
    return (getattr(m, "weight_orig", None) if hasattr(m, "weight_orig") else m.weight).dtype


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parametrize_cached_computes_once_as_upstream(mode):
    ours, theirs = APIS["parametrization"]
    torch.manual_seed(0)
    up = theirs(nn.Linear(16, 12))
    m = ours(nn.Linear(16, 12))
    m.load_state_dict(up.state_dict())
    for net in (m, up):
        net.train(mode == "train")
    with parametrize.cached():
        w = m.weight
        assert m.weight is w
        u = sn_state(m)[1].clone()
        m(torch.randn(2, 16))
        assert torch.equal(sn_state(m)[1], u)  # cached: no second power step
        assert torch.allclose(w, up.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("meta", [False, True])
def test_a_partial_load_keeps_a_pending_reconvergence(api, meta):
    """A backbone-only checkpoint (strict=False) says nothing about the head: a head
    re-initialised before it still re-converges (on meta: after to_empty, its vectors are
    uninitialised memory and must not be taken as a checkpoint's)."""
    ours, _ = APIS[api]
    torch.manual_seed(0)
    backbone = nn.Linear(32, 64)
    if meta:
        with torch.device("meta"):
            net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), ours(nn.Linear(64, 64)))
        net.to_empty(device="cpu")
        with torch.no_grad():
            net[0].reset_parameters()
            nn.init.kaiming_uniform_(_orig(net[2]), a=5**0.5)
            nn.init.zeros_(net[2].bias)
    else:
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), ours(nn.Linear(64, 64)))
        nn.init.normal_(_orig(net[2]).data, 0.0, 0.5)  # DCGAN-style, after registration
    net.load_state_dict({"0." + k: t for k, t in backbone.state_dict().items()}, strict=False)
    with torch.no_grad():
        net.eval()(torch.randn(3, 32))
    assert _worst_error(net) <= TOL


def test_remove_spectral_norm_bakes_in_the_reconverged_sigma():
    m = safe_norm.spectral_norm(nn.Linear(64, 64))
    nn.init.normal_(m.weight.data, 0.0, 0.5)  # m.weight aliases the parameter until a forward
    safe_norm.remove_spectral_norm(m)
    assert rel(torch.linalg.matrix_norm(m.weight.detach().double(), 2).item(), 1.0) <= TOL


@pytest.mark.parametrize("api", APIS)
def test_a_write_into_a_zero_column_is_seen_by_the_eval_cache(api):
    """v has exact zeros where W has zero columns (a power step keeps them): the content probe
    is a dense vector, so a write there (an input channel added with zero weights, then set)
    still rebuilds the cached weight, as upstream recomputes it."""
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    with torch.no_grad():
        base.weight[:, 0] = 0
    up, sn = theirs(copy.deepcopy(base)), ours(copy.deepcopy(base))
    sn.load_state_dict(up.state_dict())
    x = torch.eye(4)[:1]
    for m in (up, sn):
        m.train()(torch.randn(2, 4))
        with torch.no_grad():
            m.eval()(x)
            _orig(m)[:, 0] = 0.5
    with torch.no_grad():
        assert torch.allclose(sn(x), up(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("api", APIS)
def test_jit_trace_of_an_eval_model_follows_its_weights(api):
    """A traced graph runs upstream's computation (nothing compared or cached in it)."""
    ours, theirs = APIS[api]
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    up = nn.Sequential(theirs(nn.Linear(8, 8)))
    up.train()(x)
    sn = nn.Sequential(ours(nn.Linear(8, 8)))
    sn.load_state_dict(up.state_dict())
    traced = []
    for m in (sn, up):
        m.eval()
        with torch.no_grad():
            m(x)  # a validation forward first: nothing of it may be baked into the trace
            traced.append(torch.jit.trace(m, (x,)))  # check_trace on
    with torch.no_grad():
        assert torch.allclose(traced[0](x), traced[1](x), rtol=1e-6, atol=1e-7)
        for m in (sn, up):
            _orig(m[0]).mul_(-2)
        assert torch.allclose(traced[0](x), traced[1](x), rtol=1e-6, atol=1e-7)
