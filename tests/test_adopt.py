"""Models normalised by upstream: safe_norm.audit, guard and convert, on any mix of layers."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import safe_norm

from torch.nn.utils.spectral_norm import SpectralNorm as UpstreamHook

from .helpers import APIS, close, roundtrip, sn_state, trained


def _mixed(seed: int = 0) -> nn.Sequential:
    """Upstream's and safe_norm's layers, both APIs, one with dim=1 (ConvTranspose)."""
    (ours_hook, up_hook), (ours_param, up_param) = APIS["hook"], APIS["parametrization"]
    torch.manual_seed(seed)
    return nn.Sequential(
        up_hook(nn.Linear(12, 24)),
        up_param(nn.Linear(24, 16)),
        ours_hook(nn.Linear(16, 16)),
        ours_param(nn.Linear(16, 8)),
        nn.Unflatten(1, (8, 1)),
        up_hook(nn.ConvTranspose1d(8, 6, 3)),
        nn.Flatten(),
        up_param(nn.Linear(18, 1)),
    )


def _train(net: nn.Module, steps: int = 2, seed: int = 1, lr: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        net(torch.randn(4, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # A graph-free forward, so that copy.deepcopy works on upstream's hook-API modules (after a
    # grad-enabled forward `module.weight` carries its graph, which torch refuses to copy;
    # safe_norm copes: MIGRATION H9).
    with torch.no_grad():
        net(torch.randn(1, 12, generator=gen))


def _exact(m: nn.Module, dim: int) -> float:
    W = safe_norm._power.weight_to_matrix(sn_state(m)[0], dim).double()
    return torch.linalg.matrix_norm(W, 2).item()


def _exact_of(W: torch.Tensor, dim: int) -> float:
    return torch.linalg.matrix_norm(safe_norm._power.weight_to_matrix(W, dim).double(), 2).item()


def _snapshot(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- audit -----------------------------------------------------------------------------------


def test_audit_lists_every_layer_with_the_sigma_the_eval_forward_uses():
    net = _mixed()
    before, rng = _snapshot(net), torch.random.get_rng_state()
    rows = safe_norm.audit(net)
    assert _same_state(before, _snapshot(net)) and torch.equal(rng, torch.random.get_rng_state())
    assert [(r.module, r.api, r.library, r.dim) for r in rows] == [
        ("0", "hook", "upstream", 0),
        ("1", "parametrization", "upstream", 0),
        ("2", "hook", "safe_norm", 0),
        ("3", "parametrization", "safe_norm", 0),
        ("5", "hook", "upstream", 1),
        ("7", "parametrization", "upstream", 0),
    ]
    assert rows[4].shape == (8, 6, 3)
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 12))
    for row in rows:
        m = net[int(row.module)]
        assert row.exact == pytest.approx(_exact(m, row.dim), rel=1e-12)
        assert row.error == pytest.approx((row.sigma - row.exact) / row.exact)
        # what the eval forward divided by, read back from the weight it produced
        assert close(sn_state(m)[0] / row.sigma, m.weight.detach(), rtol=1e-6)
        assert row.sigma == pytest.approx(safe_norm.sigma(m).item(), rel=1e-6)
    # upstream's hook: random vectors, meaningless sigma; its parametrization: 15 steps, off
    # (which its vectors cannot tell from training)
    assert [r.untrained for r in rows] == [True, None, False, False, True, None]
    assert abs(rows[0].error) > 0.1 and abs(rows[1].error) > 1e-5
    assert abs(rows[2].error) < 1e-4 and abs(rows[3].error) < 1e-4


def test_audit_after_training_and_as_a_table():
    net = _mixed()
    _train(net)
    rows = safe_norm.audit(net)
    assert not any(r.untrained for r in rows)
    table = str(rows).splitlines()
    assert table[0].split() == ["module", "name", "api", "library", "shape", "sigma", "exact", "rel.", "error", "untrained"]
    assert len(table) == 1 + len(rows)
    assert table[5].split()[:5] == ["5", "weight", "hook", "upstream", "8x6x3"]
    assert all(math.isnan(r.exact) for r in safe_norm.audit(net, exact=False))


@pytest.mark.parametrize("api", APIS)
def test_untrained_is_decided_by_state_not_by_history(api):
    """A trained layer stays trained through deepcopy and a checkpoint; an untrained one
    through a checkpoint stays untrained (hook API; the parametrization's state cannot tell)."""
    _, theirs = APIS[api]
    torch.manual_seed(0)
    fresh = theirs(nn.Linear(32, 1))  # one row: the hook API's test falls on v
    if api == "parametrization":
        assert safe_norm.audit(fresh)[0].untrained is None
        return
    assert safe_norm.audit(fresh)[0].untrained
    done = copy.deepcopy(fresh)
    with torch.no_grad():
        done(torch.randn(2, 32))  # one training forward (graph-free, so it deep-copies)
    assert not safe_norm.audit(done)[0].untrained
    assert not safe_norm.audit(copy.deepcopy(done))[0].untrained
    loaded = theirs(nn.Linear(32, 1))
    loaded.load_state_dict(roundtrip(done.state_dict()))
    assert not safe_norm.audit(loaded)[0].untrained
    loaded.load_state_dict(roundtrip(fresh.state_dict()))
    assert safe_norm.audit(loaded)[0].untrained


@pytest.mark.parametrize("api", APIS)
def test_audit_of_a_stale_safe_norm_layer_reports_the_reconverged_sigma(api):
    ours, _ = APIS[api]
    m = ours(nn.Linear(40, 30))
    nn.init.normal_(sn_state(m)[0] if api == "hook" else m.parametrizations.weight.original, std=3.0)
    u = sn_state(m)[1].clone()
    row = safe_norm.audit(m)[0]
    assert torch.equal(sn_state(m)[1], u)  # audit changed nothing
    assert abs(row.error) < 1e-4
    with torch.no_grad():
        m.eval()(torch.randn(1, 40))
    assert row.sigma == pytest.approx(safe_norm.sigma(m).item(), rel=1e-5)


# --- guard -----------------------------------------------------------------------------------


def _eval_warnings(net: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.eval()(torch.randn(2, 12))
        net(torch.randn(2, 12))  # a second eval forward: no second warning
    return [str(w.message) for w in caught if w.category is UserWarning]


def test_guard_warns_once_per_untrained_upstream_hook_layer():
    net = _mixed()
    counts = [(len(m._forward_pre_hooks), len(m._state_dict_hooks), len(m._load_state_dict_post_hooks)) for m in net]
    g = safe_norm.guard(net)
    assert g.watched == ["0.weight", "5.weight"]
    messages = _eval_warnings(net)
    assert len(messages) == 2
    assert messages[0].startswith("0.weight: eval forward before any training forward")
    assert messages[1].startswith("5.weight: ") and "#51800" in messages[1]
    g.remove()
    assert counts == [(len(m._forward_pre_hooks), len(m._state_dict_hooks), len(m._load_state_dict_post_hooks)) for m in net]


def test_guard_is_quiet_after_training_and_after_removal():
    net = _mixed()
    with safe_norm.guard(net):
        _train(net, steps=1)
        assert _eval_warnings(net) == []
    net = _mixed()
    safe_norm.guard(net).remove()
    assert _eval_warnings(net) == []


def test_guard_follows_checkpoints():
    trained_net, fresh_net = _mixed(), _mixed(seed=1)
    _train(trained_net)
    net = _mixed(seed=2)
    with safe_norm.guard(net):
        net.load_state_dict(roundtrip(trained_net.state_dict()))
        assert _eval_warnings(net) == []
    net = _mixed(seed=2)
    _train(net)  # trained, then a never-trained checkpoint is loaded into it
    with safe_norm.guard(net):
        assert _eval_warnings(copy.deepcopy(net)) == []  # a trained copy: no warning
        net.load_state_dict(roundtrip(fresh_net.state_dict()))
        assert len(_eval_warnings(net)) == 2


# --- convert ---------------------------------------------------------------------------------


def test_convert_a_fresh_model_warms_up_the_untrained_layers_only():
    """Only the hook-API layers' random vectors are replaced; the parametrization-API layers'
    (their state cannot tell registration from training) are kept, as everything else."""
    net = _mixed()
    before, source_rows = _snapshot(net), safe_norm.audit(net)
    ours_u = net[2].weight_u
    assert safe_norm.convert(net) is net
    after = _snapshot(net)
    assert after.keys() == before.keys()
    for key in before:
        if key.endswith(("_u", "_v")) and key.startswith(("0.", "5.")):
            continue  # converged
        assert torch.equal(before[key], after[key]), key
    assert net[2].weight_u is ours_u
    rows = safe_norm.audit(net)
    assert all(r.library == "safe_norm" for r in rows)
    for row, src in zip(rows, source_rows):
        if row.api == "hook":
            assert not row.untrained and abs(row.error) < 1e-4
        else:
            assert row.sigma == src.sigma
    # still upstream's classes too, for isinstance checks and upstream's remove_spectral_norm
    assert any(isinstance(h, UpstreamHook) for h in net[0]._forward_pre_hooks.values())
    assert isinstance(net[1].parametrizations.weight[0], torch.nn.utils.parametrizations._SpectralNorm)
    # and it behaves as safe_norm's: a weight re-initialised before training is seen
    nn.init.normal_(net[0].weight_orig, std=3.0)
    net.eval()(torch.randn(2, 12))
    assert abs(safe_norm.audit(net)[0].error) < 1e-4


def test_convert_a_trained_model_keeps_state_and_outputs():
    """Every layer keeps its vectors, the parametrization API's included; weights untouched."""
    source = _mixed()
    _train(source)
    net = safe_norm.convert(copy.deepcopy(source))
    assert _same_state(_snapshot(source), _snapshot(net))
    for row, src in zip(safe_norm.audit(net), safe_norm.audit(source)):
        assert row.sigma == src.sigma
    # the same outputs, and from the same state the converted model trains as upstream's
    twin = copy.deepcopy(source)
    x = torch.randn(8, 12)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), twin.eval()(x))
    for model in (twin, net):
        _train(model, steps=3, seed=5)
    with torch.no_grad():
        assert close(net.eval()(x), twin.eval()(x), rtol=1e-5)
    for a, b in zip(twin.state_dict().values(), net.state_dict().values()):
        assert close(b, a, rtol=1e-5)


