"""The shared maths in safe_norm._power (the training step) against upstream's.  The power
step's behaviour inside the APIs is tested with them (tests/test_spectral_norm.py,
tests/test_parametrizations.py, tests/test_equivalence.py); the warm-up's solves in
tests/test_krylov.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.spectral_norm import SpectralNorm as UpstreamSpectralNorm

from safe_norm import _power


@pytest.mark.parametrize("shape,dim", [((6, 4, 3, 3), 0), ((6, 4, 3, 3), 1), ((5,), 0), ((2, 3, 4), 2)])
def test_weight_to_matrix_matches_upstream(shape, dim):
    w = torch.randn(shape)
    up = UpstreamSpectralNorm(dim=dim).reshape_weight_to_matrix(w)
    assert torch.equal(_power.weight_to_matrix(w, dim), up)
