"""Operations per spectral-normed layer per training step, upstream vs safe_norm (both APIs).

On CUDA it counts kernel launches (torch.profiler, CUDA activity); on the CPU, where there are
no kernels to launch, it counts ATen operator calls, the per-op dispatch cost that dominates
small layers.  The count of the plain layer is subtracted: what remains is the normalisation's.

Run:  python benchmarks/launches.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from _common import APIS, machine, table


def count(net: nn.Module, x: torch.Tensor, cuda: bool) -> int:
    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    step()  # warm: any first-forward work (warm-up, caches) is not a training step's
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    # top-level ATen calls only: an op called by another op is part of it
    return sum(1 for e in events if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(machine(device))
    what = "CUDA kernel launches" if cuda else "top-level ATen operator calls"
    x = torch.randn(8, 512, device=device)
    plain = count(nn.Linear(512, 512).to(device).train(), x, cuda)
    rows = []
    for name, sn in APIS.items():
        n = count(sn(nn.Linear(512, 512)).to(device).train(), x, cuda)
        rows.append([name, str(n - plain)])
    print(f"\n{what} per spectral-normed Linear(512, 512) per training step (forward+backward),")
    print(f"beyond the plain layer's {plain}:\n")
    print(table(["variant", "count"], rows))


if __name__ == "__main__":
    main()
