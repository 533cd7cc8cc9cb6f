"""The maths of spectral normalisation, on plain tensors (no modules, no hooks).

Both public APIs are thin adapters over these functions, so a numerical change made here
reaches both.  Conventions follow upstream: ``W`` is the weight viewed as a matrix with the
output dimension first, ``u`` (length ``h``) and ``v`` (length ``w``) are the current estimates of
its leading left and right singular vectors, and the invariant after every training step is
``u = normalize(W v)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import _compat

__all__ = [
    "default_dim",
    "weight_to_matrix",
    "power_iteration_",
    "sigma",
    "normalise",
    "oriented",
    "Map",
]

def default_dim(module: torch.nn.Module) -> int:
    """Upstream's default output dimension: 1 for ``ConvTranspose{1,2,3}d``, else 0."""
    convt = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return 1 if isinstance(module, convt) else 0


def weight_to_matrix(weight: Tensor, dim: int) -> Tensor:
    """View ``weight`` as a matrix whose rows run along ``dim`` (upstream's reshaping)."""
    if dim != 0:
        weight = weight.permute(dim, *[d for d in range(weight.dim()) if d != dim])
    # flatten(1), as upstream's parametrization: a 2-D weight is returned as it is (a reshape of
    # a leaf that requires grad is one more op and autograd node at every forward).  Not the
    # tensor itself in so many words: compiled under DDP, that lost the step's graph.
    return weight.flatten(1) if weight.dim() > 1 else weight.reshape(weight.size(0), -1)


def oriented(W: Tensor | Map, u: Tensor, v: Tensor, u_first: bool) -> tuple[Tensor | Map, Tensor, Tensor]:
    """``(W, u, v)``, or ``(Wᴴ, v, u)`` for a power step that updates ``u`` first.

    The hook API's step updates ``v`` then ``u`` (invariant ``u = normalize(W v)``), the
    parametrization API's ``u`` then ``v``.  The iterations here are written for the first
    order; the second is the same iteration on ``Wᴴ`` with the vectors swapped.
    """
    return (W.mH, v, u) if u_first else (W, u, v)


@torch.no_grad()
def power_iteration_(
    W: Tensor | Map, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, *, u_first: bool = False,
    estimate: bool = True,
) -> Tensor | None:
    """Run power iterations ``v <- normalize(Wᴴu); u <- normalize(Wv)`` (with ``u_first``:
    ``u`` first), **in place**, and return the resulting estimate ``σ = uᴴ W v`` (detached;
    ``None`` without ``estimate``: one op less where the caller does not divide by it).

    In place, because under ``DataParallel`` the buffers of the replica on the first device share
    storage with the parallelised module's, and writing into them is the only way the update
    survives.  Callers that build a graph on ``u``, ``v`` must use clones: a second forward
    (``D(real) - D(fake)``) overwrites the buffers before the first one's backward runs.

    ``σ`` reuses the last ``W v`` (``u`` is its normalisation), where upstream multiplies again:
    two mat-vecs per iteration in all.
    """
    if n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be positive, got {n_power_iterations}")
    if not W.is_meta and _compat.autocast_enabled(W.device.type):
        # Under CUDA autocast mv would run in float16; the estimate is worth float32 (cheap).
        with torch.autocast(W.device.type, enabled=False):
            return power_iteration_(W, u, v, n_power_iterations, eps, u_first=u_first, estimate=estimate)
    if transformed() or _compat.is_compiling():
        # u, v are constants of the normalisation: no_grad does not stop forward-mode AD (jvp),
        # and a tangent of W written into the buffers in place would be an error.  Compiled
        # under DDP, without it the step's output lost its graph (W is the parameter itself
        # there).  In eager no_grad suffices, and a detach is one more op at every step.
        W = W.detach()
    # y <- normalize(Aᴴx); x <- normalize(Ay), with A = W or, u first, A = Wᴴ.  .mH makes the
    # step correct for complex weights too (the transpose for real ones); made once, as upstream.
    x, y = (v, u) if u_first else (u, v)
    A, AH = (W.mH, W) if u_first else (W, W.mH)
    for _ in range(n_power_iterations):
        _normalize_into_(AH.mv(x), y, eps)
        Ay = A.mv(y)
        _normalize_into_(Ay, x, eps)
    if not estimate:
        return None
    if x.dtype in _HALF:  # accumulate sigma in float32; keep the weight's dtype
        value = torch.vdot(x.float(), Ay.float()).to(x.dtype)
    else:
        value = torch.vdot(x, Ay)
    return value.conj() if u_first and value.dtype.is_complex else value  # vᴴWᴴu = conj(uᴴWv)


