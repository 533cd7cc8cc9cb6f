"""Registration cost and the sigma error it leaves: upstream (both APIs) vs safe_norm.

Prints, per layer, the median registration time of each, safe_norm's time as a ratio of
upstream's parametrization API (the only upstream path that warms up at all), and the relative
error of the sigma an eval forward right after registration would use, against the exact
spectral norm in float64.  All figures come from one run on one machine.

Then the same for whole discriminators (every conv and linear layer normalised, each
registration on a fresh copy of the unnormalised model): DCGAN (benchmarks/discriminator.py),
SNGAN (benchmarks/tracking.py), HiFi-GAN's multi-scale discriminator (3 scale discriminators of
8 Conv1d layers, grouped, kernel 41), and a model with one 2048x16384 linear layer. "ops" is
the number of aten operators one registration dispatches (counted once, untimed).

Run:  python benchmarks/registration.py [--device cuda] [--quick] [--threads N] [--models] [--match REGEX]

The other benchmarks use torch.utils.benchmark; registration cannot (see one_shot_median).
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations
from safe_norm import _power


def layers(quick: bool):
    sizes = [(20, 256), (256, 256), (512, 512), (1024, 1024)] + ([] if quick else [(2048, 2048), (4096, 4096)])
    for out_f, in_f in sizes:
        yield f"Linear {out_f}x{in_f}", lambda o=out_f, i=in_f: nn.Linear(i, o), 0
    yield "Conv2d 256x128x3x3", lambda: nn.Conv2d(128, 256, 3), 0
    yield "Conv2d 512x256x3x3", lambda: nn.Conv2d(256, 512, 3), 0
    yield "ConvT2d 256->128 4x4", lambda: nn.ConvTranspose2d(256, 128, 4), 1
    yield "ConvT2d 512->256 4x4", lambda: nn.ConvTranspose2d(512, 256, 4), 1
    yield "Conv1d 1024 k41 g256", lambda: nn.Conv1d(1024, 1024, 41, groups=256), 0
    yield "Embedding 10000x128", lambda: nn.Embedding(10000, 128), 0


def _hifigan_msd() -> nn.Module:
    """HiFi-GAN's MultiScaleDiscriminator: three DiscriminatorS (their conv stacks)."""
    def scale() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(1, 128, 15, 1, padding=7), nn.Conv1d(128, 128, 41, 2, groups=4, padding=20),
            nn.Conv1d(128, 256, 41, 2, groups=16, padding=20), nn.Conv1d(256, 512, 41, 4, groups=16, padding=20),
            nn.Conv1d(512, 1024, 41, 4, groups=16, padding=20), nn.Conv1d(1024, 1024, 41, 1, groups=16, padding=20),
            nn.Conv1d(1024, 1024, 5, 1, padding=2), nn.Conv1d(1024, 1, 3, 1, padding=1))
    return nn.ModuleList([scale() for _ in range(3)])


def models(quick: bool):
    from discriminator import discriminator  # noqa: PLC0415 - the benchmarks' own models
    from tracking import sngan_d  # noqa: PLC0415

    yield "DCGAN D", discriminator
    yield "SNGAN D", lambda: sngan_d(lambda m: m)[0]
    yield "HiFi-GAN MSD", _hifigan_msd
    if not quick:
        yield "Linear 2048x16384", lambda: nn.Sequential(nn.Linear(16384, 2048))


def normalise_all(fn, model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            fn(m, dim=1) if isinstance(m, nn.ConvTranspose2d) else fn(m)
    return model


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops(fn, base: nn.Module) -> int:
    m = copy.deepcopy(base)
    with _Ops() as counter:
        fn(m)
    return counter.count


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
    sync = torch.cuda.synchronize if next(base.parameters()).is_cuda else (lambda: None)
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
    parser.add_argument("--quick", action="store_true", help="skip the 2048 and 4096 layers, and the 2048x16384 model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", action="store_true", help="whole models only")
    parser.add_argument("--match", default="", help="only the layers and models whose label this regex finds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    counted = ("upstream param.", "safe_norm hook", "safe_norm param.")
    header = f"{'ratio hook':>12}{'ratio param':>12}{'ops up. param.':>16}{'ops hook':>10}{'ops param.':>12}"
    if not args.models:
        print(f"\n{'layer':<22}" + "".join(f"{name + ' ms':>21}{'σ err':>10}" for name in apis) + header)
        for label, factory, dim in layers(args.quick):
            if not re.search(args.match, label):
                continue
            torch.manual_seed(0)
            base = factory().to(device)
            row, times = f"{label:<22}", {}
            runs = max(5, min(40, int(2e7 // base.weight.numel())))
            for name, fn in apis.items():
                t = times[name] = one_shot_median(fn if dim == 0 else lambda m, fn=fn: fn(m, dim=1), base, runs)
                err = sigma_error(fn(copy.deepcopy(base), dim=dim) if dim else fn(copy.deepcopy(base)), dim)
                row += f"{t * 1e3:>21.2f}{err:>+10.1e}"
            for ours in ("safe_norm hook", "safe_norm param."):
                row += f"{times[ours] / times['upstream param.']:>12.2f}"
            for name in counted:
                n = ops(apis[name] if dim == 0 else lambda m, fn=apis[name]: fn(m, dim=1), base)
                row += f"{n:>{16 if name == 'upstream param.' else 10 if name == 'safe_norm hook' else 12}}"
            print(row, flush=True)
    print(f"\n{'model':<22}" + "".join(f"{name + ' ms':>21}" for name in apis) + header)
    for label, factory in models(args.quick):
        if not re.search(args.match, label):
            continue
        torch.manual_seed(0)
        base = factory().to(device)
        row, times = f"{label:<22}", {}
        for name, fn in apis.items():
            t = times[name] = one_shot_median(lambda m, fn=fn: normalise_all(fn, m), base, 5)
            row += f"{t * 1e3:>21.1f}"
        for ours in ("safe_norm hook", "safe_norm param."):
            row += f"{times[ours] / times['upstream param.']:>12.2f}"
        for name in counted:
            n = ops(lambda m, fn=apis[name]: normalise_all(fn, m), base)
            row += f"{n:>{16 if name == 'upstream param.' else 10 if name == 'safe_norm hook' else 12}}"
        print(row, flush=True)
    print("\nms = median over 5-40 registrations (models: 5), each on a fresh copy of the layer or model;")
    print("ratio = safe_norm registration time / upstream parametrization's (15 power iterations);")
    print("σ err = (sigma the first eval forward divides by - exact) / exact, exact in float64;")
    print("ops = aten operators dispatched by one registration (counted once, untimed).")


if __name__ == "__main__":
    main()
