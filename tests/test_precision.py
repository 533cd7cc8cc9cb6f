"""Low precision (issue 6, item 3): half weights, autocast, float64."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from .helpers import APIS, CPU_FLOAT16_MV, NEEDS_CPU_FLOAT16_MV, exact_sigma, rel, sn_state, used_sigma


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, marks=NEEDS_CPU_FLOAT16_MV), torch.bfloat16])
def test_half_weights_register_train_and_keep_their_dtype(api, dtype):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(64, 48).to(dtype))
    weight, u, v = sn_state(m)
    assert u.dtype == v.dtype == dtype  # buffers as upstream gives them: checkpoints compatible
    assert theirs(nn.Linear(64, 48).to(dtype)).state_dict().keys() == m.state_dict().keys()
    assert rel(used_sigma(m), exact_sigma(weight)) < 1e-2  # 8 (bfloat16) / 11 (float16) bits
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(5):
        out = m(torch.randn(4, 64, dtype=dtype))
        out.float().square().mean().backward()
        opt.step(), opt.zero_grad()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(used_sigma(m), exact_sigma(sn_state(m)[0])) < 1e-2


@pytest.mark.parametrize("api", APIS)
@pytest.mark.skipif(CPU_FLOAT16_MV, reason="this torch has a CPU float16 torch.mv")
def test_cpu_float16_without_a_kernel_raises_as_upstream(api):
    ours, theirs = APIS[api]
    with pytest.raises(RuntimeError) as upstreams:
        theirs(nn.Linear(8, 4).half())(torch.randn(2, 8).half())
    with pytest.raises(RuntimeError, match=re.escape(str(upstreams.value))):
        ours(nn.Linear(8, 4).half())


@pytest.mark.parametrize("api", APIS)
@NEEDS_CPU_FLOAT16_MV
def test_float16_zero_weight_despite_eps_underflow(api):
    """eps=1e-12 is 0 in float16: the guard must not rely on it."""
    ours, theirs = APIS[api]
    m = nn.Linear(8, 4).half()
    nn.init.zeros_(m.weight)
    out = ours(m)(torch.randn(2, 8).half())
    assert torch.equal(out, m.bias.expand(2, 4))


AUTOCAST = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
def test_autocast_training(api, device, dtype):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    net = nn.Sequential(ours(nn.Linear(32, 64)), nn.ReLU(), ours(nn.Linear(64, 1))).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(10):
        with torch.autocast(device, dtype=dtype):
            loss = net(torch.randn(16, 32, device=device)).float().square().mean()
        loss.backward()
        opt.step(), opt.zero_grad()
    for layer in (net[0], net[2]):
        weight = sn_state(layer)[0]
        assert torch.isfinite(weight).all()
        assert rel(used_sigma(layer), exact_sigma(weight.cpu())) < 1e-2


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("shape", [(32, 64), (200, 300), (64, 1)])
def test_a_reconvergence_under_cpu_autocast(api, shape, monkeypatch):
    """A weight written before training, its next forward under ``torch.autocast`` (bfloat16):
    the re-convergence runs in the weight's dtype (it raised a dtype mismatch in ``addmv``),
    and a second autocast forward finds nothing to re-converge (CPU autocast leaves ``mv`` in
    float32; tests/test_cuda.py checks the content product where CUDA's would not)."""
    from safe_norm import _krylov

    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(*shape))
    weight = sn_state(m)[0]
    with torch.no_grad():
        weight.mul_(1 + 1e-3 * torch.randn(weight.shape))
    x = torch.randn(4, shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.eval()(x)
    assert rel(used_sigma(m), exact_sigma(weight)) < 1e-4
    calls = []
    warm_up = _krylov.warm_up_
    monkeypatch.setattr(_krylov, "warm_up_", lambda *a, **k: calls.append(1) or warm_up(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    m(x)
    assert not calls
