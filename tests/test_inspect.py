"""safe_norm.sigma: the sigma a layer divides by, for any library and either API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safe_norm

from .helpers import APIS, sn_state


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("library", ["safe_norm", "upstream"])
@pytest.mark.parametrize("factory", [lambda: nn.Linear(12, 7), lambda: nn.ConvTranspose2d(4, 6, 3)])
def test_sigma_is_what_the_eval_forward_divides_by(api, library, factory):
    ours, theirs = APIS[api]
    m = (ours if library == "safe_norm" else theirs)(factory())
    m(torch.randn(2, 12) if isinstance(m, nn.Linear) else torch.randn(1, 4, 5, 5))  # train step
    m.eval()
    s = safe_norm.sigma(m)
    assert s.dim() == 0 and not s.requires_grad
    with torch.no_grad():
        m(torch.randn(2, 12) if isinstance(m, nn.Linear) else torch.randn(1, 4, 5, 5))
        W = sn_state(m)[0]
        assert torch.allclose(W / s, m.weight, rtol=1e-6, atol=0)


def test_sigma_of_a_layer_without_spectral_norm():
    with pytest.raises(ValueError, match="no spectral norm on Linear.weight"):
        safe_norm.sigma(nn.Linear(3, 2))
