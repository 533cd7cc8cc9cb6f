"""The one-import swap on real import lines: `safe_norm` holds every public name of
`torch.nn.utils`, `safe_norm.parametrizations` every one of `torch.nn.utils.parametrizations`:
upstream's own objects, except safe_norm's spectral norm."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import safe_norm
import safe_norm.parametrizations
from safe_norm import _spectral_norm

# (upstream's module, safe_norm's, the names safe_norm defines in upstream's place)
MODULES = {
    "torch.nn.utils": (torch.nn.utils, safe_norm, {
        "spectral_norm": _spectral_norm.spectral_norm,
        "remove_spectral_norm": _spectral_norm.remove_spectral_norm,
        "parametrizations": safe_norm.parametrizations,
    }),
    "torch.nn.utils.parametrizations": (torch.nn.utils.parametrizations, safe_norm.parametrizations, {
        "spectral_norm": safe_norm.parametrizations.spectral_norm,
    }),
}

# Verbatim from the repositories' model files, before the swap.
REAL_LINES = {
    "HiFi-GAN, VITS: models.py": "from torch.nn.utils import weight_norm, remove_weight_norm, spectral_norm",
    "BigVGAN: bigvgan.py": "from torch.nn.utils import weight_norm, remove_weight_norm",
    "BigVGAN: discriminators.py": "from torch.nn.utils import weight_norm, spectral_norm",
    "Applio: discriminators.py": "from torch.nn.utils.parametrizations import spectral_norm, weight_norm",
    "Applio: generators/hifigan.py": "from torch.nn.utils import remove_weight_norm\n"
                                     "from torch.nn.utils.parametrizations import weight_norm",
}


def _swapped(line: str) -> str:
    return line.replace("from torch.nn.utils", "from safe_norm")


def _run(code: str) -> dict:
    namespace: dict = {}
    exec(code, namespace)
    del namespace["__builtins__"]
    return namespace


def _public(module: types.ModuleType) -> list[str]:
    return [name for name in dir(module) if not name.startswith("_")]


@pytest.mark.parametrize("upstream_name", MODULES)
def test_every_public_name_of_upstream_is_upstreams_object_but_the_spectral_norm(upstream_name):
    upstream, ours, overrides = MODULES[upstream_name]
    names = _public(upstream)
    assert set(overrides) <= set(names)
    for name in names:
        got = _run(f"from {ours.__name__} import {name}")[name]
        if name in overrides:
            assert got is overrides[name] and got is not getattr(upstream, name), name
        else:
            assert got is getattr(upstream, name), name
    assert isinstance(safe_norm.spectral_norm, types.FunctionType)  # never the module


@pytest.mark.parametrize("where", REAL_LINES)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own deprecation of the hook-API weight_norm
def test_real_import_lines_need_only_the_module_name_changed(where):
    line = REAL_LINES[where]
    theirs, ours = _run(line), _run(_swapped(line))
    assert ours.keys() == theirs.keys()
    for name, obj in ours.items():
        if name == "spectral_norm":
            assert obj.__module__.startswith("safe_norm.") and obj is not theirs[name]
        else:
            assert obj is theirs[name], name
    if "spectral_norm" in ours:  # as those files use it: a discriminator, eval before training
        x = torch.randn(2, 1, 32)
        disc = nn.Sequential(ours["weight_norm"](nn.Conv1d(1, 8, 5, padding=2)), nn.LeakyReLU(0.1),
                             ours["spectral_norm"](nn.Conv1d(8, 1, 3, padding=1)))
        assert abs(safe_norm.audit(disc)[0].error) < 1e-4
        with torch.no_grad():
            out = disc.eval()(x)
        _check_copies(disc, x, out, parametrized="parametrizations" in line)
    if "remove_weight_norm" in ours and "parametrizations" not in line:
        conv = ours["weight_norm"](nn.ConvTranspose1d(8, 4, 4, 2))
        ours["remove_weight_norm"](conv)
        assert not hasattr(conv, "weight_g")


def _check_copies(disc: nn.Module, x: torch.Tensor, out: torch.Tensor, parametrized: bool) -> None:
    """The usual ways a model travels, with upstream's weight norm next to safe_norm's spectral
    norm: deepcopy, a state_dict into a model built by upstream's functions, and, for the hook
    API, torch.save of the whole module (torch's parametrize refuses that for both libraries)."""
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(disc)(x), out)
    utils = torch.nn.utils.parametrizations if parametrized else torch.nn.utils
    twin = nn.Sequential(utils.weight_norm(nn.Conv1d(1, 8, 5, padding=2)), nn.LeakyReLU(0.1),
                         utils.spectral_norm(nn.Conv1d(8, 1, 3, padding=1)))
    twin.load_state_dict(disc.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), out, rtol=1e-6, atol=0)
    if parametrized:
        torch.nn.utils.parametrize.remove_parametrizations(disc[2], "weight")
        assert not torch.nn.utils.parametrize.is_parametrized(disc[2])
        return
    buffer = io.BytesIO()
    torch.save(disc, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(x), out)


