"""What each patch of the upstream series leaves, and what registration costs, against the
installed torch (the numbers of ``docs/upstream-pr.md``).

For default-initialised layers (Linear, Conv2d, ConvTranspose2d, small to large), S seeds each:
the relative error of the sigma an ``eval()`` forward right after registration divides by,
``|uᵀWv / σ₁ - 1|`` against the exact ``torch.linalg.matrix_norm(W, 2)`` in float64 (worst over
seeds), and the registration time (median over seeds, one thread, module construction not
timed), for

* upstream hook API (random ``u``, ``v``) and upstream parametrization API (15 iterations),
* after patch 1 (hook API: 15 iterations at registration),
* after patch 2 (both APIs: Lanczos to 1e-4),

with the ratio patched / upstream parametrization (same run).  The patched modules are built
from the series' text (``safe_norm._patch.load_patched``), beside the installed torch.

Run:  python benchmarks/upstream_patch.py [--seeds 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as hook_sn

from safe_norm import _patch

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "Linear 128x128": lambda: nn.Linear(128, 128),
    "Linear 1024x1024": lambda: nn.Linear(1024, 1024),
    "Linear 4096x4096": lambda: nn.Linear(4096, 4096),
    "Conv2d 64->128 k3": lambda: nn.Conv2d(64, 128, 3),
    "Conv2d 512->512 k3": lambda: nn.Conv2d(512, 512, 3),
    "ConvT2d 512->256 k4": lambda: nn.ConvTranspose2d(512, 256, 4),
}


def _state(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if hasattr(m, "weight_orig"):
        return m.weight_orig, m.weight_u, m.weight_v
    p = m.parametrizations.weight
    return p.original, p[0]._u, p[0]._v


def error(m: nn.Module) -> float:
    W, u, v = _state(m)
    dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0
    W = W.detach().transpose(0, dim).flatten(1).double()
    exact = torch.linalg.matrix_norm(W, 2).item()
    return abs(torch.dot(u.double(), W @ v.double()).item() - exact) / exact


def measure(sn: Callable[[nn.Module], nn.Module], make: Callable[[], nn.Module], seeds: int,
            device: str) -> tuple[float, float]:
    """(worst error, median registration seconds) over seeds."""
    errors, seconds = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        m = make().to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        m = sn(m)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        errors.append(error(m))
    return max(errors), statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    patches = _patch.series()
    root = _patch.installed_torch_root()
    hook = (root / _patch.HOOK_FILE).read_text(encoding="utf-8")
    param = (root / _patch.PARAM_FILE).read_text(encoding="utf-8")
    after = {}
    for n, patch in enumerate(patches, 1):  # the files as each patch leaves them
        hook = patch.files.get(_patch.HOOK_FILE, (hook, hook))[1]
        param = patch.files.get(_patch.PARAM_FILE, (param, param))[1]
        after[n] = _patch.load_patched(hook, param, f"bench{n}")
    variants = {
        "upstream hook": hook_sn,
        "upstream param (15 it.)": parametrizations.spectral_norm,
        "patch 1 hook (15 it.)": after[1][0].spectral_norm,
        "patch 2 hook": after[2][0].spectral_norm,
        "patch 2 param": after[2][1].spectral_norm,
    }
    print(f"torch {torch.__version__}, {args.device}, 1 thread, {args.seeds} seeds; "
          "error: worst |sigma used / exact - 1|; time: median registration")
    print("| layer | " + " | ".join(variants) + " | time patch 2 param / upstream param |")
    print("|---|" + "---|" * (len(variants) + 1))
    for name, make in LAYERS.items():
        cells, times = [], {}
        for label, sn in variants.items():
            worst, seconds = measure(sn, make, args.seeds, args.device)
            times[label] = seconds
            cells.append(f"{worst:.1e}, {seconds * 1e3:.1f} ms")
        ratio = times["patch 2 param"] / times["upstream param (15 it.)"]
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
