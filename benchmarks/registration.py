"""Registration cost and the sigma error it leaves: upstream (both APIs) vs safe_norm.

Prints, per layer, the median registration time of each, safe_norm's time as a ratio of
upstream's parametrization API (the only upstream path that warms up at all), and the relative
error of the sigma an eval forward right after registration would use, against the exact
spectral norm in float64.  All figures come from one run on one machine.

Run:  python benchmarks/registration.py [--device cuda] [--quick]

The other benchmarks use torch.utils.benchmark; registration cannot (see one_shot_median).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations
from safe_norm import _power


def layers(quick: bool):
    sizes = [(20, 256), (512, 512), (1024, 1024)] + ([] if quick else [(2048, 2048), (4096, 4096)])
    for out_f, in_f in sizes:
        yield f"Linear {out_f}x{in_f}", lambda o=out_f, i=in_f: nn.Linear(i, o), 0
    yield "Conv2d 256x128x3x3", lambda: nn.Conv2d(128, 256, 3), 0
    yield "ConvT2d 256->128 4x4", lambda: nn.ConvTranspose2d(256, 128, 4), 1


def sigma_error(module: nn.Module, dim: int) -> float:
    if hasattr(module, "parametrizations"):
        W = module.parametrizations.weight.original
        sn = module.parametrizations.weight[0]
        u, v = sn._u, sn._v
    else:
        W, u, v = module.weight_orig, module.weight_u, module.weight_v
    W = _power.weight_to_matrix(W.detach(), dim).double()
    exact = torch.linalg.matrix_norm(W, 2).item()
    used = _power.sigma(W, u.double(), v.double()).item()
    return (used - exact) / exact


def one_shot_median(fn, base: nn.Module, runs: int) -> float:
    """Median seconds of ``fn(fresh copy of base)``.

    Registration changes its module and cannot run twice on it, while torch.utils.benchmark's
    Timer always runs its statement more than once (a warm-up first); so each run here gets a
    fresh copy, made outside the timed region, and the clock is read around the call alone.
    """
    sync = torch.cuda.synchronize if base.weight.is_cuda else (lambda: None)
    fn(copy.deepcopy(base))  # warm-up: first-call costs (allocator, kernels) are not registration's
    samples = []
    for _ in range(runs):
        m = copy.deepcopy(base)
        sync()
        start = time.perf_counter()
        fn(m)
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="skip the 2048 and 4096 layers")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, safe_norm {safe_norm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    apis = {
        "upstream hook": upstream_hook,
        "upstream param.": parametrizations.spectral_norm,
        "safe_norm hook": safe_norm.spectral_norm,
        "safe_norm param.": safe_norm.parametrizations.spectral_norm,
    }
    print(f"\n{'layer':<22}" + "".join(f"{name + ' ms':>21}{'σ err':>10}" for name in apis)
          + f"{'ratio hook':>12}{'ratio param':>12}")
    for label, factory, dim in layers(args.quick):
        torch.manual_seed(0)
        base = factory().to(device)
        row, times = f"{label:<22}", {}
        runs = max(5, min(40, int(2e7 // base.weight.numel())))
        for name, fn in apis.items():
            t = times[name] = one_shot_median(fn, base, runs)
            err = sigma_error(fn(copy.deepcopy(base)), dim)
            row += f"{t * 1e3:>21.2f}{err:>+10.1e}"
        for ours in ("safe_norm hook", "safe_norm param."):
            row += f"{times[ours] / times['upstream param.']:>12.2f}"
        print(row)
    print("\nms = median over 5-40 registrations, each on a fresh copy of the layer;")
    print("ratio = safe_norm registration time / upstream parametrization's (15 power iterations);")
    print("σ err = (sigma the first eval forward divides by - exact) / exact, exact in float64.")


if __name__ == "__main__":
    main()
