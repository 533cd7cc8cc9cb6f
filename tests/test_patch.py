"""The reference upstream patch: applied to a copy of the installed torch's spectral_norm.py, it
fixes the seed scenario and leaves upstream's checkpoints, random draws and training step as
they were."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import spectral_norm as upstream_spectral_norm

from safe_norm import _demo
from safe_norm._patch import UPSTREAM_FILE, upstream_patch, upstream_source_path

from .helpers import roundtrip


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """The patched copy, applied as a maintainer would (git apply; patch -p1 without git)."""
    root = tmp_path_factory.mktemp("pytorch")
    target = root / UPSTREAM_FILE
    target.parent.mkdir(parents=True)
    shutil.copy(upstream_source_path(), target)
    diff = subprocess.run([sys.executable, "-m", "safe_norm", "upstream-patch"], capture_output=True,
                          text=True, check=True).stdout
    assert diff == upstream_patch()
    if shutil.which("git"):
        subprocess.run(["git", "apply", "-"], input=diff, text=True, cwd=root, check=True)
    elif shutil.which("patch"):
        subprocess.run(["patch", "-p1"], input=diff, text=True, cwd=root, check=True)
    else:
        pytest.skip("neither git nor patch is installed")
    # named inside torch.nn.utils: up to torch 2.4 the file imports relatively (from ..modules)
    spec = importlib.util.spec_from_file_location("torch.nn.utils._patched_spectral_norm", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_patch_only_adds_a_few_lines():
    diff = upstream_patch().splitlines()
    added = [line for line in diff[2:] if line.startswith("+")]
    removed = [line for line in diff[2:] if line.startswith("-")]
    assert not removed and 5 <= len(added) <= 15
    assert sum(line.startswith("@@") for line in diff) == 1
    assert upstream_patch().count("normal_(0, 1)") == 2  # context only: the draws are kept


def test_the_patch_fails_clearly_on_an_unknown_file():
    with pytest.raises(RuntimeError, match="was not found"):
        upstream_patch("def spectral_norm(module):\n    return module\n")


def test_patched_upstream_fixes_the_seed_scenario(patched):
    fixed, broken = _demo.build(patched.spectral_norm), _demo.build(upstream_spectral_norm)
    for net, bound in ((fixed, 1e-4), (broken, None)):
        for m in net:
            if isinstance(m, nn.Linear):
                W = m.weight_orig.detach().double()
                exact = torch.linalg.matrix_norm(W, 2).item()
                used = torch.dot(m.weight_u.double(), W @ m.weight_v.double()).item()
                error = abs(used - exact) / exact
                if bound is None:
                    assert error > 0.5  # upstream as shipped: a random sigma
                else:
                    assert error < bound


def test_patched_upstream_draws_the_same_numbers_and_keeps_the_format(patched):
    torch.manual_seed(3)
    fixed = patched.spectral_norm(nn.Conv2d(8, 16, 3))
    after_fixed = torch.randn(4)
    torch.manual_seed(3)
    plain = upstream_spectral_norm(nn.Conv2d(8, 16, 3))
    assert torch.equal(after_fixed, torch.randn(4))
    assert torch.equal(fixed.weight_orig, plain.weight_orig)
    sd_fixed, sd_plain = fixed.state_dict(), plain.state_dict()
    assert list(sd_fixed) == list(sd_plain)
    assert sd_fixed._metadata == sd_plain._metadata


def test_patched_upstream_loads_upstream_checkpoints_and_trains_as_upstream(patched):
    torch.manual_seed(0)
    source = upstream_spectral_norm(nn.Linear(20, 30))
    source(torch.randn(4, 20))
    fixed = patched.spectral_norm(nn.Linear(20, 30))
    fixed.load_state_dict(roundtrip(source.state_dict()), strict=True)
    assert torch.equal(fixed.weight_u, source.weight_u) and torch.equal(fixed.weight_v, source.weight_v)
    x = torch.randn(5, 20)
    for mode in ("eval", "train", "train"):
        getattr(source, mode)(), getattr(fixed, mode)()
        assert torch.equal(fixed(x), source(x))  # bit for bit: the same code runs
    # and the old version-less format, through upstream's load hook
    old = dict(roundtrip(source.state_dict()))  # no metadata: the version-less format
    old["weight"] = source.weight_orig.detach() / torch.dot(source.weight_u, source.weight_orig.detach() @ source.weight_v)
    del old["weight_v"]
    fixed = patched.spectral_norm(nn.Linear(20, 30))
    fixed.load_state_dict(old, strict=True)
    plain = upstream_spectral_norm(nn.Linear(20, 30))
    plain.load_state_dict(old, strict=True)
    assert torch.equal(fixed.weight_v, plain.weight_v)


def test_upstream_patch_command_needs_no_arguments():
    run = subprocess.run([sys.executable, "-m", "safe_norm", "upstream-patch", "--oops"],
                         capture_output=True, text=True, env={**os.environ})
    assert run.returncode == 2 and "unrecognized arguments" in run.stderr
