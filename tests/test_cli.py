"""python -m safe_norm audit PATH | demo: checkpoints audited from their tensors alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import safe_norm
from safe_norm.__main__ import main
from safe_norm._checkpoint import audit_state_dict

from .helpers import APIS
from .test_adopt import _mixed, _train


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _compare(from_file, from_model, prefix: str = "") -> None:
    assert [(r.module, r.name, r.api, r.shape, r.dim) for r in from_file] == [
        (prefix + r.module, r.name, r.api, r.shape, r.dim) for r in from_model
    ]
    for a, b in zip(from_file, from_model):
        assert a.sigma == pytest.approx(b.sigma, rel=1e-6)
        assert a.exact == pytest.approx(b.exact, rel=1e-12)
        assert a.library is None
        assert a.untrained == (b.untrained if a.api == "hook" else None)


@pytest.mark.parametrize("train", [False, True])
def test_audit_of_a_training_checkpoint_matches_the_live_model(tmp_path, capsys, train):
    netD, netG = _mixed(), nn.Sequential(APIS["hook"][1](nn.ConvTranspose2d(6, 6, 3)))
    opt = torch.optim.Adam(netD.parameters())
    if train:
        _train(netD)
        netG(torch.randn(1, 6, 4, 4)).sum().backward()  # a training forward: dim 1 is then clear
        with torch.no_grad():
            netG.eval()(torch.randn(1, 6, 4, 4))
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "netD": netD.state_dict(), "netG": netG.state_dict(),
                "optimizerD": opt.state_dict()}, path)
    code, out, err = _cli(capsys, "audit", str(path))
    assert code == 0 and err == ""
    rows = audit_state_dict(torch.load(path, weights_only=True))
    _compare(rows[:6], safe_norm.audit(netD), "netD.")
    live = safe_norm.audit(netG)
    if train:  # square ConvTranspose: dim told apart by the vectors' alignment
        _compare(rows[6:], live, "netG.")
    else:  # random vectors cannot tell dim 0 from dim 1: the default, 0, is reported
        assert rows[6].dim == 0 and live[0].dim == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["module", "name", "api"]
    assert lines[1].split()[:5] == ["netD.0", "weight", "hook", "-", "24x12"]
    assert ("never trained" in out) is (not train)


def test_audit_of_the_old_version_less_format(tmp_path, capsys):
    m = APIS["hook"][1](nn.Linear(10, 5))
    m(torch.randn(2, 10))
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    sigma = torch.dot(sd["weight_u"], sd["weight_orig"] @ sd.pop("weight_v"))
    sd["weight"] = sd["weight_orig"] / sigma
    torch.save(sd, tmp_path / "old.pt")
    code, out, _ = _cli(capsys, "audit", str(tmp_path / "old.pt"))
    (row,) = audit_state_dict(sd)
    assert code == 0 and row.sigma == pytest.approx(sigma.item(), rel=1e-6) and row.untrained is None


def test_whole_modules_need_unsafe_pickle(tmp_path, capsys):
    # (torch refuses to pickle parametrized modules whole: hook API only)
    net = nn.Sequential(APIS["hook"][1](nn.Linear(3, 4)), APIS["hook"][0](nn.Linear(4, 2)))
    torch.save(net, tmp_path / "model.pt")
    code, out, err = _cli(capsys, "audit", str(tmp_path / "model.pt"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--unsafe-pickle" in err and "pickled Python objects" in err
    code, out, err = _cli(capsys, "audit", "--unsafe-pickle", str(tmp_path / "model.pt"))
    assert code == 0 and "upstream" in out and "safe_norm" in out  # the live classes tell


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "truncated", "empty", "no spectral norm", "a list"])
def test_bad_checkpoints_get_one_line_and_exit_code_2(tmp_path, case):
    path = tmp_path / "ckpt.pt"
    if case == "directory":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint" * 20)
    elif case == "truncated":
        torch.save(nn.Linear(4, 4).state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no spectral norm":
        torch.save({"model": nn.Linear(4, 4).state_dict()}, path)
    elif case == "a list":
        torch.save([torch.zeros(3)], path)
    run = subprocess.run([sys.executable, "-m", "safe_norm", "audit", str(path)], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("safe_norm audit: error: ")
    assert "Traceback" not in run.stderr


def test_demo_command_prints_the_tables_and_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # pinned in requirements-ci.txt: CI runs this
    path = tmp_path / "sigma.png"
    code, out, _ = _cli(capsys, "demo", "--steps", "3", "--plot", str(path))
    assert code == 0
    assert "right after construction" in out and "training forwards" in out
    assert out.count("safe_norm hook") == 3
    assert f"plot saved to {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
