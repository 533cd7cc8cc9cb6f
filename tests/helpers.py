"""Shared test helpers: the layer zoo, exact references, the upstream twin."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as upstream_parametrizations
from torch.nn.utils import spectral_norm as upstream_spectral_norm
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

import safe_norm
import safe_norm.parametrizations
from safe_norm import _power

# API -> (safe_norm's function, upstream's function)
APIS = {
    "hook": (safe_norm.spectral_norm, upstream_spectral_norm),
    "parametrization": (safe_norm.parametrizations.spectral_norm, upstream_parametrizations.spectral_norm),
}

#: How safe_norm divides a weight by its sigma: as shipped (upstream's autograd graph below
#: ``_power.FUSED_MIN`` entries, the closed-form backward above), or by the closed form on every
#: weight (the test models are small: without this they would test the graph only).
PATHS = ("as shipped", "closed form")


@contextlib.contextmanager
def normalisation_path(path: str):
    """Within it, safe_norm's normalisation takes ``path`` (one of :data:`PATHS`)."""
    with mock.patch.object(_power, "FUSED_MIN", 0 if path == "closed form" else _power.FUSED_MIN):
        yield



def _cpu_float16_mv() -> bool:
    try:
        torch.mv(torch.ones(1, 1, dtype=torch.float16), torch.ones(1, dtype=torch.float16))
    except RuntimeError:  # "addmv_impl_cpu" not implemented for 'Half' (torch 2.1)
        return False
    return True


CPU_FLOAT16_MV = _cpu_float16_mv()
#: For tests of float16 weights on the CPU: both APIs, upstream's too, need torch.mv there.
NEEDS_CPU_FLOAT16_MV = pytest.mark.skipif(
    not CPU_FLOAT16_MV, reason="this torch has no CPU float16 torch.mv (upstream raises the same)")

# name -> (factory, dim).  Default-initialised, as users build them.
ZOO = {
    "Linear20x256": (lambda: nn.Linear(256, 20), 0),
    "Linear256x20": (lambda: nn.Linear(20, 256), 0),
    "Linear512": (lambda: nn.Linear(512, 512), 0),
    "Linear1024x4096": (lambda: nn.Linear(4096, 1024), 0),
    "Conv1d": (lambda: nn.Conv1d(64, 128, 5), 0),
    "Conv2d": (lambda: nn.Conv2d(128, 256, 3), 0),
    "Conv2d_rgb": (lambda: nn.Conv2d(3, 64, 4), 0),
    "Conv3d": (lambda: nn.Conv3d(16, 32, 3), 0),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(256, 128, 4), 1),
    "Embedding": (lambda: nn.Embedding(1000, 128), 0),
}
BIG = {
    "Linear2048": (lambda: nn.Linear(2048, 2048), 0),
    "Linear4096": (lambda: nn.Linear(4096, 4096), 0),
}


def exact_sigma(weight: torch.Tensor, dim: int = 0) -> float:
    """The exact spectral norm of the reshaped weight, in float64."""
    W = _power.weight_to_matrix(weight.detach(), dim).double()
    return torch.linalg.matrix_norm(W, 2).item()


@functools.lru_cache(maxsize=None)
def zoo_exact_sigma(layer: str, seed: int) -> tuple[float, float]:
    """(exact_sigma, checksum) of the zoo layer built right after ``torch.manual_seed(seed)``.

    Cached: the 4096x4096 SVD takes tens of seconds and both API test files need it.  The
    checksum (sum of the weight) lets a test confirm that it holds the same weight."""
    factory, dim = {**ZOO, **BIG}[layer]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    weight = factory().weight
    torch.random.set_rng_state(state)
    return exact_sigma(weight, dim), weight.detach().double().sum().item()


def sn_state(module: nn.Module, name: str = "weight"):
    """(original weight, u, v) of either API's spectral norm on ``module.<name>``."""
    if hasattr(module, "parametrizations"):
        plist = module.parametrizations[name]
        return plist.original.detach(), plist[0]._u, plist[0]._v
    return getattr(module, name + "_orig").detach(), getattr(module, name + "_u"), getattr(module, name + "_v")


