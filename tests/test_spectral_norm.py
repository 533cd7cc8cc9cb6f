"""Hook API: safe_norm.spectral_norm / remove_spectral_norm against torch.nn.utils, side by side."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import remove_spectral_norm as up_remove
from torch.nn.utils import spectral_norm as up_sn
from torch.nn.utils.spectral_norm import SpectralNorm as UpstreamSpectralNorm

import safe_norm
from safe_norm import remove_spectral_norm, spectral_norm

from .helpers import BIG, ZOO, exact_sigma, example_input, rel, twin, used_sigma

F32 = torch.finfo(torch.float32).eps  # 1.19e-7


# --------------------------------------------------------------------------- 1. same surface


def test_public_names_are_functions_not_modules():
    assert inspect.isfunction(safe_norm.spectral_norm)
    assert inspect.isfunction(safe_norm.remove_spectral_norm)
    with pytest.raises(ModuleNotFoundError):
        __import__("safe_norm.spectral_norm")


@pytest.mark.parametrize("ours,theirs", [(spectral_norm, up_sn), (remove_spectral_norm, up_remove)])
def test_signature_extends_upstream_with_keyword_only_options(ours, theirs):
    mine = inspect.signature(ours).parameters
    up = inspect.signature(theirs).parameters
    positional = [p for p in mine.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in up.values()]
    extra = [p for p in mine.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert all(p.default is not inspect.Parameter.empty for p in extra)


def test_returns_the_module():
    m = nn.Linear(3, 4)
    assert spectral_norm(m) is m
    assert remove_spectral_norm(m) is m


@pytest.mark.parametrize(
    "factory,dim",
    [
        (lambda: nn.ConvTranspose1d(4, 6, 3), 1),
        (lambda: nn.ConvTranspose2d(4, 6, 3), 1),
        (lambda: nn.ConvTranspose3d(4, 6, 3), 1),
        (lambda: nn.Conv2d(4, 6, 3), 0),
        (lambda: nn.Linear(4, 6), 0),
    ],
)
def test_default_dim_and_names_match_upstream(factory, dim):
    torch.manual_seed(1)
    up = up_sn(factory())
    torch.manual_seed(1)
    sn = spectral_norm(factory())
    fn = next(h for h in sn._forward_pre_hooks.values() if isinstance(h, safe_norm.SpectralNorm))
    assert fn.dim == dim
    assert isinstance(fn, UpstreamSpectralNorm)
    assert dict(sn.named_parameters()).keys() == dict(up.named_parameters()).keys()
    assert dict(sn.named_buffers()).keys() == dict(up.named_buffers()).keys()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(sn.state_dict())
    assert isinstance(sn.weight, torch.Tensor) and "weight" not in sn._parameters
    assert sn.weight_u.shape == up.weight_u.shape and sn.weight_v.shape == up.weight_v.shape
    assert sn.state_dict()._metadata == up.state_dict()._metadata  # spectral_norm version 1


def _empty_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.empty(0, 4))
    return m


def _int_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.long), requires_grad=False)
    return m


def _scalar_weight_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor(2.0))
    return m


BAD = {
    "n_power_iterations=0": (lambda: nn.Linear(4, 3), dict(n_power_iterations=0)),
    "n_power_iterations=-1": (lambda: nn.Linear(4, 3), dict(n_power_iterations=-1)),
    "missing name": (lambda: nn.Linear(4, 3), dict(name="foo")),
    "buffer name": (lambda: nn.BatchNorm1d(3), dict(name="running_mean")),
    "None parameter": (lambda: nn.Linear(4, 3, bias=False), dict(name="bias")),
    "registered twice": (lambda: spectral_norm(nn.Linear(4, 3)), {}),
    "registered twice (upstream first)": (lambda: up_sn(nn.Linear(4, 3)), {}),
    "dim out of range": (lambda: nn.Linear(4, 3), dict(dim=2)),
    "negative dim": (lambda: nn.Linear(4, 3), dict(dim=-1)),
    "integer weight": (_int_weight_module, {}),
    "0-d weight": (_scalar_weight_module, {}),
    "no rows": (_empty_weight_module, {}),
    "lazy module": (lambda: nn.LazyLinear(3), {}),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_upstreams_exception_type_with_a_clear_message(case):
    factory, kwargs = BAD[case]
    with pytest.raises(Exception) as theirs:
        up_sn(factory(), **kwargs)
    with pytest.raises(type(theirs.value)) as mine:
        spectral_norm(factory(), **kwargs)
    message = str(mine.value)
    if not any(word in case for word in ("twice", "n_power", "None", "lazy")):
        # ours, not upstream's: it names the module and the parameter
        assert "spectral_norm:" in message and kwargs.get("name", "weight") in message, message
    if case == "lazy module":  # upstream's message; issue 4 defers these instead
        assert "uninitialized" in message


def test_clear_error_classes_also_name_the_mistake():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        spectral_norm(_int_weight_module())
    with pytest.raises(IndexError, match="dim=2 is out of range"):
        spectral_norm(nn.Linear(4, 3), dim=2)
    with pytest.raises(ValueError, match="no entries"):
        spectral_norm(_empty_weight_module())
    with pytest.raises(KeyError, match="is a buffer"):
        spectral_norm(nn.BatchNorm1d(3), name="running_mean")


@pytest.mark.parametrize("tol", [0.0, -1e-3, 1.0, float("nan"), "1e-4"])
def test_bad_warmup_tol(tol):
    with pytest.raises(ValueError, match="warmup_tol"):
        spectral_norm(nn.Linear(4, 3), warmup_tol=tol)


def test_inputs_upstream_accepts_are_accepted():
    # a bias (1-D weight), zero columns, a complex weight
    spectral_norm(nn.Linear(4, 3), name="bias")(torch.randn(2, 4))
    m = nn.Module()
    m.weight = nn.Parameter(torch.empty(3, 0))
    up_sn(copy.deepcopy(m))
    spectral_norm(m)


def test_remove_spectral_norm_errors_like_upstream():
    with pytest.raises(ValueError):
        up_remove(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="not found"):
        remove_spectral_norm(nn.Linear(3, 4))


# ------------------------------------------------------------------ 2. valid at registration


def _seeded_model(sn):
    torch.manual_seed(1234)
    return nn.Sequential(
        sn(nn.Conv2d(3, 16, 3)),
        nn.LeakyReLU(0.2),
        sn(nn.ConvTranspose2d(16, 8, 4)),
        nn.Flatten(),
        sn(nn.Linear(8 * 33 * 33, 10)),
        sn(nn.Linear(10, 1), n_power_iterations=3),
    )


def test_seeded_construction_draws_upstreams_random_numbers():
    up = _seeded_model(up_sn)
    after_up = torch.random.get_rng_state()
    ours = _seeded_model(spectral_norm)
    after_ours = torch.random.get_rng_state()
    assert torch.equal(after_up, after_ours)
    for (k1, p1), (k2, p2) in zip(up.named_parameters(), ours.named_parameters(), strict=True):
        assert k1 == k2 and torch.equal(p1, p2), k1
    # and the warm-up happened: the buffers moved away from upstream's random draws
    assert not torch.equal(up[0].weight_u, ours[0].weight_u)
    # with the warm-up skipped, the state is upstream's bit for bit
    skipped = _seeded_model(lambda m, **kw: spectral_norm(m, warmup_tol=None, **kw))
    for (k1, t1), (k2, t2) in zip(up.state_dict().items(), skipped.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(t1, t2), k1


def _check_valid_at_registration(factory, dim, seed):
    torch.manual_seed(seed)
    m = spectral_norm(factory()).eval()
    exact = exact_sigma(m.weight_orig, dim)
    assert rel(used_sigma(m, dim=dim), exact) < 1e-4
    with torch.no_grad():  # and the eval forward divides by that sigma
        m(example_input(m))
    assert torch.allclose(m.weight.double() * exact, m.weight_orig.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("layer", ZOO)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_is_valid_right_after_registration(layer, seed):
    factory, dim = ZOO[layer]
    _check_valid_at_registration(factory, dim, seed)


@pytest.mark.slow
@pytest.mark.parametrize("layer", BIG)
def test_sigma_is_valid_right_after_registration_big(layer):
    factory, dim = BIG[layer]
    _check_valid_at_registration(factory, dim, 0)


@pytest.mark.parametrize("layer", ["Linear512", "Conv2d", "Embedding"])
def test_upstream_is_wrong_in_the_same_situation(layer):
    """The seed (PyTorch #51800): upstream's eval sigma is meaningless, ours is not."""
    factory, dim = ZOO[layer]
    torch.manual_seed(0)
    up = up_sn(factory()).eval()
    assert rel(used_sigma(up, dim=dim), exact_sigma(up.weight_orig, dim)) > 0.5


def test_weight_shares_storage_with_orig_until_first_forward():
    m = spectral_norm(nn.Linear(8, 4))
    assert m.weight.data_ptr() == m.weight_orig.data_ptr()
    nn.init.constant_(m.weight, 0.5)  # a user's init after registration still reaches the param
    assert torch.all(m.weight_orig == 0.5)
    net = nn.Sequential(spectral_norm(nn.Linear(8, 4)), spectral_norm(nn.Linear(4, 2)))
    net.apply(lambda mod: nn.init.xavier_uniform_(mod.weight) if isinstance(mod, nn.Linear) else None)
    assert all(torch.equal(layer.weight, layer.weight_orig) for layer in net)


def test_complex_weight_gets_the_right_sigma():
    """Upstream's hook API omits the conjugation; safe_norm's power step and sigma are uᴴWv."""
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(6, 5, dtype=torch.complex128))
    spectral_norm(m)
    W = m.weight_orig.detach()
    sigma = torch.vdot(m.weight_u, W @ m.weight_v)
    exact = torch.linalg.matrix_norm(W, 2)
    assert abs(sigma.imag) < 1e-12 and rel(sigma.real.item(), exact.item()) < 1e-10
    m.train()
    for _ in range(3):  # training steps keep it
        m._forward_pre_hooks[next(iter(m._forward_pre_hooks))](m, ())
    assert rel(torch.linalg.matrix_norm(m.weight.detach(), 2).item(), 1.0) < 1e-10


