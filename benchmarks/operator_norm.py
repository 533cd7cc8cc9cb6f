"""What safe_norm.operator_norm costs, and how far a convolution's norm is from the reshaped sigma.

Per layer and input shape: the sigma of the weight reshaped to a matrix (what every
spectral_norm divides by), the operator norm's estimate (a value the layer attains) and its
certified upper bound, their gap, the ratio estimate / reshaped sigma, and the seconds each side
took (one run each, one thread unless --threads).

Run:  python benchmarks/operator_norm.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

import safe_norm
from safe_norm import _operator


def layers(quick: bool):
    yield "Conv2d 3->64 k3 p1 (DCGAN/SNGAN input)", lambda: nn.Conv2d(3, 64, 3, padding=1), (3, 32, 32)
    yield "Conv2d 64->128 k4 s2 p1 (DCGAN D)", lambda: nn.Conv2d(64, 128, 4, 2, 1), (64, 32, 32)
    yield "Conv2d 128->128 k3 p1, circular", lambda: nn.Conv2d(128, 128, 3, padding=1, padding_mode="circular"), (128, 16, 16)
    yield "ConvT2d 256->128 k4 s2 p1 (DCGAN G)", lambda: nn.ConvTranspose2d(256, 128, 4, 2, 1), (256, 8, 8)
    yield "Conv1d 256->256 k41 s4 g16 p20 (HiFi-GAN)", lambda: nn.Conv1d(256, 256, 41, 4, groups=16, padding=20), (256, 256)
    if not quick:
        yield "Conv2d 256->512 k3 p0", lambda: nn.Conv2d(256, 512, 3), (256, 16, 16)
        yield "Conv2d 256->512 k3 p1", lambda: nn.Conv2d(256, 512, 3, padding=1), (256, 16, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 256->512 layers (about a minute each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, safe_norm {safe_norm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; default-initialised layers (seed 0)\n")
    header = f"{'layer':<42}{'input':>14}{'reshaped σ':>12}{'estimate':>10}{'upper':>10}{'gap':>9}{'est./σ':>8}{'upper s':>9}{'total s':>9}{'steps':>7}"
    print(header)
    for label, factory, shape in layers(args.quick):
        torch.manual_seed(0)
        layer = factory()
        d, transposed = _operator._kind(layer)
        start = time.perf_counter()
        _operator._upper(layer, d, transposed, layer.weight.detach(), shape[1:])
        upper_s = time.perf_counter() - start
        start = time.perf_counter()
        found = safe_norm.operator_norm(layer, shape)
        total_s = time.perf_counter() - start
        print(f"{label:<42}{'x'.join(map(str, shape)):>14}{found.reshaped:>12.4f}{found.estimate:>10.4f}{found.upper:>10.4f}"
              f"{found.gap:>9.1e}{found.estimate / found.reshaped:>8.3f}{upper_s:>9.2f}{total_s:>9.2f}{found.steps:>7}", flush=True)
    print("\nestimate: ‖A x‖/‖x‖ of the best input Lanczos found (attained: a lower bound); upper: certified;")
    print("gap = upper/estimate - 1; upper s: the bound alone; total s: operator_norm (bound, Lanczos, reshaped σ).")


if __name__ == "__main__":
    main()
