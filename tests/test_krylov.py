"""The Krylov engine of safe_norm._krylov (block Golub-Kahan-Lanczos) and the warm-up's solves,
against exact float64 references: the engine's bases, its bidiagonal factors, the Ritz pairs
and residuals read from them; the warm-up's tolerance, invariants and degenerate weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

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


def _run(shape, b, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=g, dtype=dtype)
    K = _krylov.Bidiagonalisation(A, torch.randn(b, shape[1], generator=g, dtype=dtype), steps)
    K.extend(steps)
    (C,) = K.coefficients(steps)
    return A, K, C


def _block_bidiagonal(C, d):
    """B from the factors, written out independently of ritz(): R_j on the diagonal, L_j^H
    above it."""
    b = C.size(-1)
    B = torch.zeros(d * b, d * b, dtype=C.dtype)
    for j in range(d):
        B[j * b:(j + 1) * b, j * b:(j + 1) * b] = C[0, j]
        if j + 1 < d:
            B[j * b:(j + 1) * b, (j + 1) * b:(j + 2) * b] = C[1, j].mH
    return B


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_one_vector_tridiagonalises_AhA(shape, dtype):
    """One vector: ``AᴴA 𝒱 = 𝒱 T + β_k v_{k+1} e_kᵀ`` with an orthonormal basis, ``T``'s diagonal the
    squared norms ``‖A v_j‖²``, real and complex; no left basis is kept.  Steps past a group of
    rows orthogonalised against at once (ROWS_GROUP)."""
    steps = _krylov.ROWS_GROUP + 4
    A, K, C = _run(shape, 1, steps, dtype)
    V = K.V[:steps].mT  # columns
    assert torch.allclose(V.mH @ V, torch.eye(steps, dtype=dtype), atol=1e-12)
    assert torch.allclose(K.V[steps].norm(), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(K.V[steps: steps + 1].conj() @ V, torch.zeros(1, steps, dtype=dtype), atol=1e-12)
    norms, beta = C[0, :steps, 0, 0], C[1, :steps, 0, 0]
    T = torch.diag(norms**2) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    assert torch.allclose((A @ V).norm(dim=0), norms, atol=1e-12)
    expected = V @ T.to(dtype)
    expected[:, -1] += beta[-1] * K.V[steps]
    assert torch.allclose(A.mH @ (A @ V), expected, atol=1e-10)
    assert K.U.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_bases_are_orthonormal_and_bidiagonalise_A(shape, dtype):
    """Blocks: ``A 𝒱 = 𝒰 B`` and ``Aᴴ 𝒰 = 𝒱 Bᴴ + V_{k+1} L_k E_kᵀ`` with orthonormal bases, real
    and complex."""
    b, steps = 3, 5
    A, K, C = _run(shape, b, steps, dtype)
    d = steps * b
    V, U = K.V[:d].mT, K.U[:d].mT  # columns
    eye = torch.eye(d, dtype=dtype)
    assert torch.allclose(V.mH @ V, eye, atol=1e-12) and torch.allclose(U.mH @ U, eye, atol=1e-12)
    B = _block_bidiagonal(C, steps).to(dtype)
    assert torch.allclose(A @ V, U @ B, atol=1e-10)
    tail = K.V[d:d + b].mT @ C[1, steps - 1].to(dtype)  # V_{k+1} L_k, on the last block's columns
    expected = V @ B.mH
    expected[:, d - b:] += tail
    assert torch.allclose(A.mH @ U, expected, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("b", [1, 4])
def test_ritz_pairs_and_residuals_are_those_of_the_basis(b, dtype):
    """Each Ritz value is ``‖A ṽ‖`` of its own vector, the residual read from the factors is
    ``‖Aᴴ ũ - σ̃ ṽ‖`` computed outright, and no Ritz value exceeds the exact sigma_1."""
    steps = 4
    A, K, C = _run((60, 50), b, steps, dtype, seed=1)
    exact = torch.linalg.matrix_norm(A, 2).item()
    for d in range(1, steps + 1):
        found = _krylov.ritz(C, d)
        assert found is not None
        assert found.values[0] <= exact * (1 + 1e-12)
        right = found.coordinates.mT.to(dtype) @ K.V[: d * b]  # rows: the right Ritz vectors
        for i in range(d * b):
            v = right[i]
            assert abs(v.norm().item() - 1) < 1e-10
            Av = A @ v
            sigma = found.values[i]
            assert abs(Av.norm().item() - sigma) < 1e-9 * exact
            if sigma > 1e-6 * exact:
                residual = (A.mH @ (Av / sigma) - sigma * v).norm().item()
                assert abs(residual - found.residuals[i]) < 1e-9 * exact, (d, i)


def test_the_top_ritz_value_converges_and_the_bound_holds():
    """From a block of 4 on a 200x150 matrix, the bound read at each step is at least the true
    error once it is below 1e-2, and the error falls to rounding."""
    A, K, C = _run((200, 150), 4, 20, torch.float64, seed=2)
    exact = torch.linalg.matrix_norm(A, 2).item()
    errors = []
    for d in range(2, 21):
        found = _krylov.ritz(C, d)
        error = 1 - found.values[0] / exact
        errors.append(error)
        if _krylov.bound(found) < 1e-2:
            assert error <= _krylov.bound(found) + 1e-14
    assert errors[-1] < 1e-10 and errors[0] > errors[-1]


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("capacity", [3, 20])
def test_growing_the_buffers_keeps_what_was_built(b, capacity):
    """Steps added in several extends (a solve that checks and goes on), into buffers grown on
    the way (capacity 3) or not (20; one vector: its rows' views made as the steps reach them),
    give the same basis and factors as building them all at once."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(80, 70, generator=g, dtype=torch.float64)
    start = torch.randn(b, 70, generator=g, dtype=torch.float64)
    once = _krylov.Bidiagonalisation(A, start, 9)
    once.extend(9)
    grown = _krylov.Bidiagonalisation(A, start, capacity)
    for steps in (2, 3, 6, 7, 9):
        grown.extend(steps)
    rows = slice(0, once.V.size(0))
    assert torch.equal(once.V, grown.V[rows]) and torch.equal(once.U, grown.U[: once.U.size(0)])
    assert torch.equal(once.C, grown.C[:, :9])


def test_non_finite_factors_give_no_ritz_pairs():
    A, K, C = _run((30, 20), 2, 3, torch.float64)
    C = C.clone()
    C[0, 1, 0, 0] = float("nan")
    assert _krylov.ritz(C, 3) is None and _krylov.bound(None) == float("inf")


def test_a_check_after_one_without_a_bound_is_scheduled():
    """The bound is ``inf`` where no gap is resolved yet (early checks of a re-convergence from
    vectors of a nearby weight); the next check's schedule cannot take a rate from it."""
    assert _krylov._steps_to(1e-5, 1e-3, math.inf, 2, 2) == 2  # no rate: the most
    assert _krylov._steps_to(1e-5, 1e-3, 1e-2, 8, 2) == 2  # the rate (16 steps), capped
    assert _krylov._steps_to(1e-5, 1e-3, 1e-2, 8, 100) == 16
    assert _krylov._steps_to(1e-5, 1e-3, 1e-1, 1, 100, fastest=0.5) == 7  # no faster than 0.5
    assert _krylov._steps_to(1e-5, 1e-3, 1e-3, 1, 100) == 100  # no fall: the most


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_reconvergence_from_converged_vectors_after_a_small_change(steps):
    """An EMA-sized change, then a warm-up from the old vectors: within the tolerance."""
    torch.manual_seed(0)
    W = torch.randn(300, 200)
    u, v = torch.randn(300), torch.randn(200)
    _krylov.warm_up_(W, u, v, tol=1e-4)
    W2 = W + 1e-3 * W.norm() / 300 * torch.randn_like(W)
    found = _krylov.warm_up_(W2, u, v, tol=1e-4, warm_steps=steps, reconverge=True)
    exact = torch.linalg.matrix_norm(W2.double(), 2).item()
    assert found.error_estimate <= 1e-4
    assert abs(torch.dot(u.double(), W2.double() @ v.double()).item() / exact - 1) < 1e-4


def _near_triple_top(seed, n=256):
    """sigma = 1, 0.998, 0.998 (1 - 1e-4) above a bulk <= 0.6, and a start holding 1e-3 of the
    top right vector: one vector's Krylov space separates sigma_2 and sigma_3 late."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([1.0, 0.998, 0.998 * (1 - 1e-4)], dtype=torch.float64)
    s = torch.cat([top, torch.rand(n - 3, generator=g, dtype=torch.float64) * 0.6]).sort(descending=True).values
    U, _ = torch.linalg.qr(torch.randn(300, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    coefficients = torch.randn(n, generator=g, dtype=torch.float64)
    coefficients[0] = 1e-3
    return (U * s) @ V.mT, V @ coefficients


@pytest.mark.parametrize("seed", [8, 11, 23])
def test_one_vector_does_not_take_a_cluster_it_has_not_resolved(seed):
    """The bound of a one-vector solve is its ``k = 1`` term: with the cluster terms these
    solves stopped at step 12 with the top value 2e-3 low (sigma_2 and sigma_3 taken as one
    cluster), where ``k = 1`` runs on to step 17 and 1e-10.  (From this start 14 other seeds of
    40 settle on sigma_2 at step 8 under either bound: a space that has not seen sigma_1 cannot
    tell, which is why the solves start from random draws, not from such a vector.)"""
    A, start = _near_triple_top(seed)
    found = _krylov._golub_kahan(A, start, 1e-4, 128)
    assert 1 - found.ritz <= 1e-4, found


@pytest.mark.parametrize("scale", [1e-23, 1e-21, 1e-19, 1e20])
@pytest.mark.parametrize("shape", [(400, 300), (64, 64), (80, 60), (60, 80)])
def test_a_tracked_step_of_a_weight_of_extreme_magnitude(scale, shape):
    """A tracked step works on the weight unscaled: its sigma is within the tolerance and its
    vectors finite whatever float32's squares would do (at 1e-22 they were 71 % off, bound met).
    Block Krylov (400x300) and the exact solve, square (its vector is mapped from the left side)
    and not (a square 64x64 gave NaN vectors at 1e-25 and 1e20 when that vector was cast to
    float32 at the length sigma)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g) / 20 * scale
    exact = torch.linalg.matrix_norm(W.double(), 2).item()
    u = torch.nn.functional.normalize(torch.randn(shape[0], generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(shape[1], generator=g), dim=0)
    found = _krylov.track_(W, u, v, 1e-4, blocks=4, basis=None)
    assert found is not None and found.met
    assert abs(found.sigma.item() / exact - 1) <= 1e-4
    assert u.isfinite().all() and v.isfinite().all()
    assert abs(torch.dot(u.double(), W.double() @ v.double()).item() / exact - 1) <= 1e-4


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


@pytest.mark.parametrize("scale", [2.0**-31.9, 1e-9, 1.0, 1e9, 2.0**31.9])
def test_warm_up_of_a_weight_of_any_magnitude(scale):
    """Lanczos on WᴴW squares sigma² in its norms: float32 weights of max|W| 1e9 (sigma ~4e10,
    inside the old unscaled range) overflowed there and the warm-up gave up silently."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(512, 384, generator=g)
    W = W / W.abs().max() * scale
    u, v = _random_uv(W)
    found = _krylov.warm_up_(W, u, v, tol=1e-4)
    assert found.steps > 0 and found.error_estimate <= 1e-4
    assert _sigma_error(W, u, v) < 1e-5


def _permuted_diagonal(values, n, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.ones(n)
    d[: len(values)] = torch.tensor(values)
    return d[torch.randperm(n, generator=g)].diag()[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("W", [
    torch.eye(200), torch.diag(torch.tensor([2.0] + [1.0] * 299)), _permuted_diagonal([3, 2, 0.5, 0.25], 150, 0),
    _permuted_diagonal([2, 1 + 2**-10], 250, 1)], ids=["eye", "diag(2,1..1)", "permuted", "near pair"])
def test_warm_up_where_the_krylov_space_is_exactly_invariant(W):
    """Products that are exact (diagonal, permutations) leave a beta of pure rounding where the
    Krylov space is spent; taken as a step, the vectors after it lost orthogonality (Ritz values
    above sigma_1, 128 steps, 50 % off on diag(2, 1, ..., 1)).  It is the end of the space."""
    u, v = _random_uv(W)
    found = _krylov.warm_up_(W, u, v, tol=1e-4)
    assert found.steps <= 16 and found.error_estimate <= 1e-4
    assert _sigma_error(W, u, v) < 1e-6


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
