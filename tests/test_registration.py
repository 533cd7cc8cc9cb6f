"""Both APIs: valid at registration, on the layer zoo, against the exact float64 value."""

from __future__ import annotations

import pytest
import torch

from .helpers import APIS, BIG, ZOO, example_input, rel, sn_state, used_sigma, zoo_exact_sigma


def _check_valid_at_registration(api, layer, seed):
    ours, _ = APIS[api]
    factory, dim = {**ZOO, **BIG}[layer]
    torch.manual_seed(seed)
    m = ours(factory()).eval()
    exact, checksum = zoo_exact_sigma(layer, seed)
    assert sn_state(m)[0].double().sum().item() == checksum  # the weight the cache measured
    assert rel(used_sigma(m, dim=dim), exact) < 1e-4
    with torch.no_grad():  # and the eval forward divides by that sigma
        m(example_input(m))
    assert torch.allclose(m.weight.double() * exact, sn_state(m)[0].double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("layer", ZOO)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_is_valid_right_after_registration(api, layer, seed):
    _check_valid_at_registration(api, layer, seed)


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("layer", BIG)
def test_sigma_is_valid_right_after_registration_big(api, layer):
    _check_valid_at_registration(api, layer, 0)
