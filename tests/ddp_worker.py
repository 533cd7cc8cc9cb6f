"""Worker for tests/test_ddp.py: trains spectral-normed models under DistributedDataParallel.

Not a test module itself (spawned processes import it by name).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import safe_norm
import safe_norm.parametrizations

# (api, lazy, track_tol)
CONFIGS = [(api, lazy, None) for api in ("hook", "parametrization") for lazy in (False, True)]
CONFIGS += [("hook", True, 1e-4), ("parametrization", False, 1e-4)]
STEPS = int(os.environ.get("SAFE_NORM_DDP_STEPS", "4"))
BATCH = 8  # split evenly over the ranks
# Rendezvous and collective timeout. A run takes seconds, but on a loaded 2-core CI machine one
# rank can still be importing torch long after the other is waiting for it at the rendezvous.
TIMEOUT_S = 180


def build(api: str, lazy: bool, track: float | None = None) -> nn.Module:
    function = safe_norm.spectral_norm if api == "hook" else safe_norm.parametrizations.spectral_norm
    sn = (lambda m: function(m, track_tol=track)) if track else function
    torch.manual_seed(0)
    if track:  # a layer wider than 64 both ways: tracking's Krylov path, not its exact one
        first = sn(nn.LazyConv2d(8, 3)) if lazy else sn(nn.Conv2d(3, 8, 3))
        net = nn.Sequential(first, nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.LazyLinear(96) if lazy else nn.Linear(288, 96)),
                            nn.LeakyReLU(0.2), sn(nn.Linear(96, 1)))
        if lazy:
            safe_norm.initialize_now(net, torch.zeros(1, 3, 8, 8))
        return net
    if lazy:
        net = nn.Sequential(sn(nn.LazyConv2d(8, 3)), nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.LazyLinear(1)))
        safe_norm.initialize_now(net, torch.zeros(1, 3, 8, 8))
    else:
        net = nn.Sequential(sn(nn.Conv2d(3, 8, 3)), nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.Linear(8 * 6 * 6, 1)))
    return net


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randn(BATCH, 1, generator=g)


def train(net: nn.Module, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank::world], y[rank::world]
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    module = net.module if isinstance(net, DistributedDataParallel) else net
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on the loopback device
    # Rendezvous through a file: a port picked free in the parent can be taken by another
    # process before rank 0 binds it (gloo then binds its own ports on the loopback address).
    store = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        for api, lazy, track in CONFIGS:
            ddp = DistributedDataParallel(build(api, lazy, track))
            state = train(ddp, rank, world)
            torch.save(state, os.path.join(out_dir, f"{api}-{lazy}-{track}-rank{rank}.pt"))
        # No rank leaves while the other may still be sending it the last collective's data.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawned(rank: int, world: int, out_dir: str) -> None:
    """Entry point of a spawned rank: run, then leave without shutting the interpreter down.

    The process group outlives destroy_process_group here: DDP keeps references to it, so gloo's
    worker threads are never joined. One of them may still be freeing a finished allreduce (or
    the barrier work that holds it) when the main thread has already begun Python's shutdown;
    the work holds a Python object, freeing it takes the GIL, Python ends the thread with
    pthread_exit, the unwind meets a noexcept destructor and the rank aborts ("terminate called
    without an active exception", about one run in 50 on a busy machine, after every result was
    saved). os._exit skips that shutdown. An exception still takes the usual path (traceback
    file, exit code 1), so the parent reports it whatever happens at exit.
    """
    run(rank, world, out_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
