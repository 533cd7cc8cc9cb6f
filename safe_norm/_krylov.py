"""The Krylov solves behind the warm-up, re-convergence and tracking, on plain tensors.

``u``, ``v`` and sigma to a stated tolerance where upstream's power iteration would need hundreds
of steps: the exact top eigenpair of the small Gram matrix where one side is short, otherwise
Golub-Kahan-Lanczos bidiagonalisation (warm-up, re-convergence) or block Krylov with
Rayleigh-Ritz (tracking, convolutions as maps), each stopped by an a-posteriori bound on the
top Ritz value.  :mod:`safe_norm._power` holds what a training step does (the power step and
the normalisation); nothing here draws from torch's random streams.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _compat
from ._power import Map, oriented, sigma

__all__ = [
    "warm_up_",
    "WarmUp",
    "MAX_WARMUP_STEPS",
    "DEFAULT_WARMUP_TOL",
    "EXACT_SIDE",
    "track_",
    "Tracked",
    "MAX_TRACK_BLOCKS",
    "max_abs",
]

#: The relative sigma accuracy a warm-up aims for unless told otherwise.
DEFAULT_WARMUP_TOL = 1e-4

#: Upper bound on the Lanczos steps of a warm-up (each costs about one power iteration).
#: Default-initialised layers up to 4096x4096 need at most about 60 for 1e-4 (measured over
#: 20 seeds: 60 on 1024x4096, 59 on 2048x2048).
MAX_WARMUP_STEPS = 128

#: The error bound below stands the second Ritz value in for sigma_2, which under-states the
#: gap early on: stopping at the bare bound let 2-3 % of 400 seeded default-initialised layers
#: stop with errors up to 5e-3 for a tolerance of 1e-4; stopping at a tenth of it left none
#: above 1.6e-5, for a few more steps (tests/test_krylov.py sweeps this).
SAFETY = 0.1

#: The warm-up's first check of the bound, in Lanczos steps, and the most steps between checks
#: after ``k`` (``k // CHECK_SPREAD``, at least 2): from a random start a default-initialised
#: layer wider than :data:`EXACT_SIDE` takes 20-60 steps to 1e-4; from vectors converged for a
#: slightly different weight (after an EMA step) 2 usually suffice.  A check costs about one to
#: three steps of a 256-1024-wide layer (an eigensolve of T, 0.1-0.2 ms).  Replayed over 70
#: recorded one-vector solves (default-initialised 256x256 ... 2048x2048 and 256x1152 ...
#: 1024x5120 weights, planted gaps of 1-50 %, a decaying spectrum; 6 seeds), steps times a
#: step's cost plus checks times a check's came to 1.27x (at most 1.48x) a single check at the
#: stopping step, with 4.2 checks on average; with 8 and ``k // 8``, 1.40x (1.67x) and 10.2.
#: ``benchmarks/check_schedule.py`` replays it with the costs measured on the machine it runs.
FIRST_CHECK = 12
CHECK_SPREAD = 3
FIRST_WARM_CHECK = 2


class Tracked(NamedTuple):
    """One tracked training step: sigma (detached, the vectors' dtype), the Krylov blocks it
    built, the Ritz vectors to start the next step from (rows; ``None`` from the exact solve), the
    error bound of the pair taken, the block count at which the next step should check, the
    host reads it took (one per check), and whether the bound met the target (``False``: at
    the cap, the best pair found was written, and the caller must solve properly)."""

    sigma: Tensor
    blocks: int
    basis: Tensor | None
    error: float
    next_check: int
    checks: int
    met: bool


#: Vectors kept from one tracked step to the next: the top Ritz vector and the next ones.
#: Under Adam the top singular values of a layer lie within 0.1-0.3 % of each other, and the
#: top singular vector turns within that cluster from step to step (a *level crossing* when
#: another one overtakes it): a single start vector then holds little of the new top
#: direction, and Lanczos from it settles, with a small residual, on the old one.  Kept
#: neighbours put the cluster in the first block; Rayleigh-Ritz orders it exactly.
TRACK_BLOCK = 4

#: Up to this many rows or columns, the warm-up solves the small Gram matrix exactly: Lanczos
#: from a start vector that happens to be nearly orthogonal to the top singular vector can
#: settle on sigma_2 with a tiny residual (seen once in 360 small default-initialised layers:
#: a 64x48 conv weight, 0.85 % low), and at this size the exact solve costs no more.
EXACT_SIDE = 128

#: Up to this many rows or columns (the warm-up's :data:`EXACT_SIDE`), a tracked step solves
#: the small Gram matrix exactly.  Block Krylov is no use there: 24 blocks of 4 vectors would be
#: more than an 80-wide space holds (seen: a 320x80 layer tracked 10-26 % off), and near the
#: limit a few blocks already span a large part of it, where a direction outside them can
#: overtake unseen (a 256x96 layer under Adam: the bound at 3 blocks said 4.4e-4, the error
#: was 1.2e-3, on one CPU's rounding and not another's).
TRACK_EXACT_SIDE = EXACT_SIDE

#: Most Krylov blocks a tracked step builds (each: TRACK_BLOCK products with W and with Wᴴ),
#: and never more than the shorter side holds.  On a 1024x1024 layer under Adam, where each
#: step turns the top vectors far, the bound reached 1e-5 after 8-17 blocks and 1e-7 (for
#: ``track_tol=1e-6``) after up to 22.  Where it is not met there, the caller solves anew.
MAX_TRACK_BLOCKS = 24

#: Blocks built before the first check when there are no kept vectors yet (the first tracked
#: step, or after a load into a rebuilt model, a copy, a move): fresh draws hold little of the
#: other top directions, and a bound read early can vouch for the old top pair after a
#: crossing (seen: 1e-3 off with a bound of 2e-9).
FRESH_BLOCKS = 8


#: Fewest blocks before a tracked step's check: over 1024-wide layers and the SNGAN
#: discriminator under Adam, the bound read after one or two blocks under-stated the error
#: up to 19x and 7x (its stand-in for the second singular value is still far too low).  After
#: three it still did, rarely: 2.65x on another CPU's rounding (a 256x96 layer, now solved
#: exactly), and 5.8x once in the sweep of benchmarks/tracking_sweep.py (the test MLP's
#: 256x256 layer, seed 9, a forward 2.6x its 1e-4; one step in 16 000 of that model and
#: tolerance, with and without perturbed rounding).  From four on, replayed over three models
#: (tests/test_tracking.py), it stayed below 0.6x of it, and that seed stays within 0.07x.
MIN_CHECK = 4

#: A tracked step stops where the bound is within this fraction of ``track_tol``.
TRACK_SAFETY = 0.5

#: The loosest tolerance a tracked step aims for: a looser ``track_tol`` is tracked as this
#: one.  The bound trusts the kept Ritz vectors to hold the next top directions, and only the
#: top one is converged to the target: at ``track_tol=1e-3`` the others were so rough that
#: when the second and third singular values overtook the first in one Adam step (the
#: 1024-wide MLP's 1024x256 layer, seed 11, step 8 of benchmarks/tracking_sweep.py) the start
#: block held 10 % of the new top vector, Lanczos settled on the old third value, and the bound
#: said 1.7e-4 for an error of 2.2e-3 (the same step in both APIs, with and without perturbed
#: rounding).  Aimed at 1e-4, the sweep's worst forward over 3 models x 20 seeds x 200 steps
#: was 0.25x of it (README "Tracking"), i.e. 40x inside 1e-3.
TRACK_LOOSEST = 1e-4


def _host(x: Tensor) -> Tensor:
    """``x`` copied to the host: the one device synchronisation of a tracked step."""
    return x.cpu()


def _back(x: Tensor, like: Tensor | Map) -> Tensor:
    """Host data ``x`` on ``like``'s device, in its dtype.  To a CUDA device through pinned
    memory, not blocking: a copy from pageable memory waits for the device (it would be a
    second synchronisation in every check).  The caching host allocator keeps the pinned
    block until the copy has run."""
    if like.device.type == "cuda":
        return x.to(like.dtype).pin_memory().to(like.device, non_blocking=True)
    return x.to(like.device, like.dtype)


def _orthonormal(X: Tensor, against: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows of ``X`` made orthonormal (and orthogonal to ``against``'s rows), and the triangular
    factor ``R`` with ``Xᵀ = Q R`` for the part of ``X`` outside ``against`` (``Q``: the new rows).

    Projected out of ``against`` and orthonormalised twice, the QR inside the loop: where the
    Krylov space is (nearly) invariant (a degenerate top of the spectrum), what is left of a
    block after the projection is rounding noise, often nearly dependent, and its QR amplifies
    the noise's remaining part along ``against`` (seen: vectors 0.23 off orthogonal after one
    projection, QR, and a second projection before it).  Normalised first, the second pass
    removes it; its factor (near the identity) multiplies the first's."""
    if against is None:
        Q, R = torch.linalg.qr(X.mT)
        return Q.mT, R
    factor = None
    for _ in range(2):
        Q, R = torch.linalg.qr(torch.addmm(X, X @ against.mH, against, alpha=-1).mT)
        X, factor = Q.mT, (R if factor is None else R @ factor)
    assert factor is not None
    return X, factor


def _times(A: Tensor | Map, X: Tensor) -> Tensor:
    """The vectors ``X`` holds as rows, each multiplied by ``A``, as rows.  Rows keep the
    product running along ``W``'s contiguous rows whichever way ``A`` is oriented (one CPU
    thread, a 1024x1024 ``W`` and 4 vectors: 0.25-0.30 ms either way, where ``W @ X`` with a
    contiguous 1024x4 ``X`` took 1.25 ms); a :class:`Map` takes them as one batch."""
    if isinstance(A, Map):
        return A.mv(X)
    return X @ A.mT


class Bidiagonalisation:
    """Block Golub-Kahan-Lanczos bidiagonalisation of ``A`` (a matrix or a :class:`Map`) with
    full re-orthogonalisation, and for one vector Lanczos on ``AᴴA``: the one Krylov engine of
    the warm-up, re-convergence and tracking.

    From ``b`` orthonormalised start rows, step ``j`` makes the block ``U_j`` of ``A V_j``
    orthonormal to every earlier ``U``, and ``V_{j+1}`` of ``Aᴴ U_j`` orthonormal to every
    earlier ``V``; in exact arithmetic ``A 𝒱 = 𝒰 B`` with ``B`` block upper bidiagonal (diagonal
    blocks ``R_j``, superdiagonal ``L_jᴴ``, the factors of those orthonormalisations).  After
    ``k`` steps the span of ``V_1 .. V_k`` is the block Krylov space of ``AᴴA`` from the start,
    the singular triplets of ``B`` are its Rayleigh-Ritz pairs (:func:`ritz`), and their
    residuals come from ``L_k``: nothing is multiplied twice, and nothing of the basis' size
    crosses to the host.  Each step costs one product with ``A`` and one with ``Aᴴ`` of ``b``
    vectors; the coefficients stay on the device until :meth:`coefficients` reads them (the one
    host synchronisation of a check).

    Rows hold the vectors (``V``: ``(k + 1) b x n``, ``U``: ``k b x m``): a block product then runs
    along ``W``'s contiguous rows (:func:`_times`); wider blocks are orthonormalised by QR, twice
    (:func:`_orthonormal`).

    ``b = 1`` keeps no ``U``: step ``j`` multiplies ``v_j`` by ``A`` and then ``Aᴴ`` and makes the
    result orthonormal to every earlier ``v`` (Lanczos on ``AᴴA``, ``AᴴA 𝒱 = 𝒱 T + β_k v_{k+1} e_kᵀ``
    with ``T`` tridiagonal).  It is the same Krylov space, and ``T = BᴴB`` Golub-Kahan's: the same
    Ritz pairs, now the eigenpairs of ``T``.  The factors kept are ``‖A v_j‖`` (``T``'s diagonal
    is their square) and ``T``'s off-diagonal ``β_j``.  Half the ops of Golub-Kahan's step, whose
    left basis also needs orthogonalising (8 against 20: on layers up to ~1024 wide a step's
    cost is the ops' dispatch more than their arithmetic), and where the eigenvalues of ``AᴴA``
    are ``σ²`` only the small ones lose accuracy (an absolute ``u ‖A‖²``), not the top ones
    sought here.
    """

    V: Tensor
    U: Tensor
    C: Tensor
    capacity: int

    def __init__(self, A: Tensor | Map, start: Tensor, capacity: int) -> None:
        self.A, self.b, self.steps = A, start.size(0), 0
        self._room(capacity)
        if self.b == 1:
            # one vector's products, the transpose made once: one op less to dispatch per step
            self._products = (A.mv, A.rmv) if isinstance(A, Map) else (partial(torch.mv, A), partial(torch.mv, A.mH))
            norm = start.norm().to(self.C.dtype).clamp_min(torch.finfo(self.C.dtype).tiny)
            torch.div(start[0].to(self.V.dtype), norm, out=self.V[0])
        else:
            self.V[: self.b] = _orthonormal(start.to(self.V.dtype))[0]

    def _room(self, capacity: int) -> None:
        """Buffers for ``capacity`` steps, what was built kept: of that size, not of the cap
        (on a GPU the caching allocator would keep the cap's memory for every tracked map)."""
        old: Tensor | None = getattr(self, "V", None)
        if old is not None and self.capacity >= capacity:
            return
        A, b = self.A, self.b
        like = old if old is not None else torch.empty(0, dtype=A.dtype, device=A.device)
        # b = 1: whole groups of rows (ROWS_GROUP), the same products whatever the capacity
        rows = -(-(capacity + 1) // ROWS_GROUP) * ROWS_GROUP if b == 1 else (capacity + 1) * b
        V = like.new_zeros(rows, A.size(1), dtype=A.dtype)
        U = like.new_zeros(0 if b == 1 else capacity * b, A.size(0), dtype=A.dtype)
        # b = 1: norms and T's off-diagonal, real; wider: the triangular factors, in A's dtype
        C = like.new_zeros(2, capacity, b, b, dtype=V.real.dtype if b == 1 else V.dtype)
        if old is not None:
            V[: self.V.size(0)], U[: self.U.size(0)], C[:, : self.capacity] = self.V, self.U, self.C
        self.V, self.U, self.C, self.capacity = V, U, C, capacity
        # Views made once: an index, a slice or a transpose per step is one more op to dispatch,
        # and on layers up to ~512 wide the ops' dispatch, not their arithmetic, is what a step
        # costs.  They are made as the steps reach them (for the whole capacity, 128 steps where
        # ~30 are used at registration, they cost ~0.1-0.2 ms a solve).
        self._v: list[Tensor] = []
        self._alpha: list[Tensor] = []
        self._beta: list[Tensor] = []
        self._basis: list[tuple[Tensor, Tensor]] = []

    def _rows(self, steps: int) -> None:
        """Views of the rows and coefficients of at least the first ``steps`` steps (one
        vector), a few ops for all the new ones: twice as many as made before, at most the
        capacity (a solve extends its basis at every check); and of the basis step ``j``
        orthogonalises against: its rows up to the next multiple of :data:`ROWS_GROUP` past
        ``j``."""
        if len(self._alpha) >= steps:
            return
        steps = min(self.capacity, max(steps, 2 * len(self._alpha)))
        for views, rows in ((self._v, self.V[: steps + 1]), (self._alpha, self.C[0, :steps, 0, 0]),
                            (self._beta, self.C[1, :steps, 0, 0])):
            views.extend(rows[len(views):].unbind(0))
        while len(self._basis) * ROWS_GROUP < steps:
            rows = self.V[: (len(self._basis) + 1) * ROWS_GROUP]
            self._basis.append((rows, rows.mT))

    def extend(self, steps: int) -> None:
        """Steps up to ``steps`` in all (buffers grown if needed)."""
        self._room(steps)
        A, b = self.A, self.b
        if b == 1:
            self._rows(steps)
            (mv, rmv), vs, basis = self._products, self._v, self._basis
            # The three-term recurrence's subtractions (alpha_j v_j, beta_{j-1} v_{j-1}) are left
            # to the full re-orthogonalisation, which removes them too.  It runs against a few
            # rows more than built (zeros: they change nothing) rather than slice the basis anew
            # at every step.  A zero beta (the Krylov space spent) leaves NaN in the next row,
            # and in every later factor: the checks read the steps before it (one op a step
            # less than clamping the divisor).
            for j in range(self.steps, steps):
                p = mv(vs[j])
                torch.linalg.vector_norm(p, out=self._alpha[j])
                q = rmv(p)
                _orthogonalise_(q, *basis[j // ROWS_GROUP])
                torch.linalg.vector_norm(q, out=self._beta[j])
                torch.div(q, self._beta[j], out=vs[j + 1])
        else:
            for j in range(self.steps, steps):
                rows, after = slice(j * b, (j + 1) * b), slice((j + 1) * b, (j + 2) * b)
                self.U[rows], self.C[0, j] = _orthonormal(_times(A, self.V[rows]), self.U[: j * b] if j else None)
                self.V[after], self.C[1, j] = _orthonormal(_times(A.mH, self.U[rows]), self.V[: (j + 1) * b])
        self.steps = max(self.steps, steps)

    def coefficients(self, steps: int, *also: Tensor) -> list[Tensor]:
        """The factors of the first ``steps`` steps (``[2, steps, b, b]``) and the tensors
        ``also``, on the host: one read for all."""
        if not also:
            return [_host(self.C[:, :steps])]
        parts = [self.C[:, :steps], *also]
        flat = _host(torch.cat([x.reshape(-1).to(self.C.dtype) for x in parts]))
        out, at = [], 0
        for x in parts:
            out.append(flat[at: at + x.numel()].reshape(x.shape))
            at += x.numel()
        return out


#: One vector's solve orthogonalises against its basis in groups of this many rows, the rows
#: not built yet (zeros) included: one pair of views per group, not one per step.
ROWS_GROUP = 8


class Ritz(NamedTuple):
    """Rayleigh-Ritz of ``AᴴA`` on the first ``d`` steps' basis, on the host, in float64:
    the Ritz singular values (descending), their residual norms ``‖Aᴴ ũ - σ̃ ṽ‖`` (``A ṽ = σ̃ ũ``
    holds exactly in the basis), and the right Ritz vectors' coordinates (columns)."""

    values: list[float]
    residuals: list[float]
    coordinates: Tensor


def ritz(C: Tensor, d: int) -> Ritz | None:
    """:class:`Ritz` of the first ``d`` steps of a :class:`Bidiagonalisation` whose factors
    (on the host) are ``C``; ``None`` if they are not finite.

    Blocks: ``B`` (``d b`` square) has the blocks ``R_j`` on its diagonal and ``L_jᴴ`` above;
    with ``B = P Σ Qᴴ``, ``Aᴴ 𝒰 p_i = σ_i 𝒱 q_i + V_{d+1} L_d p_i`` (``p_i``'s last block): the
    residual of the i-th triplet is ``‖L_d p_i‖``.  One vector: with ``T = Y Θ Yᵀ``,
    ``AᴴA 𝒱 y_i = θ_i 𝒱 y_i + β_d v_{d+1} y_i[d]``, and ``‖Aᴴ ũ - σ̃ ṽ‖ = ‖AᴴA ṽ - σ̃² ṽ‖ / σ̃``."""
    b = C.size(-1)
    C = C.to(torch.complex128 if C.is_complex() else torch.float64)
    if b == 1:
        return _tridiagonal_ritz(C[0, :d, 0, 0], C[1, :d, 0, 0])
    # a few ops, not a loop over blocks; the blocks above the diagonal are the next block
    # row's, shifted
    B = torch.block_diag(*C[0, :d].unbind(0))
    if d > 1:
        B = B + F.pad(torch.block_diag(*C[1, : d - 1].mH.unbind(0)), (b, 0, 0, b))
    try:
        P, S, Qh = torch.linalg.svd(B)
    except torch.linalg.LinAlgError:  # non-finite factors
        return None
    values = S.tolist()  # lists: the host's arithmetic on them dispatches no ops
    if not all(math.isfinite(x) for x in values):
        return None
    residuals = torch.linalg.vector_norm(C[1, d - 1] @ P[(d - 1) * b :], dim=0).tolist()
    return Ritz(values, residuals, Qh.mH)


def _tridiagonal_ritz(norms: Tensor, beta: Tensor) -> Ritz | None:
    """:func:`ritz` of one vector's ``d`` steps: the factors ``‖A v_j‖`` and ``T``'s
    off-diagonal ``β_j`` (float64, on the host), the last ``β`` the residuals' own."""
    T = torch.diag(beta[:-1], 1)
    T = T + T.mT
    T.diagonal().copy_(norms * norms)
    try:
        theta, Y = torch.linalg.eigh(T)  # ascending
    except torch.linalg.LinAlgError:  # non-finite factors
        return None
    # Descending; T is positive semidefinite, and a value rounded below 0 is a sigma of 0.
    values = [math.sqrt(max(t, 0.0)) for t in reversed(theta.tolist())]
    last, tail = beta[-1].item(), reversed(Y[-1].tolist())
    if not all(math.isfinite(x) for x in values) or not math.isfinite(last):
        return None
    residuals = [abs(last * y) / s if s > 0 else (0.0 if last * y == 0 else math.inf) for y, s in zip(tail, values)]
    return Ritz(values, residuals, Y.flip(1))


def bound(found: Ritz | None, one_vector: bool = False) -> float:
    """:func:`_cluster_bound` of a :func:`ritz` result (the eigenpairs of ``AᴴA``: values
    ``σ̃²``, residuals ``σ̃ r``); ``inf`` where there is none."""
    if found is None or not found.values[0] > 0:
        return math.inf
    theta = [s * s for s in found.values]
    return _cluster_bound(theta, [t * r * r for t, r in zip(theta, found.residuals)], one_vector)


def _steps_to(target: float, error: float, before: float, span: int, most: int, fastest: float = 0.0) -> int:
    """Steps (Lanczos steps, or blocks) to add before the next check, where the bound is at
    ``error``, above ``target``, and was at ``before`` ``span`` steps earlier: that fall's rate
    per step (no faster than ``fastest``), extrapolated to ``target``, at least 1 and at most
    ``most``.  Krylov methods converge faster as they go, so this predicts too many rather
    than too few.  Where there is no fall to extrapolate (the bound was not defined earlier,
    was 0 there, or did not fall), ``most``.  The one check schedule of every solve."""
    if not 0 < error < before < math.inf:
        return most
    rate = math.log(max(error / before, fastest)) / span
    return max(1, min(most, math.ceil(math.log(target / error) / rate)))


#: The fastest rate per block a tracked step's schedule believes: a bound read after one or
#: two blocks can fall 10-20x in a block and then slow to 0.5-0.8x per block (1024x1024 layers
#: under Adam); extrapolating the early fall stopped 30x short of the tolerance.
FASTEST_RATE = 0.5


def _take(right: Tensor, left: Tensor, u: Tensor, v: Tensor, transposed: bool) -> Tensor:
    """Write ``u``, ``v`` from a right vector of ``A`` and ``left = A right`` (``A = Wᴴ`` for a wide
    ``W``) and return sigma, ``‖left‖ / ‖right‖``."""
    # Norms in float64: the weight is used unscaled here (no pass over it to read its
    # magnitude, as the warm-up's), and float32 squares under- or overflow where its entries
    # lie below ~1e-19 or above ~1e19 (seen: a 400x300 layer of sigma 1.8e-22 tracked 71 %
    # low with its bound met, sigma 0 and NaN vectors at 1.8e-23).
    wide = torch.promote_types(right.dtype, torch.float64)
    length = torch.linalg.vector_norm(right, dtype=wide)
    sigma = torch.linalg.vector_norm(left, dtype=wide) / length
    right, left = (right / length).flatten(), (left / (sigma * length)).flatten()
    u.copy_(right if transposed else left)
    v.copy_(left if transposed else right)
    return sigma


@torch.no_grad()
def track_(
    W: Tensor | Map, u: Tensor, v: Tensor, tol: float, *, blocks: int, basis: Tensor | None
) -> Tracked | None:
    """A training step that keeps sigma within ``tol`` of ``σ₁(W)``: block Krylov from the
    current vectors, with Rayleigh-Ritz; ``u``, ``v`` written in place with the top Ritz pair
    (``u = W v / σ``; for a wide ``W``, iterated from the other side, ``v = Wᴴ u / σ``).

    Works in the space of the shorter side of ``W`` (up to :data:`TRACK_EXACT_SIDE` long: the
    exact top eigenvector of the Gram matrix instead, solved on the host).  The start block is
    ``v`` (or ``u``) and the kept Ritz vectors ``basis`` (``None`` or stale: fixed-seed draws,
    and :data:`FRESH_BLOCKS` before the check); the space grows by block Golub-Kahan steps
    (:class:`Bidiagonalisation`), each adding ``WᴴW`` times the last block.
    No random direction in it: one in a kept vector's place made the bound read after a few
    blocks less reliable (it adds Ritz values far below their eigenvalues, and the bound
    stands the next one in for the rest of the spectrum: error/bound up to 1.2 at 3 blocks on
    the test MLP, against 0.34 without), and where the Krylov space stalls (an invariant
    subspace: a degenerate top) :func:`_orthonormal` turns the rounding left into new
    directions anyway.
    After ``blocks`` blocks (at least :data:`MIN_CHECK`) the factors and ``VᴴV`` go to the
    host (one synchronisation), which computes the error bound of the top Ritz value
    (:func:`bound`, to :data:`TRACK_SAFETY` of ``tol``, or of :data:`TRACK_LOOSEST`
    if ``tol`` is looser) for that basis, one block fewer and half of it.  Met: the top Ritz
    pair.  Missed: the blocks the bound's rate predicts are added and the check repeats (one
    more read each), up to the cap (the fewer of
    :data:`MAX_TRACK_BLOCKS` and what the space holds); missed there, the best pair is written
    and ``met`` is ``False``.  ``None`` when ``W`` is zero or not finite.
    """
    if not W.is_meta and _compat.autocast_enabled(W.device.type):
        with torch.autocast(W.device.type, enabled=False):
            return track_(W, u, v, tol, blocks=blocks, basis=basis)
    work = torch.promote_types(W.dtype, torch.float32)
    transposed = W.size(1) > W.size(0)
    A = W.detach().to(work)
    A = A if isinstance(A, Map) else A.contiguous()
    if transposed:
        A = A.mH
    n = A.size(1)
    if n <= TRACK_EXACT_SIDE:
        # exact (a few kept vectors would span a good part of this space anyway, and a
        # direction outside them can overtake)
        # a map's matrix in float64: where taps fall on the same input, its entries are sums
        exact = _exact_top(A.to(torch.float64).dense() if isinstance(A, Map) else A)
        if exact is None:
            return None
        # unit before the cast: a square weight's vector is mapped from the left side at the
        # length sigma (at sigma ~1e-20 or 1e20 its float32 product under- or overflowed)
        right = _unit(exact[0]).reshape(1, n).to(A.dtype)
        sigma = _take(right, _times(A, right), u, v, transposed)
        return Tracked(sigma.to(u.dtype), 0, None, 0.0, 0, 1, True)
    target = min(tol, TRACK_LOOSEST) * TRACK_SAFETY
    cap = min(MAX_TRACK_BLOCKS, n // TRACK_BLOCK)  # a Krylov space no larger than the space
    start = (u if transposed else v).to(work).reshape(1, n)
    if basis is None or basis.shape != (TRACK_BLOCK, n) or basis.device != A.device:
        basis = fixed_draw((n, TRACK_BLOCK), like=start).mT
        blocks = max(blocks, FRESH_BLOCKS)
    blocks = min(max(blocks, MIN_CHECK), cap)
    K = Bidiagonalisation(A, torch.cat([start, basis[1:].to(start)]), blocks)
    K.extend(blocks)
    checks = 0
    while True:
        V = K.V[: blocks * TRACK_BLOCK]
        # VᴴV in float64: under TF32 (a GPU's matmul setting) a float32 product was off by
        # ~1e-4 at n = 129-512 (emulated), and blocks would count as not orthonormal
        wide = V.to(torch.promote_types(V.dtype, torch.float64))
        C, P = K.coefficients(blocks, wide.conj() @ wide.mT)  # the one host synchronisation of a check
        checks += 1
        # Only the blocks the basis holds orthonormal count: past an invariant subspace (a
        # degenerate top: an orthogonal init) what the projections leave of a block is
        # rounding noise, and after some blocks its QR is no longer orthogonal to the basis
        # (seen: S^H S off the identity by 1 after 80 vectors, and the Ritz value of all 96
        # 9 % low with a bound of 1e-13).  V^H V rides along with the factors: no second read.
        usable = max(1, _orthonormal_blocks(P))
        size = {k: min(k, usable) for k in {blocks, blocks - 1, (blocks + 1) // 2}}
        # The bound here, halfway (where to check next time) and, if not met, a block earlier
        # (the rate); each small SVD solved once, when needed.
        found: dict[int, Ritz | None] = {}
        bounds: dict[int, float] = {}

        def bound_at(k: int) -> float:
            d = size[k]
            if d not in bounds:
                found[d] = ritz(C, d)
                bounds[d] = bound(found[d])
            return bounds[d]

        bound_at(blocks)
        now = found[size[blocks]]
        if now is None or not now.values[0] > 0:
            return None
        # The bound is not monotone; a smaller basis that met it vouches for the whole one's
        # top pair (whose value is larger), unless that value shows it wrong (a direction the
        # smaller basis missed).  The smallest one that met it is where the next step checks.
        top = now.values[0] ** 2
        passed = [k for k in size if size[k] >= MIN_CHECK and bound_at(k) <= target
                  and (top / found[size[k]].values[0] ** 2 - 1) / 2 <= bound_at(k)]  # type: ignore[union-attr]
        if passed or blocks == cap:
            break
        blocks += _steps_to(target, bound_at(blocks), bound_at(blocks - 1), 1, cap - blocks, FASTEST_RATE)
        K.extend(blocks)
    Y = _back(now.coordinates[:, :TRACK_BLOCK].mT, K.V)  # coordinates, a row per Ritz vector
    right = Y @ K.V[: Y.size(1)]
    # sigma of the vector as it is, from its own product: whatever rounding did to the basis,
    # ‖W v‖ / ‖v‖ is never above sigma_1
    sigma = _take(right[:1], _times(A, right[:1]), u, v, transposed)
    error = min((bound_at(k) for k in passed), default=bound_at(blocks))
    return Tracked(sigma.to(u.dtype), blocks, right, error, min(passed, default=blocks), checks,
                   bool(passed))


#: Largest deviation of ``VᴴV`` from the identity a tracked step's basis may have (float32
#: rounding leaves ~3e-7): the Ritz pairs read from the bidiagonal factors are those of the
#: basis only while it is orthonormal.
ORTHONORMAL = 1e-4


def _orthonormal_blocks(P: Tensor) -> int:
    """How many leading blocks of a basis with Gram matrix ``P = SᴴS`` (on the host) are
    orthonormal to :data:`ORTHONORMAL`."""
    D = P.clone()
    D.diagonal().sub_(1)
    D = D.abs()
    worst = D.triu().amax(0).cummax(0).values  # over the leading d x d, for each d
    columns = int((worst <= ORTHONORMAL).sum())  # a prefix: the running maximum only grows
    return columns // TRACK_BLOCK


def _cluster_bound(theta: list[float], r2: list[float], one_vector: bool = False) -> float:
    """Bound on the relative error of ``sqrt(theta[0])`` as ``σ₁``, from the Rayleigh-Ritz
    values ``theta`` (eigenvalues of the projected ``WᴴW``, descending) and the squared
    residual norms ``r2`` of their Ritz vectors.

    For any ``k``, the top ``k`` pairs as a block: ``λ₁ - θ₁ ≤ Σᵢ≤ₖ rᵢ² / δₖ``, where ``δₖ``
    separates ``θₖ`` from the rest of the spectrum.  The next Ritz value stands in for the rest,
    raised by its own residual (an eigenvalue lies within it): a Ritz pair that has not
    converged may hide a larger value, such as a direction that is overtaking the top one (a
    level crossing), and then no bound is claimed across it.  ``k = 1`` is the usual gap bound;
    a larger ``k`` takes a cluster of nearly equal top values as one.  Halved for sigma,
    relative.

    ``one_vector``: the solve of one vector, whose Krylov space does not resolve a cluster (a
    singular value it has not separated yet can sit inside one: taking sigma_2 and sigma_3 as a
    cluster, a constructed case stopped at a bound of 3.7e-8 with an error of 2.0e-3, where
    ``k = 1`` alone ran on to 1e-10), and whose second Ritz pair is still rough when the top
    one has converged: ``k = 1`` only, the next Ritz value standing in unraised.
    """
    best = math.inf
    total = 0.0
    for k in range(1, 2 if one_vector else len(theta)):
        total += r2[k - 1]
        if total >= best * theta[0]:
            break  # every later term is at least total / theta[0]: none can be smaller
        gap = theta[k - 1] - theta[k] - (0.0 if one_vector else math.sqrt(r2[k]))
        if gap > 0:
            best = min(best, total / gap)
    return 0.5 * best / theta[0]


class WarmUp(NamedTuple):
    """What a warm-up did: Lanczos ``steps`` (products with ``W``) and the estimated relative
    error of sigma; from a block solve, its Ritz vectors (a tracked step's start)."""

    steps: int
    error_estimate: float
    basis: Tensor | None = None


@torch.no_grad()
def warm_up_(
    W: Tensor | Map,
    u: Tensor,
    v: Tensor,
    *,
    tol: float,
    max_steps: int = MAX_WARMUP_STEPS,
    exact_side: int | None = None,
    u_first: bool = False,
    warm_steps: int = 0,
    reconverge: bool = False,
) -> WarmUp:
    """Converge ``u`` and ``v`` in place so that ``uᴴ W v`` is within ``tol`` of ``σ₁(W)``.

    Plain power iteration converges like ``(σ₂/σ₁)^k``, and on default-initialised layers
    ``σ₂/σ₁`` is 0.99 or more, so it would take hundreds of iterations.  Instead:

    * if one side of ``W`` has at most ``exact_side`` (default :data:`EXACT_SIDE`) entries, the
      leading eigenvector of the small Gram matrix, in float64: exact, and cheap there;
    * otherwise Golub–Kahan–Lanczos bidiagonalisation started from ``v`` (at registration,
      upstream's random draw),
      which extracts the best vector of the same Krylov space and reaches 1e-4 in a few dozen
      steps (each costs one product with ``W`` and one with ``Wᴴ``).  Full
      re-orthogonalisation keeps it stable in float32; half types are worked on in float32.

    With ``reconverge`` the vectors were converged for an earlier weight; then ``warm_steps``
    (after a small change: an EMA step) Lanczos steps from them are tried first, and if they do
    not reach the tolerance the solve above runs, the Lanczos one also from a fresh start.

    Afterwards the invariant ``u = normalize(W v)`` (with ``u_first``: ``v = normalize(Wᴴu)``)
    holds, as after an upstream training step of that order, and the vectors keep their dtype.
    Nothing is drawn from torch's random streams.  Vectors that already give a
    sigma within tolerance of the new estimate are left as they are.  If ``W`` maps the start to
    zero or is not finite (an all-zero weight, for instance), ``u`` and ``v`` are left as they
    were: they never become zero or NaN here.
    """
    if not W.is_meta and _compat.autocast_enabled(W.device.type):
        # Under autocast the products would run in half precision, against float32 vectors
        with torch.autocast(W.device.type, enabled=False):
            return warm_up_(W, u, v, tol=tol, max_steps=max_steps, exact_side=exact_side,
                            u_first=u_first, warm_steps=warm_steps, reconverge=reconverge)
    if u_first:
        W, u, v = oriented(W, u, v, True)
    if min(W.shape) == 0:
        return WarmUp(0, 0.0)
    work = torch.promote_types(W.dtype, torch.float32)
    # the warm-up's one read of the weight's magnitude (a map's norm scales with its weight's)
    scale = max_abs((W.weight if isinstance(W, Map) else W).detach()).item()
    if not (scale > 0 and math.isfinite(scale)):
        return WarmUp(0, math.inf)  # an all-zero or non-finite weight: nothing to converge to
    # Singular vectors do not depend on the scale.  Weights of large or small magnitude are
    # worked on as W / max|W|, so that the squares inside the norms neither under- nor
    # overflow: Lanczos on WᴴW holds vectors of the size sigma², and their norms square them.
    # Inside SAFE_SCALE they cannot: sigma lies between max|W| and max|W| sqrt(mn), i.e.
    # within 2^-8 ... 2^31 for fewer than 2^46 entries, so sigma⁴ stays below float32's 2^127
    # and the entries' squares, down to sigma⁴ / 2^26, above its 2^-126 (at 2^32 the norms
    # overflowed from sigma ~4e9, and the warm-up gave up silently: a 1024x1024 layer with
    # max|W| = 1e9 was left 29 % off).  There the weight is used as it is: a scaled copy is a
    # pass over W and an allocation of its size (at 4096x4096, 40 ms: more than ten of its
    # products).
    Ws = W.detach().to(work)
    if not SAFE_SCALE[0] <= scale <= SAFE_SCALE[1]:
        Ws = Ws / scale
    small = min(W.shape) <= (EXACT_SIDE if exact_side is None else exact_side)
    found = None
    if warm_steps and not isinstance(Ws, Map):  # a map's near pairs need the block solve
        tried = _lanczos_top(Ws, u.to(work), v.to(work), tol, warm_steps, first_check=FIRST_WARM_CHECK)
        if tried is not None and tried[2].error_estimate <= tol * SAFETY:
            found = tried
    if found is None and small:
        found = _exact_top(Ws.dense() if isinstance(Ws, Map) else Ws)
    block = None
    if found is None and not small and isinstance(Ws, Map):
        block = _block_top(Ws, u.to(work), v.to(work), tol)
        if block is not None and block[2].error_estimate <= tol:
            found = block
    if found is None and not small:
        found = _lanczos_top(Ws, u.to(work), v.to(work), tol, max_steps)
        if reconverge or isinstance(Ws, Map):
            # After a larger change the previous top vector can sit near a lower singular
            # vector of the new weight, where Lanczos from it settles with a small residual (a
            # level crossing: seen 3.6e-3 low on a 512x512 layer); a second run from a fixed
            # random start (which alone missed once in ~80 such re-convergences, 6.8e-3 low)
            # rarely misses the same way, and the larger Ritz value is the better one.
            # Convolutions as maps always take both: their top singular values come in near
            # pairs (a real kernel's frequencies k and -k; exact pairs under circular padding),
            # and from a start with little of the top vector Lanczos settled on the second
            # with a tight bound (2 of 312 random 560-1152-wide maps, 2.0e-4 and 2.5e-4 low
            # for gaps of 2.0e-4 and 2.5e-4; both found by the second run).
            other = _lanczos_top(Ws, u.to(work), v.to(work), tol, max_steps, fresh_start=True)
            if found is None or (other is not None and other[1] > found[1]):
                found = other
        if block is not None and (found is None or block[1] > found[1] * (1 + tol * SAFETY)):
            # the block solve's value, unvouched (its error inf: a warning), beats Lanczos' by
            # more than rounding: Lanczos settled below the top
            found = block
    if found is None:
        return WarmUp(0, math.inf)
    new_v, top_sigma, result = found
    # Vectors that already give a sigma this good are kept as they are: re-converging after a
    # change that was none (a DDP broadcast, a move, an equal copy) then alters no state.
    # Only unit vectors count: buffers of `to_empty()` or blended by an EMA over the state_dict
    # can give any value of u^H W v.
    a, b = u.to(new_v.dtype), v.to(new_v.dtype)
    unit = max(abs(a.norm().item() - 1), abs(b.norm().item() - 1)) <= tol * SAFETY
    if unit and sigma(Ws.to(new_v.dtype), a, b).real.item() >= top_sigma * (1 - tol * SAFETY):
        return result
    if not torch.isfinite(new_v).all():
        return WarmUp(result.steps, math.inf)
    # Each by its own norm, not through the layer's eps (F.normalize): on the unscaled weight
    # W v has the norm sigma, which can lie below eps (a layer of sigma 1e-6, eps=1e-4), and
    # normalize would leave u that much short of unit length.  Neither is zero: v is a top
    # singular vector estimate of a nonzero W.
    v.copy_(_unit(new_v))
    u.copy_(_unit(Ws.mv(v.to(work))))
    return result


def _block_top(A: Map, u: Tensor, v: Tensor, tol: float) -> tuple[Tensor, float, WarmUp] | None:
    """(top right singular vector, sigma, WarmUp) of a map by :func:`track_`'s block Krylov
    with Rayleigh-Ritz, from ``v`` (or ``u``) and fixed-seed draws; the error is ``inf`` where
    its bound is not met at its cap (``None``: a zero or non-finite map).  A convolution's top
    singular values come in near pairs (a real kernel's frequencies k and -k), which
    single-vector Lanczos does not resolve: from a start
    with little of the top vector it settled on the second with a tight bound (4 of 624 random
    180-1152-wide maps, 1.4e-4 to 2.5e-4 low for gaps of 1.4e-4 to 2.5e-4, two of them from
    both of two starts); a block of four holds the pair and Rayleigh-Ritz orders it."""
    u, v = u.clone(), v.clone()
    found = track_(A, u, v, tol, blocks=FRESH_BLOCKS, basis=None)
    if found is None:
        return None
    # v: the right vector; the error is inf where the bound was not met at the cap
    error = found.error if found.met else math.inf
    return v, found.sigma.item(), WarmUp(found.blocks * TRACK_BLOCK, error, found.basis)


def _unit(x: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(x)
    return x / norm.clamp_min(torch.finfo(norm.dtype).tiny)


#: The range of max|W| in which a warm-up works on the weight unscaled (see :func:`warm_up_`).
SAFE_SCALE = (2.0**-8, 2.0**8)


def max_abs(W: Tensor) -> Tensor:
    """``max |W|`` (of the real and imaginary parts, for complex ``W``) in two reductions and
    without a temporary of ``W``'s size; NaN or inf where ``W`` holds one (both reductions
    propagate NaN), so it is also the check that ``W`` is finite (``isfinite(W).all()`` takes
    five passes and three such temporaries: 110 ms at 4096x4096 on one thread, against 6 ms).
    Not ``aminmax``, one pass: torch 2.1 has no CPU float16 kernel for it."""
    if W.dim() == 2 and not W.is_contiguous() and W.mT.is_contiguous():
        W = W.mT  # the same entries, in storage order (a transposed reduction: 25x slower)
    if W.is_complex():  # the conjugate bit of a .mH view does not change the magnitudes
        W = torch.view_as_real(W.conj() if W.is_conj() else W)
    return torch.maximum(-W.amin(), W.amax())


#: Seed of the private generator that draws a fresh Lanczos start: not one users seed their own
#: runs with (a start drawn from the stream the weight was drawn from is correlated with it).
START_SEED = 0x5AFE_5EED

def fixed_draw(shape: int | tuple[int, ...], like: Tensor) -> Tensor:
    """A dense random tensor of ``shape`` (a vector of that length for an int) in ``like``'s
    dtype and device, the same at every call: drawn (real) from a private generator, so the
    caller's random stream is left as it is."""
    generator = torch.Generator(like.device).manual_seed(START_SEED)
    draw = torch.randn(shape, generator=generator, device=like.device, dtype=like.real.dtype)
    return draw.to(like.dtype)


#: Relative change of the weight's content (its product with a probe vector) since the last
#: convergence up to which the vectors count as a warm start.  Larger changes can move another
#: singular value above the old top one, and Lanczos from the old top vector then settles below
#: sigma_1 with a bound that does not show it (seen 2.7e-4 low after a half-way lerp to another
#: initialisation).
WARM_CHANGE = 1e-2

#: Lanczos steps a re-convergence after a small change tries from the current vectors before a
#: cold solve (tests/test_krylov.py sweeps update sizes; after an EMA step 2 usually suffice).
WARM_STEPS = 8



def _exact_top(W: Tensor) -> tuple[Tensor, float, WarmUp] | None:
    """(top right singular vector, sigma, WarmUp) from the eigendecomposition of the Gram
    matrix of ``W``'s shorter side, in float64 (complex128 for complex weights), solved on the
    host; the vector on ``W``'s device, in that dtype, of length sigma where it is mapped from
    the left side.  ``None`` where ``W`` is zero or not finite: the exact solve of the warm-up
    and of a tracked step."""
    A = W.detach().to(torch.promote_types(W.dtype, torch.float64))
    left = A.size(0) <= A.size(1)
    try:  # on the host: an eigensolver synchronises with a GPU anyway
        values, vectors = torch.linalg.eigh(_host(A @ A.mH if left else A.mH @ A))
    except torch.linalg.LinAlgError:  # NaN or inf in W (a tracked step's weight can hold them)
        return None
    value = values[-1].item()
    if not (value > 0 and math.isfinite(value)):  # zero, or NaN: not finite
        return None
    top = _back(vectors[:, -1], A)
    new_v = A.mH @ top if left else top  # left: W's top left vector, mapped to the right
    return new_v, math.sqrt(value), WarmUp(0, 0.0)


def _lanczos_top(
    W: Tensor | Map, u: Tensor, v: Tensor, tol: float, max_steps: int, *, fresh_start: bool = False,
    first_check: int = FIRST_CHECK,
) -> tuple[Tensor, float, WarmUp] | None:
    """(top right singular vector estimate, its Ritz value, WarmUp) by Golub–Kahan–Lanczos,
    started from ``v`` (or ``u``), or with ``fresh_start`` from a fixed-seed random vector.
    The bound is read at ``first_check`` steps and then every few (:func:`_golub_kahan`)."""
    # From the smaller side: fewer entries per vector to orthogonalise.
    transposed = W.size(1) > W.size(0)
    A = W.mH if transposed else W
    start = u if transposed else v
    norm = start.norm()
    if fresh_start or not bool(norm > 0 and torch.isfinite(norm)):
        # A fixed-seed draw, so that the caller's random stream is left as it is (also where
        # there is no start: buffers of `to_empty()`, vectors zeroed by a user).
        start = fixed_draw(start.shape[0], like=start)
    found = _golub_kahan(A, start, tol, max_steps, first_check)
    if found is None:
        return None
    new_v = found.right
    if transposed:  # that was W's left one: map it to the right
        new_v = A.mv(new_v)
    return new_v, found.ritz, WarmUp(found.steps, found.error)


#: A one-vector solve takes its Krylov space as spent where beta_j is at most this many units
#: of rounding of the largest ‖A v_i‖² (``T``'s diagonal) seen so far.
SPENT = 8


def _spent(C: Tensor, steps: int) -> int | None:
    """The first of a one-vector solve's first ``steps`` steps whose beta is at rounding level
    (:data:`SPENT`; ``C``: its factors on the host, in the solve's real dtype): the Krylov space
    ends there.  ``None`` where none is."""
    eps, largest = torch.finfo(C.dtype).eps, 0.0
    for i, (norm, beta) in enumerate(zip(C[0, :steps, 0, 0].tolist(), C[1, :steps, 0, 0].tolist())):
        largest = max(largest, norm * norm)
        if not beta > SPENT * eps * largest:
            return i
    return None


class _TopPair(NamedTuple):
    """What a one-vector solve found (not :class:`Ritz`, the pairs of a basis)."""

    right: Tensor  # top right singular vector estimate of A (unit)
    ritz: float  # the top Ritz value: the estimate of sigma_1(A)
    error: float  # bound on its relative error
    steps: int


def _golub_kahan(A: Tensor | Map, start: Tensor, tol: float, max_steps: int,
                 first_check: int = FIRST_CHECK) -> _TopPair | None:
    """Golub–Kahan–Lanczos, as Lanczos on ``AᴴA`` (a :class:`Bidiagonalisation` of one vector),
    of ``A`` (a matrix, or a :class:`Map`: a linear map given by its products) from ``start``
    (right side), until the error bound of the top Ritz value is within ``tol``.

    The bound is read at ``first_check`` steps and then where :func:`_steps_to` says, at most
    ``max(2, k // CHECK_SPREAD)`` steps later after ``k`` steps (overshoot is bounded by it; one host synchronisation
    per check, none per step: on a CPU the check's small eigensolve costs as much as a step's products
    on a 512x512 weight).  Checking later than the first step that would
    have met it can only add steps.  ``None`` when ``A`` maps ``start`` to zero (or to
    non-finite values).

    The bound is :func:`bound`, the block solves' (for one vector: the eigenvalue bound on
    ``WᴴW``, ``(σ₁ - σ̃)/σ̃ ≲ r² / (2(σ̃² - σ̃₂²))``, the second Ritz value standing in for
    ``σ₂``), or the relative residual ``r/σ̃`` where that is smaller.
    """
    k_max = min(A.size(1), max_steps)
    if k_max < 1:
        return None
    K = Bidiagonalisation(A, start.reshape(1, -1), k_max)
    check, before = min(max(first_check, 2), k_max), (0, math.inf)  # (steps, bound) at the last check
    while True:
        K.extend(check)
        (C,) = K.coefficients(check)  # the one synchronisation of this check
        norms = C[0, :, 0, 0].tolist()
        # a step after a zero beta (the Krylov space spent: its best is the answer) gives NaN
        usable = next((i for i, a in enumerate(norms) if not math.isfinite(a)), check)
        if usable == 0 or not norms[0] > 0:
            return None  # a zero product on the first step
        # A beta at rounding level is a zero one: what is left of AᴴA v_j after the projections
        # is then rounding only, which two Gram-Schmidt passes cannot make orthogonal, and the
        # next vectors lose orthogonality step by step (seen on diag(2, 1, ..., 1), 300x300:
        # Ritz values above sigma_1, 128 steps, 50 % off).  Cut there: the residuals (and the
        # error) come from that beta as from any other.
        spent = _spent(C, usable)
        exhausted = usable < check or spent is not None
        if spent is not None:
            usable = spent + 1
        k = usable
        found = ritz(C, k)
        if found is None:
            return None
        s1, error = found.values[0], _one_vector_error(found, k, tol)
        # Not at the first step: its bound has no second Ritz value and takes sigma_2 as 0.
        if (k > 1 and error <= tol * SAFETY) or exhausted or check == k_max:
            top = _back(found.coordinates[:, 0], K.V)  # computed on the host
            return _TopPair(top @ K.V[:k], s1, error, k)
        check = min(k + _steps_to(tol * SAFETY, error, before[1], k - before[0], max(2, k // CHECK_SPREAD)), k_max)
        before = (k, error)


def _one_vector_error(found: Ritz, k: int, tol: float) -> float:
    """The error estimate a one-vector solve stops on, from its Ritz pairs after ``k`` steps."""
    residual = found.residuals[0] / found.values[0]
    # The one-vector bound (see _cluster_bound): the second Ritz value stands in for
    # sigma_2 unraised.  From vectors converged for a nearby weight (an EMA step) the top
    # pair converges in 2-4 steps while the second is still rough, and the raised bound,
    # claiming no gap, sent every such re-convergence on to a cold solve (the EMA
    # benchmark's update + forward: 1.25x -> 1.62-1.69x upstream's).  SAFETY was measured
    # for this form.  One Ritz value (the first step, or a space of one dimension):
    # sigma_2 taken as 0.  A Ritz pair is also within its residual of a singular value:
    # where that is the smaller, it counts.
    error = min(residual, bound(found, one_vector=True) if k > 1 else 0.5 * residual**2)
    # The bound counts only once the residual itself is within tolerance: where sigma_1
    # and sigma_2 lie closer than one vector's Krylov space resolves, the Ritz value mixes
    # both, the second Ritz value stands for sigma_3, and the bound understates the error
    # (seen 2.7e-4 for a relative gap of 3.5e-4); the residual bounds it there.  It is what
    # decides the stop on default-initialised layers: over 256^2 ... 512x2304, 30 seeds, the
    # errors there were 4e-9 ... 6e-8 for a tolerance of 1e-4 (the same stop as with the
    # plain gap bound in 28, 1-2 steps later in 2).
    if residual > tol:
        error = max(error, residual)
    return error


def _orthogonalise_(x: Tensor, basis: Tensor, basis_t: Tensor) -> None:
    """``x`` made orthogonal to the rows of ``basis`` (``basis_t`` its transpose): classical
    Gram-Schmidt applied twice ("twice is enough", Kahan/Parlett), ``x -= Bᵀ (B̄ x)``."""
    for _ in range(2):
        x.addmv_(basis_t, torch.mv(basis.conj(), x), alpha=-1)
