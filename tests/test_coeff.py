"""Soft normalisation (``coeff=``): the weight divided by ``max(1, sigma / coeff)``, as the
``spectral_norm_fc(module, coeff)`` that invertible ResNets and uncertainty models copy into
their repositories.  Both APIs: the normalised weight's norm, gradients against autograd of the
same expression (first and second order, ``torch.func``), the default unchanged, options,
lazy modules, copies, removal, tracking, compile."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.func import functional_call, grad
from torch.nn.utils import parametrize

from safe_norm import remove_spectral_norm

from .helpers import APIS, PATHS, exact_sigma, normalisation_path, sn_state


def _normalised(m: nn.Module) -> torch.Tensor:
    """The weight the module's forward uses (hook API: set by the forward just run)."""
    return m.weight


def _soft_reference(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, coeff: float) -> torch.Tensor:
    """``W / max(1, uᵀWv / coeff)`` by plain autograd (u, v constant)."""
    sigma = torch.dot(u, W.flatten(1) @ v)
    return W / torch.clamp(sigma / coeff, min=1)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("training", [True, False])
def test_the_norm_is_capped_at_coeff_and_a_weight_within_it_is_used_as_is(api, training):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    for layer in (nn.Linear(40, 64), nn.Conv2d(8, 16, 3)):
        sigma = exact_sigma(layer.weight)
        low, high = copy.deepcopy(layer), copy.deepcopy(layer)
        raw = layer.weight.detach().clone()
        low = ours(low, coeff=0.5 * sigma).train(training)
        high = ours(high, coeff=2 * sigma).train(training)
        x = torch.randn(2, *((40,) if isinstance(layer, nn.Linear) else (8, 6, 6)))
        low(x), high(x)
        capped = exact_sigma(_normalised(low))
        assert abs(capped / (0.5 * sigma) - 1) <= 1e-4  # the warm-up's tolerance
        assert torch.equal(_normalised(high), raw)  # divided by exactly 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_gradients_match_autograd_of_the_soft_expression(api, ratio, path):
    """Below the cap the gradient is the identity's; above it, the hard case's scaled by
    ``coeff``.  Second order (create_graph) as well.  Both ways of dividing (a 32x24 weight
    takes upstream's graph as shipped)."""
    with normalisation_path(path):
        _gradients_match_autograd_of_the_soft_expression(api, ratio)


