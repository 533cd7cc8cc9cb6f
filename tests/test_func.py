"""torch.func and forward-mode AD through spectral-normed modules, side by side with upstream.

Each case starts both libraries from identical state (the same weights, u and v) and restores
the buffers between calls: in train() a transform runs the power step, as upstream's does.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.nn.utils import parametrize

from safe_norm import _power

from .helpers import APIS

RTOL = 1e-6  # float32, the same expression in both libraries


def _net(sn) -> nn.Sequential:
    return nn.Sequential(sn(nn.Linear(6, 8)), nn.Tanh(), sn(nn.Linear(8, 3)))


def _pair(api: str, mode: str):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    up = _net(theirs)
    up.train()(torch.randn(4, 6))  # converged enough to be a trained model's state
    sn = _net(ours)
    sn.load_state_dict(up.state_dict())
    for m in (sn, up):
        m.train(mode == "train")
    return sn, up


def _run(m: nn.Module, fn):
    """fn(m, params, buffers), with the buffers restored afterwards (train mode steps them)."""
    saved = {k: b.clone() for k, b in m.named_buffers()}
    try:
        params = {k: p.detach() for k, p in m.named_parameters()}
        return fn(m, params, dict(m.named_buffers()))
    finally:
        with torch.no_grad():
            for k, b in m.named_buffers():
                b.copy_(saved[k])


def _leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _leaves(tree[k])]
    return [t for item in tree for t in _leaves(item)]


def _assert_close(a, b) -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        scale = y.abs().max().item() + torch.finfo(torch.float32).tiny
        assert (x - y).abs().max().item() <= RTOL * scale + 1e-7


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))


def _loss(m, params, buffers, x=X, y=Y):
    return (functional_call(m, (params, buffers), (x,)) - y).square().mean()


CASES = {
    "grad": lambda m, p, b: grad(lambda q: _loss(m, q, b))(p),
    "per-sample grads (vmap(grad))": lambda m, p, b: vmap(
        grad(lambda q, x, y: _loss(m, q, b, x.unsqueeze(0), y.unsqueeze(0))), in_dims=(None, 0, 0)
    )(p, X, Y),
    "per-sample input grads": lambda m, p, b: vmap(
        grad(lambda x: functional_call(m, (p, b), (x.unsqueeze(0),)).sum())
    )(X),
    "jacrev": lambda m, p, b: jacrev(lambda x: functional_call(m, (p, b), (x,)))(X),
    "jacfwd": lambda m, p, b: jacfwd(lambda x: functional_call(m, (p, b), (x,)))(X),
    "jacrev w.r.t. params": lambda m, p, b: jacrev(lambda q: functional_call(m, (q, b), (X,)))(p),
    "hessian": lambda m, p, b: hessian(
        lambda w: _loss(m, {**p, "0.weight_orig" if "0.weight_orig" in p else
                            "0.parametrizations.weight.original": w}, b)
    )(p["0.weight_orig"] if "0.weight_orig" in p else p["0.parametrizations.weight.original"]),
    "vmap(jacrev)": lambda m, p, b: vmap(jacrev(lambda x: functional_call(m, (p, b), (x,))))(X),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("api", APIS)
def test_transform_matches_upstream(api, case, mode):
    sn, up = _pair(api, mode)
    ours = _run(sn, CASES[case])
    if case == "hessian" and mode == "train":  # forward-over-reverse: see the forward-mode test
        _assert_close(ours, _upstream_after_its_power_step(up, CASES[case]))
        return
    theirs = _run(up, CASES[case])
    _assert_close(ours, theirs)
    for (k, a), b in zip(sn.state_dict().items(), up.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # the buffers were restored in both


def _upstream_after_its_power_step(up: nn.Module, fn):
    """In train() upstream's power step refuses forward-mode AD through the weight (its
    normalize writes a dual tensor into a buffer: `div_out`); safe_norm's keeps u, v constant,
    as the backward does, so it equals upstream's eval-mode result after the same power step."""
    with pytest.raises(NotImplementedError, match="forward AD"):
        _run(up, fn)
    with torch.no_grad():
        up(X)
    up.eval()
    return _run(up, fn)


def _tangents(p):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(t.shape, generator=g) for k, t in p.items()}