@pytest.mark.parametrize("upstream_name", MODULES)
def test_star_import_is_upstreams_with_safe_norms_spectral_norm(upstream_name):
    upstream, ours, overrides = MODULES[upstream_name]
    theirs, mine = _run(f"from {upstream_name} import *"), _run(f"from {ours.__name__} import *")
    assert theirs.keys() <= mine.keys()
    for name, obj in theirs.items():
        assert mine[name] is overrides.get(name, obj), name
    if ours is safe_norm:
        assert mine["convert"] is safe_norm.convert  # and safe_norm's own API


@pytest.mark.parametrize("upstream_name", MODULES)
def test_dir_and_later_names(upstream_name, monkeypatch):
    upstream, ours, _ = MODULES[upstream_name]
    assert set(_public(upstream)) <= set(dir(ours))
    assert "spectral_norm" in dir(ours) and "_upstream" in dir(ours)
    # looked up when asked for, not copied at import: a name a newer torch adds comes along
    added = object()
    monkeypatch.setattr(upstream, "added_in_a_later_torch", added, raising=False)
    assert _run(f"from {ours.__name__} import added_in_a_later_torch")["added_in_a_later_torch"] is added
    assert "added_in_a_later_torch" in dir(ours)


@pytest.mark.parametrize("upstream_name", MODULES)
def test_unknown_and_private_names_fail_as_usual(upstream_name):
    upstream, ours, _ = MODULES[upstream_name]
    with pytest.raises(AttributeError, match=rf"^module '{ours.__name__}' has no attribute 'no_such_name'$"):
        ours.no_such_name  # noqa: B018
    assert not hasattr(ours, "no_such_name")
    with pytest.raises(ImportError, match=rf"^cannot import name 'no_such_name' from '{ours.__name__}'"):
        _run(f"from {ours.__name__} import no_such_name")
    # private names are never forwarded: they are each module's own business
    private = [n for n in vars(upstream) if n.startswith("_") and not n.startswith("__") and n not in vars(ours)]
    assert private
    for name in private:
        assert not hasattr(ours, name), name


def test_submodules_come_as_attributes():
    """`from torch.nn.utils import prune` works upstream (a submodule); so does the swapped
    line, even when nothing imported that submodule before.  `import safe_norm.prune` does not
    work: safe_norm has no such submodule."""
    assert _run("from safe_norm import parametrize, rnn, stateless")["rnn"] is torch.nn.utils.rnn
    code = ("import safe_norm\n"
            "from safe_norm import prune  # a fresh interpreter: torch has not imported it\n"
            "import torch.nn.utils.prune\n"
            "assert prune is torch.nn.utils.prune\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with pytest.raises(ModuleNotFoundError):
        _run("import safe_norm.prune")
