"""Worker for tests/test_fsdp.py: spectral-normed models sharded with FSDP2 (``fully_shard``) on
two gloo processes, side by side with upstream's; and, for tests/test_ddp.py's neighbour, a DDP
model with several gradient buckets under ``torch.compile``.

Not a test module itself (spawned processes import it by name).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import safe_norm
import safe_norm.parametrizations

# (library, api, lazy, track_tol)
CONFIGS = [("safe_norm", api, lazy, None) for api in ("hook", "parametrization") for lazy in (False, True)]
CONFIGS += [("safe_norm", "hook", False, 1e-4), ("safe_norm", "parametrization", True, 1e-4)]
CONFIGS += [("upstream", api, False, None) for api in ("hook", "parametrization")]
# (library, api, wrapping) for DDP under torch.compile
COMPILED = [(lib, api, wrap) for lib in ("safe_norm", "upstream") for api in ("hook", "parametrization")
            for wrap in ("compile(DDP)", "DDP(compile)")]
STEPS = 20
COMPILED_STEPS = 5
BATCH = 8  # split evenly over the ranks
NORMED = (0, 3, 5)  # the normalised layers of build()'s Sequential
TIMEOUT_S = 180  # rendezvous and collectives (see ddp_worker.TIMEOUT_S)


def name(*config: object) -> str:
    return "-".join(str(c).replace("(", "_").replace(")", "") for c in config)


def build(library: str, api: str, lazy: bool = False, track: float | None = None) -> nn.Sequential:
    if library == "upstream":
        sn = nn.utils.spectral_norm if api == "hook" else nn.utils.parametrizations.spectral_norm
    else:
        function = safe_norm.spectral_norm if api == "hook" else safe_norm.parametrizations.spectral_norm
        sn = (lambda m: function(m, track_tol=track)) if track else function
    torch.manual_seed(0)
    # 288 -> 96: wider than 64 both ways, tracking's Krylov path, not its exact one
    if lazy:
        net = nn.Sequential(sn(nn.LazyConv2d(8, 3)), nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.LazyLinear(96)),
                            nn.LeakyReLU(0.2), sn(nn.LazyLinear(1)))
        safe_norm.initialize_now(net, torch.zeros(1, 3, 8, 8))
        return net
    return nn.Sequential(sn(nn.Conv2d(3, 8, 3)), nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.Linear(288, 96)),
                         nn.LeakyReLU(0.2), sn(nn.Linear(96, 1)))


def shard(net: nn.Sequential, mesh) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for i in NORMED:
        fully_shard(net[i], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randn(BATCH, 1, generator=g)


def probe() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(999))


def train(net: nn.Module, steps: int, rank: int = 0, world: int = 1, optimizer=torch.optim.Adam,
          lr: float = 1e-3) -> list[torch.Tensor]:
    """``steps`` steps on each rank's share of the batch; what ``safe_norm.sigma`` said of every
    normalised layer after each (a collective on sharded layers: every rank asks)."""
    opt = optimizer(net.parameters(), lr=lr)
    inner = getattr(net, "module", net)
    inner = getattr(inner, "_orig_mod", inner)
    sigmas = []
    for step in range(steps):
        x, y = batch(step)
        ((net(x[rank::world]) - y[rank::world]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        sigmas.append(torch.stack([safe_norm.sigma(inner[i]) for i in NORMED]))
    return sigmas


def whole(net: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, sharded ones gathered (no state_dict hook involved)."""
    out = {}
    for key, t in [*net.named_parameters(), *net.named_buffers()]:
        full = getattr(t, "full_tensor", None)
        out[key] = (full() if full is not None else t).detach().clone()
    return out


def outputs(net: nn.Module) -> dict[str, torch.Tensor]:
    """Eval outputs, and every normalised layer's ``weight`` read outside forward."""
    net.eval()
    with torch.no_grad():
        result = {"out": net(probe())}
        for i in NORMED:
            try:  # upstream's parametrization mixes the sharded weight with its plain u, v here
                w = net[i].weight
            except RuntimeError as error:
                result[f"{i}.weight"] = str(error)
                continue
            full = getattr(w, "full_tensor", None)
            result[f"{i}.weight"] = (full() if full is not None else w).clone()
    net.train()
    return result


def fsdp(rank: int, world: int, out_dir: str, config: tuple) -> dict:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions, get_model_state_dict, set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (world,))
    net = shard(build(*config), mesh)
    result = {"sigmas": torch.stack(train(net, STEPS, rank, world))}
    result.update(whole=whole(net), **outputs(net))
    # a full state_dict, for a model in one process
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        result["full"] = {k: v.clone() for k, v in full.items()}
    # a distributed checkpoint, into a freshly built and sharded model
    path = os.path.join(out_dir, "dcp-" + name(*config))
    dcp.save({"model": get_model_state_dict(net)}, checkpoint_id=path)
    fresh = shard(build(*config), mesh)
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(fresh, state["model"])
    result["loaded"] = {"whole": whole(fresh), **outputs(fresh)}
    return result


def meta_recipe(mesh, api: str) -> dict:
    """FSDP2's large-model recipe: built on the meta device, sharded, ``to_empty``, initialised.
    Whether ``state_dict()`` warned before any forward (u, v not converged; a sharded weight is
    not gathered there), and after one."""
    sn = safe_norm.spectral_norm if api == "hook" else safe_norm.parametrizations.spectral_norm
    with torch.device("meta"):
        net = sn(nn.Linear(64, 32))
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    fully_shard(net, mesh=mesh)
    net.to_empty(device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    result = {}
    for when in ("before", "after"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net.state_dict()
        result[when] = any("not converged" in str(w.message) for w in caught)
        net(torch.randn(2, 64)).sum().backward()
    return result


def ddp_compiled(rank: int, world: int, library: str, api: str, wrap: str) -> dict:
    torch._dynamo.reset()
    net = build(library, api)
    # several buckets, the first no larger than the others (dynamo's DDPOptimizer asserts it)
    dist._DEFAULT_FIRST_BUCKET_BYTES = 1
    if wrap == "compile(DDP)":
        model = torch.compile(DistributedDataParallel(net, bucket_cap_mb=0.0001), backend="aot_eager")
    else:
        model = DistributedDataParallel(torch.compile(net, backend="aot_eager"), bucket_cap_mb=0.0001)
    train(model, COMPILED_STEPS, rank, world, torch.optim.SGD, lr=0.1)
    return {"whole": whole(net), "buckets": model._get_ddp_logging_data().get("num_buckets_reduced")
            if isinstance(model, DistributedDataParallel) else None}


def run(rank: int, world: int, out_dir: str, which: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        if which == "meta":
            from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

            mesh = init_device_mesh("cpu", (world,))
            warned = {api: meta_recipe(mesh, api) for api in ("hook", "parametrization")}
            torch.save(warned, os.path.join(out_dir, f"meta-rank{rank}.pt"))
        elif which == "fsdp":
            for config in CONFIGS:
                torch.save(fsdp(rank, world, out_dir, config), os.path.join(out_dir, f"{name(*config)}-rank{rank}.pt"))
        else:
            for config in COMPILED:
                torch.save(ddp_compiled(rank, world, *config), os.path.join(out_dir, f"{name(*config)}-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawned(rank: int, world: int, out_dir: str, which: str) -> None:
    """Entry point of a spawned rank; leaves as tests/ddp_worker.spawned does, for its reason."""
    run(rank, world, out_dir, which)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
