"""torch.compile (issue 6, item 4): compiled training and eval match eager, no graph breaks,
no recompilation per step.  Slow (inductor compiles C++), kept in CI."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from safe_norm import _compat

from .helpers import APIS, close

pytestmark = pytest.mark.slow
REPORT: list[str] = []  # printed at the end of the run by conftest.py
# Up to torch 2.4 dynamo compiles each forward pre-hook call as a frame of its own (it skips
# upstream's hook altogether: explain sees no graph), so the second hooked layer counts as a
# break without a reason; nothing in the hook breaks the graph.
HOOKS_INLINED = _compat.TORCH >= (2, 5)


def _mlp(sn):
    torch.manual_seed(0)
    return nn.Sequential(sn(nn.Linear(16, 32)), nn.LeakyReLU(0.2), sn(nn.Linear(32, 1))), (4, 16)


def _conv_d(sn):
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Conv2d(3, 16, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(16, 32, 4, 2, 1)), nn.LeakyReLU(0.2),
        nn.Flatten(), sn(nn.Linear(32 * 4 * 4, 1)),
    ), (4, 3, 16, 16)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("model", [_mlp, _conv_d], ids=["mlp", "conv_discriminator"])
def test_compiled_matches_eager_without_breaks_or_recompiles(api, model):
    ours, _ = APIS[api]
    torch._dynamo.reset()
    eager, shape = model(ours)
    compiled_net, _ = model(ours)
    compiled_net.load_state_dict(eager.state_dict())
    for mode in ("train", "eval"):
        getattr(eager, mode)()
        explanation = torch._dynamo.explain(eager)(torch.randn(*shape))
        REPORT.append(f"{api:15s} {model.__name__[1:]:8s} {mode:5s}: {explanation.graph_break_count} graph breaks")
        assert not explanation.break_reasons
        if HOOKS_INLINED:
            assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_net.parameters(), lr=0.05)
    for step in range(4):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step))
        eager.train(), compiled_net.train()
        with torch._dynamo.config.patch(error_on_recompile=step >= 1):  # compiled once, reused
            out_c = compiled(x)
        out_e = eager(x)
        assert close(out_c, out_e)
        out_e.square().mean().backward()
        out_c.square().mean().backward()
        opt_e.step(), opt_c.step(), opt_e.zero_grad(), opt_c.zero_grad()
    for (k, a), b in zip(eager.state_dict().items(), compiled_net.state_dict().values(), strict=True):
        assert close(b, a), k
    eager.eval(), compiled_net.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert close(compiled(x), eager(x))
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x)  # the eval graph, compiled once