# float16 / bfloat16 vectors: norms and sigma are accumulated in float32.
_HALF = (torch.float16, torch.bfloat16)
# The largest finite float32 and float64 (a norm is one or the other; torch.finfo costs ~0.5 us
# a call, and torch 2.1's dynamo cannot guard on a dict keyed by dtype).
_FLOAT32_MAX, _FLOAT64_MAX = torch.finfo(torch.float32).max, torch.finfo(torch.float64).max


def _normalize_into_(x: Tensor, out: Tensor, eps: float) -> None:
    """``out <- x / ‖x‖`` in place (its storage kept), as ``F.normalize(x, out=out)`` computes
    it, except that ``out`` keeps its value where ``‖x‖ <= eps`` or is not finite.

    Upstream writes the zero (or NaN) vector then, and a ``u`` or ``v`` that became zero on a
    zero weight stays zero for good: every later sigma is 0/0, even after real weights are
    loaded.  Kept vectors let the iteration resume as soon as the weight is usable.  Branch-free:
    no host synchronisation in the training step.
    """
    # no keyword arguments where they are the defaults: parsing them costs ~0.3 us a call
    norm = torch.linalg.vector_norm(x, dtype=torch.float32) if x.dtype in _HALF else torch.linalg.vector_norm(x)
    # usable: eps < norm < inf, in two ops (NaN and inf fail the equality).  The norm is at
    # least float32, so eps=1e-12 does not round to 0 here as it would in float16.
    usable = norm.clamp(eps, _FLOAT64_MAX if norm.dtype == torch.float64 else _FLOAT32_MAX) == norm
    if out.dtype in _HALF:  # x / norm is float32 here
        out.copy_(torch.where(usable, x / norm, out))
    else:
        torch.where(usable, x / norm, out, out=out)


def sigma(W: Tensor | Map, u: Tensor, v: Tensor) -> Tensor:
    """The spectral-norm estimate ``uᴴ W v`` (differentiable in ``W``)."""
    # dot for real vectors: vdot dispatches to it there, one call deeper (the dtype's flag:
    # torch 2.1's dynamo breaks the graph on Tensor.is_complex())
    return (torch.vdot if u.dtype.is_complex else torch.dot)(u, W.mv(v))


def normalise(
    weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor | None, dim: int, coeff: float | None = None,
    op: Any = None, fused: bool | None = None,
) -> Tensor:
    """``weight / σ(weight)`` where ``σ(W) = uᴴ W v`` with ``u``, ``v`` held constant; with
    ``coeff``, the soft normalisation ``weight / max(1, σ(weight) / coeff)`` (a weight whose
    sigma is at most ``coeff`` is left as it is).

    On weights of at least :data:`FUSED_MIN` entries, ``sigma`` is that value, computed by the
    caller without a graph (``None``: computed here), and the gradient is upstream's (autograd
    through ``W / (uᵀWv)``) in closed form, ``g/σ - (⟨g, W⟩/σ²) u vᵀ``: one reduction and one
    rank-one update instead of the op-by-op graph (soft: the same with the divisor
    ``d = max(1, σ/coeff)`` and ``∂d/∂σ``, ``1/coeff`` where ``σ/coeff ≥ 1`` as
    ``torch.clamp``'s gradient, else 0).  Smaller weights, complex ones, ``torch.func``
    transforms and forward-mode AD take upstream's differentiable expression instead, whose
    every derivative torch provides (a ctx-style ``autograd.Function`` is refused under
    transforms, and one with ``setup_context`` costs more than this op on small weights).  With
    ``op`` (a :class:`Map`'s operator), sigma is ``uᴴ op(weight) v`` and autograd
    differentiates it through the operator's own products.  ``fused``: :func:`takes_sigma`, where
    the caller asked it already.
    """
    if not (takes_sigma(weight, op) if fused is None else fused):
        if op is None and not _compat.is_compiling() and not weight.is_meta and _compat.autocast_enabled(weight.device.type):
            # sigma in the weight's dtype, as the power step's and the closed form's: CUDA
            # autocast would run its mat-vec in float16.  (Not while compiling: under DDP the
            # compiled step then trained wrong weights, torch 2.13; compiled, the mat-vec runs
            # in float16 as upstream's.)
            with torch.autocast(weight.device.type, enabled=False):
                return weight / divisor(sigma_with_graph(weight, u, v, dim), coeff)
        return weight / divisor(sigma_with_graph(weight, u, v, dim, op), coeff)
    if sigma is None:
        with torch.no_grad():
            sigma = sigma_with_graph(weight, u, v, dim)
    if not (weight.requires_grad and torch.is_grad_enabled()):  # no graph: the division alone
        return weight / divisor(sigma, coeff)
    return _Normalise.apply(weight, u, v, sigma, dim, coeff)