def test_warmup_can_be_skipped_for_upstreams_behaviour():
    torch.manual_seed(3)
    up = up_sn(nn.Linear(64, 32))
    torch.manual_seed(3)
    ours = spectral_norm(nn.Linear(64, 32), warmup_tol=None)
    assert torch.equal(up.weight_u, ours.weight_u) and torch.equal(up.weight_v, ours.weight_v)


# ----------------------------------------------------------- 4. equivalent to upstream when trained


def _make(kind, shape, seed):
    torch.manual_seed(seed)
    if kind == "linear":
        out_f, in_f = shape
        return nn.Linear(in_f, out_f), (lambda n: torch.randn(n, in_f))
    if kind == "conv":
        out_c, in_c = shape
        return nn.Conv2d(in_c, out_c, 3, padding=1), (lambda n: torch.randn(n, in_c, 6, 6))
    out_c, in_c = shape
    return nn.ConvTranspose2d(in_c, out_c, 3), (lambda n: torch.randn(n, in_c, 5, 5))


def _close(a, b, rtol=1e-5):
    # relative to the tensor's scale: float32 rounding, not a loose fudge
    scale = b.abs().max().item() + F32
    return (a - b).abs().max().item() <= rtol * scale


@given(
    kind=st.sampled_from(["linear", "conv", "convT"]),
    shape=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    npi=st.integers(1, 3),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_training_trajectory_equals_upstream(kind, shape, npi, steps, seed):
    module, data = _make(kind, shape, seed)
    up, sn = twin(module, spectral_norm, n_power_iterations=npi)
    opt_up = torch.optim.SGD(up.parameters(), lr=0.05, momentum=0.9)
    opt_sn = torch.optim.SGD(sn.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = data(4)
        out_up, out_sn = up(x), sn(x)
        assert _close(out_sn, out_up)
        out_up.square().mean().backward()
        out_sn.square().mean().backward()
        assert _close(sn.weight_orig.grad, up.weight_orig.grad)
        opt_up.step(), opt_sn.step()
        opt_up.zero_grad(), opt_sn.zero_grad()
        for name in ("weight_orig", "weight_u", "weight_v", "bias"):
            assert _close(getattr(sn, name), getattr(up, name)), name
    up.eval(), sn.eval()
    with torch.no_grad():
        x = data(3)
        assert _close(sn(x), up(x))


@given(kind=st.sampled_from(["linear", "conv"]), seed=st.integers(0, 2**16))
def test_two_forwards_one_backward_and_gradient_penalty(kind, seed):
    module, data = _make(kind, (6, 5), seed)
    up, sn = twin(module, spectral_norm)
    grads = []
    for net in (up, sn):
        torch.manual_seed(seed)
        real, fake = data(4), data(4)
        loss = net(real).mean() - net(fake).mean()  # D(real) - D(fake): two forwards, one backward
        x = data(4).requires_grad_(True)
        (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        loss = loss + 10 * (gx.flatten(1).norm(dim=1) - 1).square().mean()
        loss.backward()
        grads.append(net.weight_orig.grad)
    assert _close(grads[1], grads[0])
    assert _close(sn.weight_u, up.weight_u) and _close(sn.weight_v, up.weight_v)


# ------------------------------------------------------------------------ 5. checkpoints cross


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained(sn_fn, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(sn_fn(nn.Linear(6, 8)), nn.ReLU(), sn_fn(nn.ConvTranspose1d(8, 4, 1)))
    net[2].register_forward_pre_hook(lambda m, a: (a[0].unsqueeze(-1),))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        net(torch.randn(5, 6)).square().mean().backward()
        opt.step(), opt.zero_grad()
    return net.eval()


@pytest.mark.parametrize("direction", ["upstream->safe_norm", "safe_norm->upstream"])
def test_state_dict_crosses_over_strict(direction):
    src_fn, dst_fn = (up_sn, spectral_norm) if direction.startswith("up") else (spectral_norm, up_sn)
    src = _trained(src_fn, seed=0)
    dst = _trained(dst_fn, seed=1)
    dst.load_state_dict(_roundtrip(src.state_dict()), strict=True)
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    assert dst.state_dict().keys() == src.state_dict().keys()


def test_old_version_less_checkpoint_loads():
    src = _trained(up_sn).train()
    src(torch.randn(2, 6))  # so that the stored `weight` is W_orig / sigma of the stored u, v
    src.eval()
    old = src.state_dict()
    # The pre-1.0 layout: `weight` (normalised) stored, no `weight_v`, no version metadata.
    old = {k: v for k, v in old.items()}
    for prefix in ("0.", "2."):
        layer = src[int(prefix[0])]
        with torch.no_grad():
            old[prefix + "weight"] = layer.weight.detach().clone()
        del old[prefix + "weight_v"]
    ours, theirs = _trained(spectral_norm, seed=5), _trained(up_sn, seed=5)
    ours.load_state_dict(copy.deepcopy(old), strict=True)
    theirs.load_state_dict(copy.deepcopy(old), strict=True)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert _close(ours(x), src(x), rtol=1e-4)


def test_remove_leaves_the_normalised_weight_as_a_parameter():
    net = _trained(spectral_norm)
    with torch.no_grad():
        net(torch.randn(2, 6))  # eval forward: `weight` is W_orig / sigma of the current state
    expected = net[0].weight.detach().clone()
    remove_spectral_norm(net[0])
    assert isinstance(net[0].weight, nn.Parameter)
    assert torch.equal(net[0].weight.detach(), expected)
    assert {"weight_orig", "weight_u", "weight_v"}.isdisjoint(net[0].state_dict())
    assert not net[0]._forward_pre_hooks and not net[0]._state_dict_hooks
    net[0].load_state_dict(nn.Linear(6, 8).state_dict(), strict=True)  # upstream fails here


def test_upstream_remove_works_on_safe_norm_and_ours_on_upstream():
    ours = spectral_norm(nn.Linear(6, 3))
    expected = ours.weight_orig.detach() / used_sigma(ours)
    up_remove(ours)
    assert isinstance(ours.weight, nn.Parameter)
    assert torch.allclose(ours.weight.detach(), expected, rtol=1e-5)
    theirs = up_sn(nn.Linear(6, 3))
    remove_spectral_norm(theirs)
    assert isinstance(theirs.weight, nn.Parameter) and not theirs._load_state_dict_pre_hooks


def test_upstream_leaves_a_load_hook_behind_that_we_remove():
    """Documents the upstream defect the difference above fixes (torch 2.13)."""
    m = up_remove(up_sn(nn.Linear(4, 3)))
    with pytest.raises(RuntimeError, match="weight_orig"):
        m.load_state_dict(nn.Linear(4, 3).state_dict(), strict=True)


# --------------------------------------------------------------------- 6. DataParallel semantics


def test_power_iteration_updates_buffers_in_place_and_uses_clones():
    m = spectral_norm(nn.Linear(6, 4))
    u_ptr, v_ptr = m.weight_u.data_ptr(), m.weight_v.data_ptr()
    u_before = m.weight_u.clone()
    m.train()
    nn.init.normal_(m.weight_orig)  # change W so that the step visibly moves u
    m(torch.randn(2, 6))
    assert m.weight_u.data_ptr() == u_ptr and m.weight_v.data_ptr() == v_ptr
    assert not torch.equal(m.weight_u, u_before)
    # eval: no update
    m.eval()
    u_eval = m.weight_u.clone()
    m(torch.randn(2, 6))
    assert torch.equal(m.weight_u, u_eval)


def test_dataparallel_wrapping_runs_on_cpu():
    m = spectral_norm(nn.Linear(6, 4))
    dp = nn.DataParallel(m)  # no GPU: runs the module directly, as upstream documents
    out = dp(torch.randn(3, 6))
    out.sum().backward()
    assert m.weight_orig.grad is not None


# ------------------------------------------------------------------ 3. the seed scenario, runnable


def test_bug_repro_example_shows_upstream_wrong_and_safe_norm_right():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = root / "examples" / "bug_repro.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    errors = dict(re.findall(r"(upstream|safe_norm): relative output error (\S+)", out))
    assert float(errors["upstream"]) > 1.0, out
    assert float(errors["safe_norm"]) < 1e-4, out
    rows = re.findall(r"^\s+\d+\s+\S+ \|\s+\S+\s+(\S+) \|\s+\S+\s+(\S+)$", out, flags=re.M)
    assert len(rows) == 3, out
    assert all(abs(float(up)) > 0.5 and abs(float(ours)) < 1e-4 for up, ours in rows), out