def used_sigma(module: nn.Module, name: str = "weight", dim: int = 0) -> float:
    """The sigma an eval forward divides by now: uᴴ W v from the module's state (either API)."""
    weight, u, v = sn_state(module, name)
    W = _power.weight_to_matrix(weight, dim)
    return _power.sigma(W.double(), u.double(), v.double()).real.item()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def twin(module: nn.Module, ours, theirs=upstream_spectral_norm, **kwargs):
    """(upstream-normalised copy, safe_norm-normalised copy) with identical state, u and v too."""
    up = theirs(copy.deepcopy(module), **kwargs)
    sn = ours(copy.deepcopy(module), **kwargs)
    sn.load_state_dict(up.state_dict(), strict=True)  # a load: u, v are kept as loaded
    return up, sn


def example_input(module: nn.Module) -> torch.Tensor:
    """A small valid input for a zoo layer."""
    if isinstance(module, nn.Embedding):
        return torch.arange(min(4, module.num_embeddings))
    if isinstance(module, nn.Linear):
        return torch.randn(3, module.in_features)
    spatial = len(module.kernel_size)
    return torch.randn(1, module.in_channels, *([6] * spatial))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Max-abs difference within ``rtol`` of ``b``'s scale (plus one float32 ulp of 1)."""
    scale = b.abs().max().item() + torch.finfo(torch.float32).eps
    return (a - b).abs().max().item() <= rtol * scale


def _add_length_dim(module: nn.Module, args: tuple) -> tuple:
    return (args[0].unsqueeze(-1),)  # (a module-level function, so the net can be pickled)


def trained(sn_fn, seed: int = 0, steps: int = 3) -> nn.Sequential:
    """A small net (Linear + ConvTranspose1d, dims 0 and 1) after ``steps`` SGD steps, in eval."""
    torch.manual_seed(seed)
    net = nn.Sequential(sn_fn(nn.Linear(6, 8)), nn.ReLU(), sn_fn(nn.ConvTranspose1d(8, 4, 1)))
    net[2].register_forward_pre_hook(_add_length_dim)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        net(torch.randn(5, 6)).square().mean().backward()
        opt.step(), opt.zero_grad()
    return net.eval()


def roundtrip(state_dict: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint travels."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class DeviceWaits(TorchDispatchMode):
    """Records (``ops``) the ops that make the host wait for ``device``: those in ``WAITS`` and
    copies to the host, when an input is device data, and copies from pageable host memory.

    On the CPU, with one device, "host data" is what the test marks in ``host`` (what
    ``_krylov._host`` returned) and what was computed from host data alone; an op with any
    other tensor input counts as a device op (on a GPU, the host data would have been copied
    there first): what a GPU would wait for, less the copies back to it, which the CPU cannot
    tell from no copy.  ``mixed`` records the ops that got host data (not a 0-dim scalar)
    beside device data: a device mismatch on a GPU, unless the host data went through
    ``_krylov._back`` (with :meth:`moved` in its place)."""

    WAITS = {"_local_scalar_dense", "linalg_eigh", "_linalg_eigh", "linalg_eigvalsh", "_linalg_svd",
             "linalg_cholesky", "linalg_inv_ex", "linalg_solve_ex", "_linalg_solve_ex", "nonzero", "equal",
             "is_nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.device = device
        self.host = WeakTensorKeyDictionary()
        self.ops: list[str] = []
        self.mixed: list[str] = []  # ops given host and device data: on a GPU, an error

    def moved(self, back):
        """``_krylov._back`` as the host-to-device copy it is on a GPU: its result is device
        data (on the CPU it can be its input itself)."""
        def moved(x, like):
            y = back(x, like).clone()
            self.host.pop(y, None)
            return y
        return moved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        name = func._schema.name.split("::")[-1]
        if self.device.type == "cpu":
            # torch.tensor(python data) makes a host tensor, on any machine
            if (inputs and all(t in self.host for t in inputs)) or name.startswith("lift_fresh"):
                self.host.update({t: True for t in outputs})
                return out
            if inputs and name in self.WAITS:
                self.ops.append(name)
            if any(t in self.host and t.dim() for t in inputs):  # host scalars may meet device data
                self.mixed.append(name)
            return out
        on_device = any(t.device.type == self.device.type for t in inputs)
        if on_device and (name in self.WAITS or any(t.device.type == "cpu" for t in outputs)):
            self.ops.append(name)
        elif name in ("_to_copy", "copy_") and any(t.device.type == self.device.type for t in outputs):
            # host to device: without waiting only from pinned memory, asked not to block
            source = args[1] if name == "copy_" else args[0]
            blocking = not (args[2] if name == "copy_" and len(args) > 2 else kwargs.get("non_blocking", False))
            if source.device.type == "cpu" and (blocking or not source.is_pinned()):
                self.ops.append(f"{name} from pageable host memory")
        return out
