"""Clear errors for inputs upstream accepts and then fails on or misuses (issue 6, item 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safe_norm import EmptyWeightError

from .helpers import APIS

BAD = {
    "eps=0": (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    "eps<0": (dict(eps=-1e-12), ValueError, "eps must be a finite number > 0"),
    "eps=nan": (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
    "n_power_iterations=1.5": (dict(n_power_iterations=1.5), TypeError, "n_power_iterations must be an int"),
    "n_power_iterations=True": (dict(n_power_iterations=True), TypeError, "n_power_iterations must be an int"),
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", BAD)
def test_bad_options_name_the_module_and_parameter(api, case):
    ours, _ = APIS[api]
    kwargs, error, text = BAD[case]
    with pytest.raises(error, match=rf"Linear\.weight: {text}"):
        ours(nn.Linear(4, 3), **kwargs)
    with pytest.raises(error, match=text):  # lazy modules too, at once
        ours(nn.LazyLinear(3), **kwargs)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,)])
def test_weight_with_zero_elements(api, shape):
    ours, _ = APIS[api]
    m = nn.Module()
    m.weight = nn.Parameter(torch.empty(shape))
    with pytest.raises(EmptyWeightError, match=r"Module\.weight of shape .* has no entries"):
        ours(m)
    with pytest.raises(ValueError):  # EmptyWeightError is a ValueError (and a RuntimeError)
        ours(m)


@pytest.mark.parametrize("api", APIS)
def test_numpy_style_integers_are_accepted(api):
    ours, _ = APIS[api]
    ours(nn.Linear(4, 3), n_power_iterations=torch.tensor(2).item(), eps=1e-8)
