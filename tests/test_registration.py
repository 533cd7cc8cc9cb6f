"""Both APIs: valid at registration, on the layer zoo, against the exact float64 value."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", [(1024, 1024), (256, 512)])
def test_a_registration_reads_the_device_once_per_check(api, shape, monkeypatch):
    """The warm-up's Lanczos reads its coefficients at checks only, a few steps apart, one host
    read each (``_krylov._host``); besides them a registration waits for the device a fixed
    few times (the weight's finiteness, the vectors' norms), whatever its steps.  And what the
    host computed goes back to the device before it meets device data."""
    from safe_norm import _krylov

    from .helpers import DeviceWaits

    mode, reads, checks, steps = DeviceWaits(), [], [], []
    host, ritz, lanczos = _krylov._host, _krylov.ritz, _krylov._golub_kahan

    def counted_host(x):
        reads.append(x.shape)
        y = host(x).clone()
        mode.host[y] = True
        return y

    monkeypatch.setattr(_krylov, "_host", counted_host)
    monkeypatch.setattr(_krylov, "_back", mode.moved(_krylov._back))
    monkeypatch.setattr(_krylov, "ritz", lambda *a: checks.append(1) or ritz(*a))
    monkeypatch.setattr(_krylov, "_golub_kahan", lambda *a, **k: (r := lanczos(*a, **k), steps.append(r.steps))[0])
    ours, _ = APIS[api]
    torch.manual_seed(0)
    with mode:
        ours(torch.nn.Linear(shape[1], shape[0]))
    assert len(steps) == 1 and steps[0] >= 20  # a Lanczos warm-up, not the exact solve
    assert len(reads) == len(checks) <= steps[0] // 2
    assert len(mode.ops) <= 10, mode.ops
    assert mode.mixed == []  # host results go back through _back (a GPU would refuse the mix)


class _WeightSizedAllocations(TorchDispatchMode):
    """Records the ops whose output is a new allocation at least ``size`` elements large (not
    a view of an input: its storage is none of theirs)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.size
                    and t.untyped_storage().data_ptr() not in inputs):
                self.ops.append(func._schema.name)
        return out


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("weight", ["float32", "float32 1e-30", "float64 1e30"])
def test_a_lanczos_registration_makes_no_copy_of_the_weight(api, weight):
    """The weight's checks and the warm-up read it in place: the finiteness check and the
    warm-up's magnitude two reductions each, without a temporary, and the Lanczos products on
    the weight itself (isfinite().all() and a scaled copy were six passes and four weight-sized
    temporaries: more time than twenty of its products at 4096x4096).  Only weights of extreme magnitude are worked on scaled, and
    they still converge.  The parametrization API evaluates the parametrization once at
    registration, as upstream's ``register_parametrization`` does: that is its one division."""
    dtype, *scale = weight.split()
    ours, _ = APIS[api]
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 256, dtype=getattr(torch, dtype))
    with torch.no_grad():
        layer.weight.mul_(float(scale[0]) if scale else 1.0)
    with _WeightSizedAllocations(layer.weight.numel()) as mode:
        ours(layer)
    once = ["aten::div"] if api == "parametrization" else []
    assert mode.ops == (["aten::div"] if scale else []) + once, mode.ops
    W = sn_state(layer)[0].double()
    assert rel(used_sigma(layer), torch.linalg.matrix_norm(W, 2).item()) < 1e-4


@pytest.mark.parametrize("api", APIS)
def test_a_weight_whose_sigma_is_below_eps_warms_up(api):
    """The warm-up's vectors are unit vectors whatever ``eps`` is: a layer of sigma ~1e-6 with
    ``eps=1e-4`` (normalising ``W v`` through ``eps`` left ``u`` near zero: sigma 100 % off, and
    training forwards, which keep vectors whose product is below ``eps``, never repaired it)."""
    ours, _ = APIS[api]
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 256)
    with torch.no_grad():
        layer.weight.mul_(1e-6)
    m = ours(layer, eps=1e-4)
    exact = torch.linalg.matrix_norm(sn_state(m)[0].double(), 2).item()
    assert rel(used_sigma(m), exact) < 1e-4
    m.train()
    for _ in range(3):
        m(torch.randn(2, 384))
    assert rel(used_sigma(m), exact) < 1e-4
