"""The shared maths in safe_norm._power (the training step) and the warm-up of
safe_norm._krylov, against exact float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm as UpstreamSpectralNorm

import safe_norm
from safe_norm import _core, _krylov, _power

from .helpers import rel


def _random_uv(W):
    u = F.normalize(torch.randn(W.shape[0], dtype=W.dtype), dim=0)
    v = F.normalize(torch.randn(W.shape[1], dtype=W.dtype), dim=0)
    return u, v


def _sigma_error(W, u, v):
    exact = torch.linalg.matrix_norm(W.double(), 2).item()
    return rel(_power.sigma(W.double(), u.double(), v.double()).real.item(), exact)


@pytest.mark.parametrize("shape,dim", [((6, 4, 3, 3), 0), ((6, 4, 3, 3), 1), ((5,), 0), ((2, 3, 4), 2)])
def test_weight_to_matrix_matches_upstream(shape, dim):
    w = torch.randn(shape)
    up = UpstreamSpectralNorm(dim=dim).reshape_weight_to_matrix(w)
    assert torch.equal(_power.weight_to_matrix(w, dim), up)


@given(
    h=st.integers(1, 80),
    w=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    path=st.sampled_from(["exact", "lanczos"]),
    seed=st.integers(0, 2**16),
)
def test_warm_up_reaches_its_tolerance_and_keeps_the_invariant(h, w, dtype, path, seed):
    torch.manual_seed(seed)
    W = torch.randn(h, w, dtype=dtype)
    u, v = _random_uv(W)
    u_ptr, v_ptr = u.data_ptr(), v.data_ptr()
    exact_side = None if path == "exact" else 0
    result = _krylov.warm_up_(W, u, v, tol=1e-4, exact_side=exact_side)
    assert result.error_estimate <= 1e-4
    assert _sigma_error(W, u, v) < 1e-4
    assert u.data_ptr() == u_ptr and v.data_ptr() == v_ptr and u.dtype == v.dtype == dtype
    # upstream's invariant after a step: u = normalize(W v)
    assert torch.allclose(u, F.normalize(W @ v, dim=0), atol=10 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("path", ["exact", "lanczos"])
def test_warm_up_is_exact_for_thin_matrices(path):
    """Exact by construction, or: from the smaller side Lanczos exhausts its Krylov space."""
    for shape in [(1, 50), (50, 1), (3, 400), (400, 3), (1, 1)]:
        W = torch.randn(*shape, dtype=torch.float64)
        u, v = _random_uv(W)
        result = _krylov.warm_up_(W, u, v, tol=1e-4, exact_side=None if path == "exact" else 0)
        assert result.steps <= min(shape)
        assert _sigma_error(W, u, v) < 1e-12


def test_small_sides_are_solved_exactly():
    """Where Lanczos was once seen to stop at σ₂ (this 64x48 conv weight and start, two threads:
    0.85 % low), the small-side solve is exact."""
    torch.manual_seed(12)
    W = nn.Conv2d(3, 64, 4).weight.detach().flatten(1)
    u, v = _random_uv(W)
    assert _krylov.warm_up_(W, u, v, tol=1e-4).steps == 0  # the exact path
    assert _sigma_error(W, u, v) < 10 * torch.finfo(torch.float32).eps


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory",
    [lambda: nn.Linear(512, 256), lambda: nn.Conv2d(128, 256, 3), lambda: nn.Embedding(1000, 200)],
    ids=["Linear256x512", "Conv2d256x128x3x3", "Embedding1000x200"],
)
def test_lanczos_reaches_the_tolerance_over_many_seeds(factory):
    for seed in range(60):
        torch.manual_seed(seed)
        W = factory().weight.detach()
        W = W.flatten(1) if W.dim() > 2 else W
        u, v = _random_uv(W)
        _krylov.warm_up_(W, u, v, tol=1e-4)
        assert _sigma_error(W, u, v) < 1e-4, seed


def test_warm_up_on_clustered_spectrum_float32():
    """A default-initialised layer: sigma_2/sigma_1 > 0.99, plain power iteration is far off."""
    torch.manual_seed(0)
    W = nn.Linear(1024, 1024).weight.detach()
    u, v = _random_uv(W)
    u15, v15 = u.clone(), v.clone()
    _power.power_iteration_(W, u15, v15, 15, 1e-12)  # upstream parametrization's warm-up
    result = _krylov.warm_up_(W, u, v, tol=1e-4)
    assert _sigma_error(W, u15, v15) > 5e-3
    assert _sigma_error(W, u, v) < 1e-4
    assert result.steps < 60  # bounded cost: about as many mat-vec pairs as 60 power iterations


def test_tighter_tolerance_costs_more_steps_and_is_met():
    torch.manual_seed(0)
    W = nn.Linear(512, 512).weight.detach()
    start = _random_uv(W)
    steps = []
    for tol in (1e-2, 1e-6):
        u, v = (t.clone() for t in start)
        steps.append(_krylov.warm_up_(W, u, v, tol=tol).steps)
        assert _sigma_error(W, u, v) < tol
    assert steps[0] < steps[1]


def test_warm_up_draws_no_random_numbers():
    W = torch.randn(64, 32)
    u, v = _random_uv(W)
    state = torch.random.get_rng_state()
    _krylov.warm_up_(W, u, v, tol=1e-6)
    assert torch.equal(state, torch.random.get_rng_state())


def test_warm_up_leaves_vectors_alone_on_a_zero_or_nan_weight():
    for W in (torch.zeros(5, 4), torch.full((5, 4), float("nan"))):
        u, v = _random_uv(W)
        u0, v0 = u.clone(), v.clone()
        _krylov.warm_up_(W, u, v, tol=1e-4)
        assert torch.equal(u, u0) and torch.equal(v, v0)


def test_warm_up_of_rank_deficient_weight():
    a, b = torch.randn(30, 1, dtype=torch.float64), torch.randn(1, 20, dtype=torch.float64)
    W = a @ b + torch.outer(torch.randn(30, dtype=torch.float64), torch.randn(20, dtype=torch.float64))
    u, v = _random_uv(W)
    _krylov.warm_up_(W, u, v, tol=1e-8)
    assert _sigma_error(W, u, v) < 1e-8


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_power_step_and_warm_up(dtype):
    W = torch.randn(7, 9, dtype=dtype)
    u, v = _random_uv(W)
    _krylov.warm_up_(W, u, v, tol=1e-6)
    exact = torch.linalg.matrix_norm(W.to(torch.complex128), 2).item()
    s = _power.sigma(W, u, v)
    assert abs(s.imag.item()) < 1e-4 * exact and rel(s.real.item(), exact) < 1e-5


def test_half_precision_weight_warms_up_in_float32():
    W = torch.randn(40, 30).to(torch.bfloat16)
    u, v = _random_uv(W)
    _krylov.warm_up_(W, u, v, tol=1e-4)
    assert u.dtype == v.dtype == torch.bfloat16
    assert _sigma_error(W, u, v) < 1e-2  # bfloat16 storage of u, v: 8 bits of mantissa


def test_max_steps_bounds_the_work_and_reports_the_error():
    torch.manual_seed(0)
    W = nn.Linear(512, 512).weight.detach()
    u, v = _random_uv(W)
    result = _krylov.warm_up_(W, u, v, tol=1e-8, max_steps=3)
    assert result.steps == 3 and result.error_estimate > 1e-8


def test_warm_up_keeps_vectors_that_are_already_good_enough():
    """A re-convergence after a change that was none (a DDP broadcast, a move) alters nothing."""
    torch.manual_seed(0)
    W = nn.Linear(300, 200).weight.detach()
    u, v = _random_uv(W)
    _krylov.warm_up_(W, u, v, tol=1e-4)
    u0, v0 = u.clone(), v.clone()
    _krylov.warm_up_(W.clone(), u, v, tol=1e-4)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    _krylov.warm_up_(W * torch.linspace(0.5, 2, 300), u, v, tol=1e-4)  # a real change
    assert not torch.equal(v, v0)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 576), (64, 576), (128, 128), (136, 150), (256, 512), (512, 512)])
@pytest.mark.parametrize("step", [1e-3, 1e-2, 1e-1, 0.5])
def test_reconvergence_after_updates_of_every_size(shape, step):
    """A never-trained layer re-converged after each of several EMA-like updates (lerp towards
    another initialisation, from tiny to half-way): within the tolerance of the exact sigma each
    time, whether the warm attempt certified the old vectors or the cold solves ran (small
    sides: exact; large: Lanczos from the old vectors and from a fresh start)."""
    h, w = shape
    for seed in range(3):
        torch.manual_seed(seed)
        m = safe_norm.spectral_norm(nn.Linear(w, h))
        hook = next(iter(m._forward_pre_hooks.values()))
        target = torch.empty(h, w)
        nn.init.kaiming_uniform_(target, a=5**0.5)
        for _ in range(3):
            with torch.no_grad():
                m.weight_orig.data.lerp_(target, step)
            _core.converge(hook._state, hook.view(m))
            W = m.weight_orig.detach().double()
            used = torch.dot(m.weight_u.double(), W @ m.weight_v.double()).item()
            assert abs(used / torch.linalg.matrix_norm(W, 2).item() - 1) <= 1e-4, (seed, step)