def takes_sigma(weight: Tensor, op: Any = None) -> bool:
    """Whether :func:`normalise` divides by the sigma its caller computed (else it computes
    sigma itself, with its graph)."""
    if op is not None or weight.dtype.is_complex or transformed():
        return False
    if torch.jit.is_tracing():  # its sizes are tensors there: a comparison would warn
        return True
    return weight.numel() >= FUSED_MIN or not (weight.requires_grad and torch.is_grad_enabled())


#: Fewest weight entries for which :func:`normalise` takes the closed-form backward: below,
#: a Python ``autograd.Function`` costs more than the passes over ``W`` it saves.  Training
#: forward+backward, one CPU thread, closed form / graph: 64x64 1.05-1.08, 128x128 1.04-1.06,
#: 128x256 and 64x576 0.95-1.01, 256x256 0.79-0.80, 128x576 0.74-0.84, 256x576 0.61-0.78.
FUSED_MIN = 32768


def transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, jvp, ...) or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``) is active: the conditions under which
    torch itself requires more of an ``autograd.Function`` than ``_Normalise`` provides.
    Private torch names, both guarded by tests/test_func.py."""
    if _compat.TORCH < (2, 5) and _compat.is_compiling():  # torch 2.4's dynamo cannot trace the query
        return False
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _usable(sigma: Tensor) -> Tensor:
    """sigma, or 1 where it is 0 (an all-zero weight): 0/1 = 0 is the normalised zero weight,
    where upstream returns 0/0 = NaN.  Any nonzero sigma, however small, is kept bitwise, and
    its gradient is upstream's: the 1 is added as a constant.

    The guard is most of what a small layer's step costs over upstream's.  256x20, one CPU
    thread, sigma's graph, the division and its backward: 56 us without a guard, 70 us with this
    one, 73 us with ``sigma == 0`` (the Python 0 is wrapped in a tensor at every call), 73-76 us
    with that cast to sigma's dtype first, 80 us with ``clamp_min``, 85 us with ``torch.where``.
    (The boolean is promoted in the add, a cast and a copy of one element.)"""
    return sigma + torch.logical_not(sigma)


def divisor(sigma: Tensor, coeff: float | None) -> Tensor:
    """What the weight is divided by: sigma (:func:`_usable`), or ``max(1, sigma / coeff)``
    (of sigma's real part for a complex weight, whose converged ``uᴴWv`` is real)."""
    if coeff is None:
        return _usable(sigma)
    return torch.clamp((sigma.real if sigma.dtype.is_complex else sigma) / coeff, min=1)


def _slope(sigma: Tensor, coeff: float) -> Tensor:
    """``∂ divisor / ∂ sigma`` of a soft normalisation, held constant in the backward (real
    weights: complex ones take the differentiable expression, see :func:`normalise`)."""
    return (sigma / coeff >= 1).to(sigma) / coeff


def sigma_with_graph(weight: Tensor, u: Tensor, v: Tensor, dim: int, op: Any = None) -> Tensor:
    return sigma(weight_to_matrix(weight, dim) if op is None else Map(op, weight), u, v)


def _from_matrix(matrix: Tensor, like: Tensor, dim: int) -> Tensor:
    """Inverse of weight_to_matrix: a (h, w) matrix back in ``like``'s shape."""
    if dim == 0:
        return matrix.reshape(like.shape)
    moved = [like.size(dim), *[s for d, s in enumerate(like.shape) if d != dim]]
    return matrix.reshape(moved).movedim(0, dim)


class _Normalise(torch.autograd.Function):
    # ctx-style forward: with a separate setup_context, torch binds the arguments through
    # inspect.signature on every call, which costs more than the whole op on small weights.
    @staticmethod
    def forward(ctx: Any, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int,  # type: ignore[override]
                coeff: float | None) -> Tensor:
        by = divisor(sigma, coeff)
        ctx.save_for_backward(weight, u, v, sigma, by)
        ctx.dim = dim
        ctx.coeff = coeff
        return weight / by

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, u, v, sigma, by = ctx.saved_tensors
        rank_one_scale = _slope(sigma, ctx.coeff) if ctx.coeff is not None else None
        if torch.is_grad_enabled():
            # create_graph=True: a differentiable expression (sigma recomputed from the weight),
            # so that a further backward sees every dependence on the weight, as upstream's does.
            d = divisor(sigma_with_graph(weight, u, v, ctx.dim), ctx.coeff)
            rank_one = _from_matrix(torch.outer(u, v), weight, ctx.dim)
            if rank_one_scale is not None:
                rank_one = rank_one * rank_one_scale
            grad_weight = grad / d - (torch.vdot(grad.reshape(-1), weight.reshape(-1)) / d**2) * rank_one
        else:
            inv = by.reciprocal()
            k = torch.vdot(grad.reshape(-1), weight.reshape(-1)) * inv * inv
            if rank_one_scale is not None:
                k = k * rank_one_scale
            # in-place addr_ on the fresh g/σ: several times faster than torch.addr on CPU
            g = weight_to_matrix(grad * inv, ctx.dim)
            grad_weight = _from_matrix(g.addr_(u, v * -k), weight, ctx.dim)
        return grad_weight, None, None, None, None, None


class Map(NamedTuple):
    """A linear map that is not a matrix: ``op.apply(weight, x)`` and ``op.adjoint(weight, y)``
    on flat vectors (a convolution at one input shape, :class:`safe_norm._operator.ConvMap`),
    with ``weight``.  It stands in for the matrix ``W`` in the power step, sigma and the
    warm-up: it has what they use of a matrix (products, ``mH``, ``shape``, ``dtype``,
    ``to``, ``detach``, division by a scale)."""

    op: Any
    weight: Tensor
    adjoint_first: bool = False  # this is Aᴴ

    def mv(self, x: Tensor) -> Tensor:
        return self._product(x, self.adjoint_first)

    def rmv(self, y: Tensor) -> Tensor:
        return self._product(y, not self.adjoint_first)

    def _product(self, x: Tensor, adjoint: bool) -> Tensor:
        # Outside autocast, as the matrix products: a convolution under it would run in half
        # precision against float32 vectors (sigma, the power step and the warm-up want both
        # in the weight's dtype, and vdot refuses mixed ones).
        if not self.weight.is_meta and _compat.autocast_enabled(self.weight.device.type):
            with torch.autocast(self.weight.device.type, enabled=False):
                return self._product(x, adjoint)
        return self.op.adjoint(self.weight, x) if adjoint else self.op.apply(self.weight, x)

    @property
    def mH(self) -> Map:  # noqa: N802 - as Tensor.mH
        return Map(self.op, self.weight, not self.adjoint_first)

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        rows, columns = self.op.shape
        return (columns, rows) if self.adjoint_first else (rows, columns)

    def size(self, i: int) -> int:
        return self.shape[i]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def is_meta(self) -> bool:
        return self.weight.is_meta

    def to(self, dtype: torch.dtype) -> Map:
        return Map(self.op, self.weight.to(dtype), self.adjoint_first)

    def detach(self) -> Map:
        return Map(self.op, self.weight.detach(), self.adjoint_first)

    def __truediv__(self, scale: float) -> Map:  # type: ignore[override]
        return Map(self.op, self.weight / scale, self.adjoint_first)

    def dense(self) -> Tensor:
        """The matrix, from the products with the basis of its shorter side (one batched
        product): for the exact solve of a small map."""
        rows, columns = self.op.shape
        if columns <= rows:
            M = self.op.apply(self.weight, torch.eye(columns, dtype=self.dtype, device=self.device)).mT
        else:  # the rows of A are the adjoint's images of the output basis
            M = self.op.adjoint(self.weight, torch.eye(rows, dtype=self.dtype, device=self.device))
        return M.mH if self.adjoint_first else M