def _jvp(m, p, b):
    return jvp(lambda q: functional_call(m, (q, b), (X,)), (p,), (_tangents(p),))


def _dual(m, p, b):
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(t, d) for (k, t), d in zip(p.items(), _tangents(p).values())}
        out = functional_call(m, (duals, b), (X,))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.clone(), tangent.clone()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", ["torch.func.jvp", "forward_ad dual tensors"])
@pytest.mark.parametrize("api", APIS)
def test_forward_mode_matches_upstream(api, case, mode):
    fn = _jvp if case == "torch.func.jvp" else _dual
    sn, up = _pair(api, mode)
    ours = _run(sn, fn)
    _assert_close(ours, _upstream_after_its_power_step(up, fn) if mode == "train" else _run(up, fn))


@pytest.mark.parametrize("api", APIS)
def test_export_and_trace_of_an_eval_model(api):
    sn, up = _pair(api, "eval")
    with torch.no_grad():
        expected = up(X)
        try:
            torch.export.export(up, (X,))
        except Exception as upstreams:  # torch < 2.5 cannot export a pre-hook's setattr
            with pytest.raises(type(upstreams)):
                torch.export.export(sn, (X,))
        else:
            _assert_close(torch.export.export(sn, (X,)).module()(X), expected)
        traced = torch.jit.trace(sn, (X,))
        _assert_close(traced(X), expected)


class _Recurrent(nn.Module):
    """pytorch#167645's kind of model: each normalised layer applied at every step of a loop,
    where ``parametrize.cached()`` is what keeps the weight from being rebuilt per step."""

    def __init__(self, sn) -> None:
        super().__init__()
        self.decoder, self.encoder = sn(nn.Linear(8, 6)), sn(nn.Linear(6, 8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.new_zeros(inputs.shape[0], 8)
        for y in inputs.unbind(1):
            x = x + self.encoder(self.decoder(x) - y)
        return x


def _calls(program, op: str) -> int:
    """Nodes of an exported program, its nested graphs included, that call the aten op ``op``."""
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    return sum(n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] == op
               for g in graphs for n in g.nodes)


def test_export_under_parametrize_cached_builds_each_weight_once():
    ours, theirs = APIS["parametrization"]
    torch.manual_seed(0)
    up = _Recurrent(theirs).eval()
    sn = _Recurrent(ours).eval()
    sn.load_state_dict(up.state_dict())
    inputs = torch.randn(3, 5, 6)
    with parametrize.cached():
        try:
            up_program = torch.export.export(up, (inputs,))
        except Exception as upstreams:  # torch 2.1's export puts the cached tensor in the graph
            with pytest.raises(type(upstreams)):
                torch.export.export(sn, (inputs,))
            pytest.skip(f"this torch's export refuses parametrize.cached(), upstream's too: {upstreams}"[:200])
        program = torch.export.export(sn, (inputs,))
    # once per layer, not once per step (5 steps: 10 divisions without the cache)
    assert _calls(program, "div") == _calls(up_program, "div") == 2
    assert _calls(program, "mv") == _calls(up_program, "mv")  # sigma's products (decomposed by some releases)
    with torch.no_grad():
        _assert_close(program.module()(inputs), up(inputs))
    # nothing of the weights is baked into the program: another model's give that model's result
    torch.manual_seed(1)
    other = _Recurrent(ours).eval()
    exported = program.module()
    exported.load_state_dict(other.state_dict())
    with torch.no_grad():
        _assert_close(exported(inputs), other(inputs))


def test_the_private_torch_names_transformed_relies_on():
    """safe_norm._power.transformed reads two private torch names; if a torch release renames
    them, this says which."""
    assert hasattr(torch._C, "_are_functorch_transforms_active"), (
        "torch._C._are_functorch_transforms_active is gone: update safe_norm._power.transformed")
    assert isinstance(getattr(fwAD, "_current_level", None), int), (
        "torch.autograd.forward_ad._current_level is gone: update safe_norm._power.transformed")
    assert not _power.transformed()
    seen = []
    grad(lambda x: (seen.append(_power.transformed()), x.sum())[1])(torch.zeros(2))
    with fwAD.dual_level():
        seen.append(_power.transformed())
    assert seen == [True, True]