def test_converted_checkpoints_cross_over_both_ways():
    source = _mixed()
    _train(source)
    net = safe_norm.convert(copy.deepcopy(source))
    _train(net, steps=1)
    back = _mixed(seed=3)
    back.load_state_dict(roundtrip(net.state_dict()), strict=True)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert close(back.eval()(x), net.eval()(x), rtol=1e-6)
    net.load_state_dict(roundtrip(source.state_dict()), strict=True)
    assert _same_state(_snapshot(source), _snapshot(net))


def test_convert_without_warm_up_is_a_pure_class_change():
    net = _mixed()
    before = _snapshot(net)
    safe_norm.convert(net, warmup_tol=None)
    assert _same_state(before, _snapshot(net))
    assert {r.library for r in safe_norm.audit(net)} == {"safe_norm"}


@pytest.mark.parametrize("api", APIS)
def test_converted_layers_remove_as_upstream(api):
    _, theirs = APIS[api]
    net = safe_norm.convert(trained(theirs))
    expected = trained(theirs)
    for m, e in zip((net[0], net[2]), (expected[0], expected[2])):
        if api == "hook":
            safe_norm.remove_spectral_norm(m)
            torch.nn.utils.remove_spectral_norm(e)
        else:
            torch.nn.utils.parametrize.remove_parametrizations(m, "weight")
            torch.nn.utils.parametrize.remove_parametrizations(e, "weight")
        assert close(m.weight.detach(), e.weight.detach(), rtol=1e-6)


