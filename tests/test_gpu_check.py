"""scripts/gpu_check.py, the check that runs the day a GPU is there, kept from rotting: its CPU
dry run (every step but CUDA's own) and its host-synchronisation counter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safe_norm import _power

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
SECTIONS = ("tests", "syncs", "autocast", "graphs", "memory", "benchmarks", "smoke", "compile")


def _module():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    # The team's smoke script lives beside the checkout, not in it (and tries what old torch
    # releases lack): a stand-in of its output format, on the default device the check sets.
    smoke = tmp_path / "real_usage_smoke.py"
    smoke.write_text("import torch, safe_norm\n"
                     "m = safe_norm.spectral_norm(torch.nn.Linear(8, 4))\n"
                     "print('hook  on_the_default_device', 'ok' if m.weight_orig.device.type == 'cpu' else 'FAILS')\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                           "--smoke", str(smoke)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    sections = {row[0].lstrip("| ") for row in rows[1:]}
    assert set(SECTIONS) <= sections
    verdicts = [row[-1].rstrip(" |") for row in rows[1:]]
    assert "FAIL" not in verdicts and verdicts.count("ok") >= 15
    assert "## Outputs" in out.read_text()  # each step's output, for the day it fails


def test_the_counter_sees_what_waits_for_the_device_and_nothing_else():
    gpu_check = _module()
    x = torch.randn(64, 64)
    with gpu_check.Counting(torch.device("cpu")) as counter:
        y = x @ x
        y.sum().item()  # a wait
        torch.equal(y, x)  # a wait
        host = _power._host(y)  # a read
        torch.linalg.eigvalsh(host @ host.mT)  # on the host's copy: no wait
    assert counter.counts["dispatch"] == 3
    assert sorted(counter.ops) == ["_local_scalar_dense", "equal"]
    assert _power._host.__module__ == "safe_norm._power"  # restored
    with gpu_check.Counting(torch.device("cpu")) as counter:
        torch.linalg.eigvalsh(x @ x.mT)  # on device data: a wait
    assert counter.counts["dispatch"] == 1


def test_a_sync_in_the_training_step_fails_its_row(monkeypatch):
    """The check can fail: an ``.item()`` slipped into safe_norm's power step shows in the
    "training step" rows (claim: none), upstream's stay clean."""
    gpu_check = _module()
    power = _power.power_iteration_

    def syncing(*args, **kwargs):
        args[0].sum().item()
        return power(*args, **kwargs)

    monkeypatch.setattr(_power, "power_iteration_", syncing)
    check = gpu_check.Check(device=torch.device("cpu"), quick=True, deadline=float("inf"))
    gpu_check.section_syncs(check)
    verdicts = {row.item: row.verdict for row in check.rows}
    assert verdicts["safe_norm hook: training step"] == "FAIL"
    assert verdicts["safe_norm parametrization: training step"] == "FAIL"
    assert verdicts["upstream hook: training step"] == "ok"
