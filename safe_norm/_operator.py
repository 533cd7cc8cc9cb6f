"""The spectral norm of a convolution as the linear map it is on inputs of one shape.

``spectral_norm`` (every library's) divides a convolution by the largest singular value of its
weight reshaped to a matrix.  That is not the layer's Lipschitz constant: on a default
``Conv2d(256, 512, 3)`` the operator norm at 16x16 or 32x32 inputs is about 1.6x the reshaped
sigma.  :func:`operator_norm` measures the operator norm, with a certificate:

* ``estimate``: ``‖A x‖ / ‖x‖`` for the best input ``x`` that Golub-Kahan-Lanczos (float64, full
  re-orthogonalisation) finds, applying the layer's functional op and its adjoint, the
  transposed operation (:class:`ConvMap`, tested against the layer's own forward and the
  inner-product identity): a value the layer attains, so never above the true norm (up to
  float64 rounding).
* ``upper``: never below the true norm.  A convolution with zero padding ``p`` on inputs of
  length ``n`` is a restriction of the circular convolution with the same kernel on ``Z_N``,
  ``N >= n + p_left + p_right`` (the zero-extended input, where no output window wraps), and a
  circular convolution is block-diagonalised by the DFT: its norm is the largest singular value
  over the ``N``-point frequency grid of the channel matrix ``Σ_t K_t exp(2πi k·τ_t / N)`` (taps
  ``t`` at offsets ``τ_t``, dilation included).  A stride keeps every ``s``-th output row: with
  ``N`` a multiple of ``s`` that is exact too (polyphase, :func:`_certified_upper`).  Groups are
  blocks: the largest over groups (not their product).  Circular padding is the circular
  convolution on ``Z_n`` itself, with output rows repeated where the padded length exceeds
  ``n`` (a factor ``√(repeats)``).  A transposed convolution is the adjoint of the convolution
  with its stride, padding and dilation from its output shape: the same norm.  Computed in
  float64 (the FFT in complex128), with a margin of 1e-10 of the spectrum's scale for rounding.

The two meet when the bound is tight: circular padding at stride 1, and zero padding on inputs
large next to the kernel; on small inputs with zero padding the boundary leaves a gap, reported.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _krylov, _power

__all__ = ["operator_norm", "OperatorNorm"]

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TRANSPOSED = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_FUNCTIONAL_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: Margin on the certified bound for the rounding of its float64 FFT and eigensolves, relative
#: to the spectrum's scale (their errors are a few 1e-16 times the sizes involved).
ROUNDING = 1e-10


class OperatorNorm(NamedTuple):
    """The operator norm of a layer at one input shape (see :func:`operator_norm`)."""

    estimate: float  # attained: ‖A x‖/‖x‖ for the best x found; a lower bound
    upper: float  # certified: never below the true norm
    reshaped: float  # the largest singular value of the weight reshaped (what spectral_norm uses)
    steps: int  # Lanczos steps taken for the estimate

    @property
    def gap(self) -> float:
        """``upper / estimate - 1``: how far apart the two sides of the certificate are."""
        return self.upper / self.estimate - 1 if self.estimate > 0 else math.inf


def _kind(layer: nn.Module, who: str = "operator_norm") -> tuple[int, bool]:
    """(spatial dimensions, transposed) of a convolution layer."""
    for table, transposed in ((_CONV, False), (_TRANSPOSED, True)):
        for cls, d in table.items():
            if isinstance(layer, cls):
                return d, transposed
    raise TypeError(f"{who}: expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d layer, "
                    f"got {type(layer).__name__}")


def _effective_weight(layer: nn.Module) -> Tensor:
    """The weight the layer's next eval forward uses: for a spectral-normed layer (any library,
    either API) the tensor it normalises divided by the sigma it would divide by, read without
    changing its state; otherwise ``layer.weight``."""
    from ._inspect import layers, next_sigma  # noqa: PLC0415 - _inspect imports the APIs

    for found in layers(layer):
        # another library's layer: its own forward set layer.weight (read below)
        if found.module is layer and found.name == "weight" and found.library != "other":
            with torch.no_grad():
                divisor = _power.divisor(next_sigma(found), getattr(found.fn, "coeff", None))
                return (found.weight() / divisor).detach()
    weight = getattr(layer, "weight")
    if isinstance(weight, nn.parameter.UninitializedParameter) or weight.is_meta:
        raise ValueError("operator_norm: the layer's weight has no values yet (a lazy or meta "
                         "module: run a forward, or safe_norm.initialize_now, first)")
    return weight.detach()


def _pads(layer: Any, d: int, kernel: Sequence[int]) -> list[tuple[int, int]]:
    """(left, right) zero or circular padding per spatial dimension, as the layer applies it."""
    padding, dilation = layer.padding, layer.dilation
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * d
        total = [dil * (k - 1) for dil, k in zip(dilation, kernel)]  # "same", as torch splits it
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in padding]


def _shape(layer: Any, d: int, transposed: bool, input_shape: Sequence[int], weight: Tensor,
           who: str = "operator_norm") -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    channels = weight.shape[0] if transposed else weight.shape[1] * layer.groups
    if len(shape) == d:
        shape = (channels, *shape)
    if len(shape) != d + 1 or shape[0] != channels or min(shape) < 1:
        raise ValueError(f"{who}: input_shape of a {type(layer).__name__} is (channels, "
                         f"{', '.join('size' for _ in range(d))}) with {channels} channels, or the "
                         f"spatial sizes alone; got {tuple(input_shape)}")
    return shape


class ConvMap(NamedTuple):
    """A convolution layer's linear part (no bias) on one sample of a fixed input shape, as a
    map between flat vectors: what ``spectral_norm(..., input_shape=...)`` divides the layer
    by the norm of, and what :func:`operator_norm` measures.  Plain data (it pickles and
    copies); the weight is an argument of its products, so that they follow the weight's
    dtype, device and autograd."""

    d: int  # spatial dimensions
    transposed: bool
    stride: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # convolution: (left, right) per dimension; transposed: (p, p)
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...]
    circular: bool
    in_shape: tuple[int, ...]  # (channels, *spatial)
    out_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(outputs, inputs): the map's matrix shape."""
        return math.prod(self.out_shape), math.prod(self.in_shape)

    def apply(self, weight: Tensor, flat: Tensor) -> Tensor:
        """``A x`` for a flat input ``x``, flat (each row of a batch of them)."""
        x = flat.reshape(-1, *self.in_shape)
        if self.transposed:
            padding = tuple(p for p, _ in self.pads)
            y = _FUNCTIONAL_T[self.d](x, weight, None, self.stride, padding, self.output_padding, self.groups,
                                      self.dilation)
        else:
            pad = [p for pair in reversed(self.pads) for p in pair]  # F.pad: last dimension first
            padded = F.pad(x, pad, mode="circular") if self.circular else F.pad(x, pad)
            y = _FUNCTIONAL[self.d](padded, weight, None, self.stride, 0, self.dilation, self.groups)
        return y.reshape(*flat.shape[:-1], -1)

    def adjoint(self, weight: Tensor, flat: Tensor) -> Tensor:
        """``Aᴴ y`` for a flat output ``y``, flat (each row of a batch of them): the transposed
        operation, written out (no autograd, so it runs where the forward runs: compiled,
        under ``torch.func``)."""
        y = flat.reshape(-1, *self.out_shape)
        if self.transposed:  # a transposed convolution's adjoint is the convolution
            padding = tuple(p for p, _ in self.pads)
            x = _FUNCTIONAL[self.d](y, weight, None, self.stride, padding, self.dilation, self.groups)
            # an output padding of a stride or more gives the convolution rows past the input's
            # (the transposed one reads zeros there)
            for i, n in enumerate(self.in_shape[1:]):
                x = x.narrow(i + 2, 0, n)
            return x.reshape(*flat.shape[:-1], -1)
        kernel = weight.shape[2:]
        padded = [n + left + right for n, (left, right) in zip(self.in_shape[1:], self.pads)]
        # the rows the strided windows do not reach get output padding (zeros' adjoint)
        extra = tuple((p - dil * (k - 1) - 1) % s for p, dil, k, s in zip(padded, self.dilation, kernel, self.stride))
        z = _FUNCTIONAL_T[self.d](y, weight, None, self.stride, 0, extra, self.groups, self.dilation)
        for i, (n, (left, right)) in enumerate(zip(self.in_shape[1:], self.pads)):
            axis = i + 2  # (batch, channels, *spatial)
            core = z.narrow(axis, left, n)
            if self.circular:  # F.pad's wrap: the padding's rows came from the far ends
                core = core.clone()
                if left:
                    core.narrow(axis, n - left, left).add_(z.narrow(axis, 0, left))
                if right:
                    core.narrow(axis, 0, right).add_(z.narrow(axis, left + n, right))
            z = core
        return z.reshape(*flat.shape[:-1], -1)


