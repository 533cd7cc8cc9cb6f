"""safe_norm.operator_norm: the norm of a convolution as the map it is, against the explicit
matrix of the layer itself (its forward applied to every basis input, float64 SVD)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

import safe_norm
import safe_norm.parametrizations

from .helpers import rel

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def dense_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """The largest singular value of the layer's linear part at ``shape``, from its own forward
    (float64) on every basis input."""
    m = copy.deepcopy(layer).double()
    n = math.prod(shape)
    with torch.no_grad():
        zero = m(torch.zeros(1, *shape, dtype=torch.float64))
        columns = (m(torch.eye(n, dtype=torch.float64).reshape(n, *shape)) - zero).reshape(n, -1)
    return torch.linalg.matrix_norm(columns.T, 2).item()


def random_layer(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A convolution with random kernel, stride, padding (zeros, circular, same, valid),
    dilation, groups, output padding and input size, small enough for the dense matrix."""
    d = rng.choice([1, 1, 2, 2, 2, 3])
    groups = rng.choice([1, 1, 2, 3])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel = [rng.randint(1, 4 if d < 3 else 3) for _ in range(d)]
    stride = [rng.randint(1, 3) for _ in range(d)]
    dilation = [rng.randint(1, 2) for _ in range(d)]
    span = [dil * (k - 1) + 1 for dil, k in zip(dilation, kernel)]
    sizes = [rng.randint(max(2, s), max(s, 9 if d == 1 else 6 if d == 2 else 4)) for s in span]
    if rng.random() < 0.3:
        padding = [rng.randint(0, (s - 1) // 2) for s in span]
        output_padding = [rng.randint(0, max(st, dil) - 1) for st, dil in zip(stride, dilation)]
        layer = TRANSPOSED[d](c_in, c_out, kernel, stride=stride, padding=padding,
                              output_padding=output_padding, groups=groups, dilation=dilation)
    else:
        mode = rng.choice(["zeros", "zeros", "circular", "same", "valid"])
        if mode in ("same", "valid"):
            layer = CONV[d](c_in, c_out, kernel, padding=mode, dilation=dilation, groups=groups)
        else:
            padding = [rng.randint(0, min(n, s)) for n, s in zip(sizes, span)]
            layer = CONV[d](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                            groups=groups, padding_mode=mode)
    return layer, (c_in, *sizes)


@pytest.mark.slow
def test_the_bound_is_never_below_the_norm_and_the_estimate_is_it():
    """Over 240 random configurations: ``upper`` never below the dense norm (groups as the
    largest block, strides, dilations, circular wrap-around, output padding), ``estimate`` never
    above it and, with Lanczos run to convergence, equal to it."""
    rng = random.Random(20261207)
    worst_gap = 0.0
    for i in range(240):
        torch.manual_seed(i)
        layer, shape = random_layer(rng)
        true = dense_norm(layer, shape)
        found = safe_norm.operator_norm(layer, shape, tol=1e-12)
        where = f"config {i}: {layer} at {shape}: {found}, dense {true}"
        assert found.upper >= true * (1 - 1e-13), where
        assert found.estimate <= true * (1 + 1e-10), where
        assert abs(found.estimate - true) <= 1e-8 * true, where  # a zero map too (all padding)
        assert found.reshaped == pytest.approx(torch.linalg.matrix_norm(
            layer.weight.detach().double().flatten(1) if isinstance(layer, tuple(CONV.values()))
            else layer.weight.detach().double().movedim(1, 0).flatten(1), 2).item(), rel=1e-12)
        worst_gap = max(worst_gap, found.gap)
    assert worst_gap > 1e-3  # the grid holds cases where the bound is not tight (small inputs)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_circular_padding_at_stride_one_is_exact(d):
    """The circular convolution is block-diagonal in the DFT basis: the bound is its norm, and
    the certificate closes to ``tol``."""
    torch.manual_seed(d)
    layer = CONV[d](4, 6, 3, padding=1, padding_mode="circular")
    shape = (4, *[6, 5, 4][:d])
    found = safe_norm.operator_norm(layer, shape, tol=1e-6)
    true = dense_norm(layer, shape)
    assert rel(found.upper, true) < 1e-9 and found.gap <= 1e-6


def test_a_large_input_closes_the_certificate_and_the_reshaped_sigma_is_far_below():
    """On a 32x32 input the zero-padding boundary hardly counts: the bound meets the estimate
    within a few 1e-3, and the layer's norm is ~1.5x the sigma spectral_norm divides by."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, 3, padding=1)
    found = safe_norm.operator_norm(layer, (16, 32, 32))
    assert found.estimate <= found.upper and found.gap < 1e-2
    assert found.estimate > 1.3 * found.reshaped


@pytest.mark.parametrize("make", [safe_norm.spectral_norm, safe_norm.parametrizations.spectral_norm,
                                  nn.utils.spectral_norm, nn.utils.parametrizations.spectral_norm])
def test_a_spectral_normed_layer_is_measured_as_it_acts_and_left_as_it_was(make):
    """The weight measured is the normalised one the next eval forward uses (the tensor over the
    sigma it divides by), for either library and API; nothing in the layer changes."""
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 5, 3, padding=1)
    layer = make(copy.deepcopy(plain))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    found = safe_norm.operator_norm(layer, (3, 6, 6), tol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with torch.no_grad():
        plain.weight.div_(safe_norm.sigma(layer))
    assert rel(found.estimate, dense_norm(plain, (3, 6, 6))) < 1e-8


def test_clear_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        safe_norm.operator_norm(nn.Linear(3, 4), (3,))
    with pytest.raises(ValueError, match="input_shape"):
        safe_norm.operator_norm(conv, (4, 8, 8))  # 4 channels for a 3-channel layer
    with pytest.raises(ValueError, match="input_shape"):
        safe_norm.operator_norm(conv, (8,))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        safe_norm.operator_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8))
    with pytest.raises(ValueError, match="no values yet"):
        safe_norm.operator_norm(nn.LazyConv2d(4, 3), (3, 8, 8))
    with pytest.raises(ValueError, match="tol"):
        safe_norm.operator_norm(conv, (3, 8, 8), tol=0)
    assert safe_norm.operator_norm(conv, (8, 8)).upper == safe_norm.operator_norm(conv, (3, 8, 8)).upper


def test_audit_reports_the_operator_norm_of_the_layers_it_is_given_shapes_for():
    torch.manual_seed(0)
    net = nn.Sequential(safe_norm.spectral_norm(nn.Conv2d(3, 8, 3, padding=1)),
                        nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 8, 3, stride=2)),
                        safe_norm.spectral_norm(nn.Linear(8, 1)))
    rows = safe_norm.audit(net, input_shapes={"0": (3, 8, 8), "1": (8, 8, 8)})
    assert [math.isnan(r.operator) for r in rows] == [False, False, True]
    for row, (index, shape) in zip(rows, [(0, (3, 8, 8)), (1, (8, 8, 8))]):
        found = safe_norm.operator_norm(net[index], shape)
        assert (row.operator, row.operator_upper) == (found.estimate, found.upper)
        assert 1.1 < row.operator <= row.operator_upper  # normalised, the 3x3 layers still stretch
    assert "op. upper" in str(rows) and "op. upper" not in str(safe_norm.audit(net))
    with pytest.raises(ValueError, match=r"\['2\.0'\]"):
        safe_norm.audit(net, input_shapes={"2.0": (3, 8, 8)})
