"""The same guarantees on a CUDA device; skipped where there is none (CI has none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import APIS, close, exact_sigma, rel, twin, used_sigma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")



@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("factory", [lambda: nn.Linear(1024, 1024), lambda: nn.Conv2d(128, 256, 3)])
def test_valid_at_registration_on_cuda(api, factory):
    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(factory().cuda()).eval()
    assert m(torch.randn(2, *((1024,) if isinstance(m, nn.Linear) else (128, 8, 8)), device="cuda")).is_cuda
    weight = m.weight_orig if api == "hook" else m.parametrizations.weight.original
    assert rel(used_sigma(m), exact_sigma(weight.cpu())) < 1e-4


@pytest.mark.parametrize("api", APIS)
def test_training_on_cuda_equals_upstream(api):
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    up, sn = twin(nn.Linear(64, 32).cuda(), ours, theirs)
    for net in (up, sn):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(3):
            torch.manual_seed(step)
            net(torch.randn(8, 64, device="cuda")).square().mean().backward()
            opt.step(), opt.zero_grad()
    for (name, a), b in zip(up.state_dict().items(), sn.state_dict().values(), strict=True):
        assert close(b, a), name


def test_audit_and_convert_on_cuda():
    import safe_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(64, 128)),
                        nn.utils.parametrizations.spectral_norm(nn.Linear(128, 256))).cuda()
    assert [r.untrained for r in safe_norm.audit(net)] == [True, None]
    safe_norm.convert(net, rewarm_parametrizations=True)  # not trained: the option warms both
    rows = safe_norm.audit(net)
    assert all(r.library == "safe_norm" and abs(r.error) < 1e-4 for r in rows)
    assert safe_norm.sigma(net[0]).is_cuda


@pytest.mark.parametrize("api", APIS)
def test_a_reconvergence_under_cuda_autocast(api, monkeypatch):
    """As tests/test_precision.py's CPU test, where autocast also runs ``mv`` in float16: the
    content check is computed in the weight's dtype, so a second autocast forward finds
    nothing to re-converge."""
    from safe_norm import _krylov

    ours, _ = APIS[api]
    torch.manual_seed(0)
    m = ours(nn.Linear(300, 200).cuda())
    weight = m.weight_orig if api == "hook" else m.parametrizations.weight.original
    with torch.no_grad():
        weight.mul_(1 + 1e-3 * torch.randn_like(weight))
    x = torch.randn(4, 300, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        m.eval()(x)
    assert rel(used_sigma(m), exact_sigma(weight.cpu())) < 1e-4
    calls = []
    warm_up = _krylov.warm_up_
    monkeypatch.setattr(_krylov, "warm_up_", lambda *a, **k: calls.append(1) or warm_up(*a, **k))
    with torch.autocast("cuda", dtype=torch.float16):
        m(x)
    assert not calls


@pytest.mark.parametrize("api", APIS)
def test_a_tracked_step_synchronises_once_per_check_on_cuda(api, monkeypatch):
    """CUDA's sync debug mode warns at every synchronisation: a tracked forward's count is its
    checks (the copy back to the device goes through pinned memory, without waiting)."""
    import warnings

    from safe_norm import _krylov

    ours, _ = APIS[api]
    torch.manual_seed(0)
    net = nn.Sequential(ours(nn.Linear(96, 256), track_tol=1e-4), nn.ReLU(),
                        ours(nn.Linear(256, 256), track_tol=1e-4)).cuda()
    x = torch.randn(32, 96, device="cuda")
    for _ in range(2):
        net(x).square().mean().backward()
    checks = []
    track = _krylov.track_

    def counted(*args, **kwargs):
        found = track(*args, **kwargs)
        checks.append(found.checks)
        return found

    monkeypatch.setattr(_krylov, "track_", counted)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = net(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and len(checks) == 2
    assert sum("synchroniz" in str(w.message) for w in caught) == sum(checks)