def _check_padding(layer: Any, transposed: bool, who: str) -> None:
    """Zero and circular padding only (a transposed convolution has zeros only)."""
    if not transposed and layer.padding_mode not in ("zeros", "circular"):
        raise ValueError(f"{who}: padding_mode={layer.padding_mode!r} is not supported (zeros and circular are)")


def conv_map(layer: nn.Module, input_shape: Sequence[int], weight: Tensor | None = None,
             who: str = "operator_norm") -> ConvMap:
    """The :class:`ConvMap` of a convolution layer on inputs of ``input_shape``
    (``(channels, *spatial)`` or the spatial sizes alone).  Zero and circular padding
    (``"same"`` and ``"valid"`` too); others are refused: ``who`` names the caller in errors."""
    d, transposed = _kind(layer, who)
    conv: Any = layer
    _check_padding(conv, transposed, who)
    W = conv.weight if weight is None else weight
    if W.is_complex():
        raise TypeError(f"{who}: complex weights are not supported with input_shape")
    shape = _shape(conv, d, transposed, input_shape, W, who)
    kernel = tuple(W.shape[2:])
    stride, dilation = tuple(conv.stride), tuple(conv.dilation)
    if transposed:
        pads = tuple((p, p) for p in conv.padding)
        output_padding = tuple(conv.output_padding)
        spatial = [(n - 1) * s - 2 * p + dil * (k - 1) + op + 1 for n, s, (p, _), dil, k, op in zip(
            shape[1:], stride, pads, dilation, kernel, output_padding)]
        channels = W.shape[1] * conv.groups
    else:
        pads = tuple(_pads(conv, d, kernel))
        output_padding = (0,) * d
        spatial = [(n + left + right - dil * (k - 1) - 1) // s + 1 for n, (left, right), dil, k, s in zip(
            shape[1:], pads, dilation, kernel, stride)]
        channels = W.shape[0]
        if conv.padding_mode == "circular" and any(left > n or right > n for n, (left, right) in zip(shape[1:], pads)):
            raise ValueError(f"{who}: circular padding {conv.padding} wraps more than once on inputs of {shape}")
    if min(spatial) < 1:
        raise ValueError(f"{who}: inputs of shape {shape} are smaller than the {type(layer).__name__}'s "
                         f"kernel {kernel} (dilation {dilation}, padding {conv.padding}) covers")
    return ConvMap(d, transposed, stride, pads, dilation, conv.groups, output_padding,
                   not transposed and conv.padding_mode == "circular", shape, (channels, *spatial))