@pytest.mark.parametrize("route", ["double()", "deepcopy"])
def test_rewarm_warms_a_fresh_parametrization_after_a_move_or_copy(route):
    """Decided from content: a move or a copy (fresh buffers) is warmed up as the original."""
    torch.manual_seed(0)
    m = nn.utils.parametrizations.spectral_norm(nn.Linear(64, 48))
    m = m.double() if route == "double()" else copy.deepcopy(m)
    assert abs(safe_norm.audit(m)[0].error) > 1e-4  # upstream's 15 steps
    safe_norm.convert(m, rewarm_parametrizations=True)
    assert abs(safe_norm.audit(m)[0].error) < 1e-4


# --- convert never changes a trained model's outputs -----------------------------------------


def _generator(api: str) -> nn.Sequential:
    """A small generator built with upstream's function of ``api`` (dims 0 and 1)."""
    _, theirs = APIS[api]
    torch.manual_seed(0)
    return nn.Sequential(
        theirs(nn.Linear(12, 64)), nn.ReLU(),
        theirs(nn.Linear(64, 48)), nn.ReLU(),
        nn.Unflatten(1, (48, 1)), theirs(nn.ConvTranspose1d(48, 8, 3)), nn.Flatten(), nn.Tanh(),
    )


def _trained_generator(api: str) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """After 30 SGD steps (ending with an optimizer step, as training does), with an input and
    its eval output."""
    net = _generator(api).train()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(30):
        net(torch.randn(16, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(32, 12, generator=gen)
    with torch.no_grad():  # also leaves upstream's hook-API modules graph-free, so they copy
        out = net.eval()(x)
    return net, x, out


@pytest.mark.parametrize("api", APIS)
def test_convert_keeps_a_trained_models_eval_outputs_bit_for_bit(api):
    net, x, before = _trained_generator(api)
    rows = safe_norm.audit(net)
    assert not any(r.untrained for r in rows)  # trained: nothing in it looks random
    assert max(abs(r.error) for r in rows) > 1e-4  # a lagging sigma, which a warm-up would move
    safe_norm.convert(net)
    assert {r.library for r in safe_norm.audit(net)} == {"safe_norm"}
    with torch.no_grad():
        assert torch.equal(net(x), before)
        assert torch.equal(net(x), before)  # the eval cache's reuse too
    assert torch.equal(net(x).detach(), before)  # and with autograd on


@pytest.mark.parametrize("api", APIS)
def test_rewarm_parametrizations_warms_a_trained_parametrization_only(api):
    net, x, before = _trained_generator(api)
    safe_norm.convert(net, rewarm_parametrizations=True)
    with torch.no_grad():
        after = net(x)
    if api == "hook":  # trained hook-API layers are kept with or without the option
        assert torch.equal(after, before)
        return
    assert not close(after, before, rtol=1e-5)
    for m, dim in ((net[0], 0), (net[2], 0), (net[5], 1)):
        exact = _exact_of(m.parametrizations.weight.original.detach(), dim)  # float64 matrix_norm
        assert abs(safe_norm.sigma(m).item() / exact - 1) < safe_norm._spectral_norm.DEFAULT_WARMUP_TOL


def test_rewarm_needs_a_tolerance():
    with pytest.raises(ValueError, match="warmup_tol"):
        safe_norm.convert(_generator("parametrization"), warmup_tol=None, rewarm_parametrizations=True)
