"""Registration cost and the sigma error it leaves: upstream (both APIs) vs safe_norm.

Prints, per layer, the median registration time of each, safe_norm's time as a ratio of
upstream's parametrization API (the only upstream path that warms up at all), and the relative
error of the sigma an eval forward right after registration would use, against the exact
spectral norm in float64.  All figures come from one run on one machine.

Run:  python benchmarks/registration.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import torch.utils.benchmark as tb
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
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
        "safe_norm": safe_norm.spectral_norm,
    }
    print(f"\n{'layer':<22}" + "".join(f"{name + ' ms':>20}{'σ err':>10}" for name in apis) + f"{'ratio':>8}")
    for label, factory, dim in layers(args.quick):
        torch.manual_seed(0)
        base = factory().to(device)
        row, times = f"{label:<22}", {}
        for name, fn in apis.items():
            timer = tb.Timer("fn(copy.deepcopy(base))", globals={"fn": fn, "base": base, "copy": copy})
            copy_cost = tb.Timer("copy.deepcopy(base)", globals={"base": base, "copy": copy})
            t = timer.blocked_autorange(min_run_time=1.0).median - copy_cost.blocked_autorange(min_run_time=0.5).median
            times[name] = t
            err = sigma_error(fn(copy.deepcopy(base)), dim)
            row += f"{t * 1e3:>20.2f}{err:>+10.1e}"
        row += f"{times['safe_norm'] / times['upstream param.']:>8.2f}"
        print(row)
    print("\nratio = safe_norm registration time / upstream parametrization's (15 power iterations).")


if __name__ == "__main__":
    main()