def operator_vectors(weight: Tensor, op: ConvMap, eps: float) -> tuple[Tensor, Tensor]:
    """Random unit ``u`` (output-sized) and ``v`` (input-sized) for ``op``, drawn as upstream
    draws its own (``normal_`` in the weight's dtype and device, then normalised)."""
    with torch.no_grad():
        u = F.normalize(weight.new_empty(op.shape[0]).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(weight.new_empty(op.shape[1]).normal_(0, 1), dim=0, eps=eps)
    return u, v


def check_options(module: nn.Module, name: str, dim: int | None, input_shape: Sequence[int] | None) -> None:
    """spectral_norm's checks of ``input_shape`` that need no weight values (a lazy module's
    are completed at registration, by :func:`conv_map`)."""
    if input_shape is None:
        return
    d, transposed = _kind(module, "spectral_norm with input_shape")
    if name != "weight":
        raise ValueError(f"spectral_norm: input_shape normalises a convolution's weight, not {name!r}")
    if dim is not None and dim != _power.default_dim(module):
        raise ValueError("spectral_norm: dim picks the rows of the reshaped weight; with input_shape the norm is "
                         "the layer's as a map on its inputs: leave dim out")
    _check_padding(module, transposed, "spectral_norm with input_shape")
    if isinstance(input_shape, (str, bytes)) or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                                                       for n in input_shape):
        raise TypeError(f"spectral_norm: input_shape is a sequence of ints (channels, *spatial) or the "
                        f"{d} spatial sizes, got {input_shape!r}")


