"""Shared benchmark helpers: the four spectral norms side by side, machine info, tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as upstream_hook

import safe_norm
import safe_norm.parametrizations

APIS = {
    "upstream hook": upstream_hook,
    "safe_norm hook": safe_norm.spectral_norm,
    "upstream param.": parametrizations.spectral_norm,
    "safe_norm param.": safe_norm.parametrizations.spectral_norm,
}
# (ours, upstream's) pairs whose time ratio is reported
PAIRS = [("safe_norm hook", "upstream hook"), ("safe_norm param.", "upstream param.")]


def machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (
        f"torch {torch.__version__}, safe_norm {safe_norm.__version__}, {where}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )


def run_cold(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python script *args`` in a process of its own with inductor's on-disk caches in a fresh
    temporary directory and off: what it compiles, it compiles from scratch (a compile-time
    measurement must not reuse an earlier variant's kernels)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, check=False)


def normalised_weight(module: nn.Module) -> torch.Tensor:
    """Run the spectral norm of ``module`` once (either API) and return the normalised weight."""
    if hasattr(module, "parametrizations"):
        return module.weight
    for hook in module._forward_pre_hooks.values():
        hook(module, ())
    return module.weight


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