def _gradients_match_autograd_of_the_soft_expression(api, ratio):
    ours, _ = APIS[api]
    torch.manual_seed(1)
    m = nn.Linear(24, 32).double()
    coeff = ratio * exact_sigma(m.weight)
    m = ours(m, coeff=coeff).eval()  # eval: u, v stay as they are
    W, u, v = sn_state(m)
    W = W.clone().requires_grad_(True)
    g = torch.randn(32, 24, dtype=torch.float64)
    reference = _soft_reference(W, u, v, coeff)
    (ref_grad,) = torch.autograd.grad((reference * g).sum(), W, create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_grad.square().sum(), W)

    original = m.parametrizations.weight.original if api == "parametrization" else m.weight_orig
    m(torch.zeros(1, 24, dtype=torch.float64))  # the hook API sets m.weight, with its graph
    (got,) = torch.autograd.grad((_normalised(m) * g).sum(), original, create_graph=True)
    assert torch.allclose(got, ref_grad, rtol=1e-10, atol=1e-12)
    if ratio > 1:
        assert torch.equal(got, g)  # the identity
    (second,) = torch.autograd.grad(got.square().sum(), original)
    assert torch.allclose(second, ref_second, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("api", APIS)
def test_torch_func_grad_matches_autograd(api):
    ours, _ = APIS[api]
    torch.manual_seed(2)
    m = nn.Linear(16, 20).double()
    coeff = 0.7 * exact_sigma(m.weight)
    m = ours(m, coeff=coeff).eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    params = dict(m.named_parameters())
    buffers = dict(m.named_buffers())
    key = "parametrizations.weight.original" if api == "parametrization" else "weight_orig"

    def loss(p):
        return functional_call(m, (p, buffers), (x,)).square().sum()

    got = grad(loss)(params)[key]
    W, u, v = sn_state(m)
    W = W.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((x @ _soft_reference(W, u, v, coeff).mT + m.bias).square().sum(), W)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("api", APIS)
def test_the_default_is_unchanged_and_coeff_is_not_in_checkpoints(api):
    ours, upstream = APIS[api]
    torch.manual_seed(3)
    base = nn.Linear(12, 18)
    plain, soft, theirs = (copy.deepcopy(base) for _ in range(3))
    torch.manual_seed(4)
    plain = ours(plain)
    torch.manual_seed(4)
    soft = ours(soft, coeff=0.5)
    torch.manual_seed(4)
    theirs = upstream(theirs)
    keys = {k: tuple(t.shape) for k, t in theirs.state_dict().items()}
    for m in (plain, soft):
        assert {k: tuple(t.shape) for k, t in m.state_dict().items()} == keys
    # the default registers nothing more than before: no coeff attribute of its own
    holder = plain.parametrizations.weight[0] if api == "parametrization" else _hook(plain)
    assert "coeff" not in vars(holder) and holder.coeff is None
    # same random draws and the same u, v: the soft layer differs only in its division
    for a, b in zip(sn_state(plain)[1:], sn_state(soft)[1:]):
        assert torch.equal(a, b)


def _hook(m: nn.Module):
    return next(h for h in m._forward_pre_hooks.values() if hasattr(h, "_state"))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_coeff_is_refused(api, bad):
    ours, _ = APIS[api]
    with pytest.raises(ValueError, match="coeff must be a positive finite number"):
        ours(nn.Linear(3, 4), coeff=bad)


@pytest.mark.parametrize("api", APIS)
def test_coeff_is_keyword_only(api):
    ours, _ = APIS[api]
    assert inspect.signature(ours).parameters["coeff"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("api", APIS)
def test_lazy_modules_copies_and_removal_keep_the_cap(api):
    ours, _ = APIS[api]
    torch.manual_seed(5)
    m = ours(nn.LazyLinear(30), coeff=0.25).eval()
    x = torch.randn(2, 10)
    m(x)
    assert abs(exact_sigma(_normalised(m)) / 0.25 - 1) <= 1e-4
    rebuilt = ours(nn.Linear(10, 30), coeff=0.25).eval()
    rebuilt.load_state_dict(m.state_dict())
    twins = [copy.deepcopy(m), rebuilt]
    if api == "hook":  # parametrized modules are not picklable (upstream: state_dict only)
        twins += [pickle.loads(pickle.dumps(m)), _saved(m)]
    for twin in twins:
        twin(x)
        assert torch.equal(_normalised(twin), _normalised(m))
    if api == "hook":
        remove_spectral_norm(m)
    else:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    assert abs(exact_sigma(m.weight) / 0.25 - 1) <= 1e-4  # the soft weight is what is baked in


def _saved(m: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_vector_is_soft_normalised_by_its_norm():
    from safe_norm.parametrizations import spectral_norm

    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    spectral_norm(m, coeff=2.0)
    assert torch.allclose(m.weight, torch.tensor([1.2, 1.6]))
    n = nn.Module()
    n.weight = nn.Parameter(torch.tensor([0.3, 0.4]))
    spectral_norm(n, coeff=2.0)
    assert torch.equal(n.weight, torch.tensor([0.3, 0.4]))


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_tracked_training_keeps_every_forward_within_the_cap(api):
    """With ``track_tol``, every training forward's weight has spectral norm within it of
    ``min(coeff, sigma)``: the cap holds during training, not only after convergence."""
    ours, _ = APIS[api]
    torch.manual_seed(6)
    net = nn.Sequential(ours(nn.Linear(32, 160), coeff=1.0, track_tol=1e-4), nn.Tanh(),
                        ours(nn.Linear(160, 1), coeff=1.0, track_tol=1e-4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(40):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
        out = net(x)
        for layer in (net[0], net[2]):
            capped = exact_sigma(_normalised(layer))
            raw = exact_sigma(sn_state(layer)[0])
            assert abs(capped / min(1.0, raw) - 1) <= 1e-4, step
        opt.zero_grad(), (-out.mean()).backward(), opt.step()
    assert exact_sigma(sn_state(net[0])[0]) > 1.0  # the cap was reached: the soft branch ran


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_compiles_without_graph_breaks(api):
    ours, _ = APIS[api]
    torch.manual_seed(7)
    net = nn.Sequential(ours(nn.Linear(8, 16), coeff=0.5), nn.ReLU(), ours(nn.Linear(16, 1), coeff=0.5))
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net)(x)
    assert not explanation.break_reasons
    eager = copy.deepcopy(net)
    compiled = torch.compile(net)
    out_c, out_e = compiled(x), eager(x)
    assert torch.allclose(out_c, out_e, rtol=1e-5, atol=1e-6)