def _certified_upper(weight: Tensor, d: int, groups: int, dilation: Sequence[int], grid: Sequence[int],
                     stride: Sequence[int], repeats: int) -> float:
    """The norm of the strided circular convolution on the DFT grid ``grid`` (taps at
    ``t * dilation``, wrapped), times ``sqrt(repeats)``.  The first dimension of ``weight`` is
    split into the groups: a convolution's outputs, a transposed one's inputs (the outputs of
    the convolution it is the adjoint of); the largest block counts.

    Stride ``s`` along a dimension whose grid length ``N`` it divides is exact (polyphase):
    keeping every ``s``-th output row, frequency ``k`` of the output (on ``Z_{N/s}``) gathers the
    input frequencies ``k + r N/s``, ``r < s``, and the norm is the largest singular value of
    the channel matrices at those frequencies side by side, over ``sqrt(s)``.  Elsewhere the
    stride only drops rows, and the stride-1 norm bounds it."""
    K = weight.detach().to(torch.float64)
    taps = torch.zeros(*K.shape[:2], *grid, dtype=K.dtype, device=K.device)
    for t in torch.cartesian_prod(*[torch.arange(k) for k in K.shape[2:]]).reshape(-1, d).tolist():
        at = tuple((ti * di) % n for ti, di, n in zip(t, dilation, grid))
        taps[(slice(None), slice(None), *at)] += K[(slice(None), slice(None), *t)]
    spectrum = torch.fft.fftn(taps, dim=tuple(range(2, 2 + d)))  # (rows, cols, *grid)
    rows, cols = spectrum.shape[:2]
    phases = [s if n % s == 0 else 1 for n, s in zip(grid, stride)]
    # grid dimension n -> (phase r, frequency k) with n = r * (N / s) + k
    split = [size for n, s in zip(grid, phases) for size in (s, n // s)]
    spectrum = spectrum.reshape(groups, rows // groups, cols, *split)
    # A real kernel's spectrum is conjugate-symmetric (frequency -k holds the conjugates of
    # frequency k's, its phases permuted): the same singular values, so half the last axis does.
    spectrum = spectrum[..., : split[-1] // 2 + 1]
    r_axes = [3 + 2 * i for i in range(d)]
    k_axes = [4 + 2 * i for i in range(d)]
    # (frequencies, groups, rows/g, cols x phases)
    blocks = spectrum.permute(*k_axes, 0, 1, 2, *r_axes).reshape(-1, groups, rows // groups, cols * math.prod(phases))
    # sigma_max^2 as the top eigenvalue of the smaller Gram matrix: an eigensolve instead of an
    # SVD, and in float64 its error (a few n * 1e-16 of sigma_max^2) is far inside ROUNDING
    gram = blocks @ blocks.mH if blocks.shape[-2] <= blocks.shape[-1] else blocks.mH @ blocks
    top = torch.linalg.eigvalsh(gram)[..., -1].amax().clamp_min(0).sqrt().item() / math.sqrt(math.prod(phases))
    # Rounding, in units of the FFT's output scale (the taps' summed Frobenius norms bound every
    # channel matrix of the spectrum), so that a kernel whose spectrum nearly cancels is covered
    scale = K.flatten(2).norm(dim=(0, 1)).sum().item()
    return (top + ROUNDING * scale) * math.sqrt(repeats)


def _upper(layer: Any, d: int, transposed: bool, weight: Tensor, spatial: Sequence[int]) -> float:
    dilation, groups, stride = layer.dilation, layer.groups, layer.stride
    kernel = weight.shape[2:]
    if transposed:
        # the adjoint of the convolution (stride, padding, dilation) from the output's shape
        padding = layer.padding
        out = [(n - 1) * s - 2 * p + dil * (k - 1) + op + 1 for n, s, p, dil, k, op in zip(
            spatial, stride, padding, dilation, kernel, layer.output_padding)]
        return _certified_upper(weight, d, groups, dilation, _multiple([n + 2 * p for n, p in zip(out, padding)], stride),
                                stride, 1)
    pads = _pads(layer, d, kernel)
    if layer.padding_mode == "zeros":
        grid = _multiple([n + left + right for n, (left, right) in zip(spatial, pads)], stride)
        return _certified_upper(weight, d, groups, dilation, grid, stride, 1)
    # circular: the circular convolution on Z_n; rows repeat where the padded length exceeds n
    repeats = 1
    for n, (left, right), dil, k in zip(spatial, pads, dilation, kernel):
        rows = n + left + right - dil * (k - 1)
        repeats *= max(1, -(-rows // n))
    return _certified_upper(weight, d, groups, dilation, list(spatial), stride if repeats == 1 else [1] * d, repeats)


def _multiple(lengths: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Each length rounded up to a multiple of its stride: any grid at least as long as the
    zero-padded input holds the convolution without wrap-around, and one the stride divides
    gives the exact strided norm."""
    return [-(-n // s) * s for n, s in zip(lengths, stride)]


@torch.no_grad()
def _lanczos(A: _power.Map, upper: float, tol: float, max_steps: int) -> tuple[float, int]:
    """Golub-Kahan-Lanczos on the operator (the Krylov engine's, one vector, float64 here) from
    a fixed draw.  Stops where the top Ritz value is within ``tol`` of ``upper`` (the
    certificate is then as tight as asked), where it grew by less than ``tol * STALL`` over the
    last :data:`STALL_STEPS` steps, where the Krylov space is spent (its Ritz values are then
    exact), or at ``max_steps``.  Returns ``‖A x‖ / ‖x‖`` for its top Ritz vector ``x``, computed
    anew (a value the operator attains), and the steps."""
    K = _krylov.Bidiagonalisation(A, _krylov.fixed_draw((1, A.size(1)), like=A.weight), max_steps)
    history: list[float] = []
    top = torch.ones(1, dtype=torch.float64)  # coordinates of the top Ritz vector in V
    for j in range(max_steps):
        K.extend(j + 1)
        (C,) = K.coefficients(j + 1)  # a read per step: this is a measurement, not a forward
        found = _krylov.ritz(C, j + 1)
        if found is None or not found.values[0] > 0:
            break  # A v_j is zero or NaN: the space was spent at the step before
        history.append(found.values[0])
        top = found.coordinates[:, 0]
        spent = _krylov._spent(C, j + 1) is not None
        if spent or history[-1] >= upper / (1 + tol) or (
                len(history) > STALL_STEPS and history[-1] <= history[-1 - STALL_STEPS] * (1 + tol * STALL)):
            break
    x = _krylov._back(top, K.V) @ K.V[: top.numel()]  # once, for the Ritz vector kept
    return (A.mv(x).norm() / x.norm()).item(), len(history)


#: The estimate's Lanczos stops where its top value grew by less than ``tol * STALL`` (relative)
#: over the last ``STALL_STEPS`` steps: converged as far as it will get at that pace.
STALL, STALL_STEPS = 1e-3, 10


def operator_norm(layer: nn.Module, input_shape: Sequence[int], *, tol: float = 1e-4,
                  max_steps: int = 300) -> OperatorNorm:
    """The largest singular value of a convolution layer as a linear map on inputs of
    ``input_shape`` (``(channels, *spatial)``, or the spatial sizes alone), with a certificate.

    Stride, padding (zeros, ``"same"``, ``"valid"``, circular), dilation and groups of
    ``Conv1d/2d/3d``, and stride, padding, output padding, dilation and groups of
    ``ConvTranspose1d/2d/3d``, are those of the layer.  The bias does not count (it shifts,
    it does not stretch).  On a spectral-normed layer (safe_norm's or upstream's, either API)
    the weight is the normalised one the next eval forward uses, read without changing any
    state.

    Returns :class:`OperatorNorm`: ``estimate``, a value the layer attains (a lower bound),
    ``upper``, a bound never below the true norm (see the module's docstring for why), their
    ``gap``, and ``reshaped``, the sigma of the reshaped weight that spectral normalisation
    divides by.  Lanczos stops when the gap is within ``tol``, when its estimate stalls, or
    after ``max_steps`` steps.  Reflect and replicate padding are refused (no certificate).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import safe_norm
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
        >>> found = safe_norm.operator_norm(conv, (3, 8, 8))
        >>> found.estimate <= found.upper, found.gap < 1e-4, found.upper > found.reshaped
        (True, True, True)
    """
    d, transposed = _kind(layer)
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"operator_norm: tol must lie in (0, 1), got {tol!r}")
    _check_padding(layer, transposed, "operator_norm")  # before the weight is read
    return measure(layer, _effective_weight(layer), input_shape, tol, max_steps)


def measure(layer: nn.Module, W: Tensor, input_shape: Sequence[int], tol: float, max_steps: int) -> OperatorNorm:
    """:func:`operator_norm` of ``layer`` with the weight ``W``."""
    d, transposed = _kind(layer)
    if W.is_complex():
        raise TypeError("operator_norm: complex weights are not supported")
    if not bool(torch.isfinite(_krylov.max_abs(W))):
        raise ValueError("operator_norm: the layer's weight holds NaN or infinite values")
    op = conv_map(layer, input_shape, W)
    wide = W.detach().to(torch.float64)
    upper = _upper(layer, d, transposed, W, op.in_shape[1:])
    outputs, inputs = op.shape
    steps = min(max_steps, inputs, outputs + 1)
    estimate, taken = _lanczos(_power.Map(op, wide), upper, tol, steps)
    reshaped = torch.linalg.matrix_norm(_power.weight_to_matrix(wide, 1 if transposed else 0), 2).item()
    return OperatorNorm(estimate, upper, reshaped, taken)
