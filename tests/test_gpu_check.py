"""scripts/gpu_check.py, the check that runs the day a GPU is there, kept from rotting: its CPU
dry run (every step but CUDA's own) and its host-synchronisation counter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safe_norm import _krylov, _power

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
SECTIONS = ("syncs", "autocast", "graphs", "memory", "smoke", "tests", "compile", "benchmarks")
# The team's smoke script lives beside the checkout, not in it (and tries what old torch releases
# lack): a stand-in of its output format, on the default device the check sets, from its own
# file (a __future__ import first, a path beside __file__), as ``python PATH`` runs it.
STAND_IN = """from __future__ import annotations

from pathlib import Path

import torch, safe_norm
m = safe_norm.spectral_norm(torch.nn.Linear(8, 4))
print('hook  on_the_default_device', 'ok' if m.weight_orig.device.type == 'cpu' else 'FAILS')
print('file  beside_itself', 'ok' if (Path(__file__).parent / 'real_usage_smoke.py').is_file() else 'FAILS')
"""


def _module():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    smoke = tmp_path / "real_usage_smoke.py"
    smoke.write_text(STAND_IN)
    # The budget, not the timeout, stops a slow run: 30-45 s alone, 135-220 s on a busy 2-core
    # machine; the steps that run in-process come first, the last subprocess ends at the budget,
    # the report right after. Exit 2 (the budget left steps out) fails too: they went unexercised.
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                           "--smoke", str(smoke), "--budget", "360"], capture_output=True, text=True, timeout=480)
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
        host = _krylov._host(y)  # a read
        torch.linalg.eigvalsh(host @ host.mT)  # on the host's copy: no wait
    assert counter.counts["dispatch"] == 3
    assert sorted(counter.ops) == ["_local_scalar_dense", "equal"]
    assert _krylov._host.__module__ == "safe_norm._krylov"  # restored
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


def test_a_step_the_budget_stops_is_skipped_and_the_exit_status_says_so(tmp_path, monkeypatch):
    gpu_check = _module()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    check = gpu_check.Check(device=torch.device("cpu"), quick=True, deadline=time.monotonic() + 1)
    start = time.monotonic()
    assert gpu_check._subprocess(check, "sleep", sleep, 60, least=0)[0] is None  # the budget's: skipped
    assert time.monotonic() - start < 10
    check.deadline = float("inf")
    assert gpu_check._subprocess(check, "sleep", sleep, 1, least=0)[0] == 124  # its own limit: a hang

    smoke = tmp_path / "real_usage_smoke.py"
    smoke.write_text("import time\ntime.sleep(60)\n")
    subprocess_ = gpu_check._subprocess  # started however little is left: the budget kills it
    monkeypatch.setattr(gpu_check, "_subprocess", lambda *a, **kw: subprocess_(*a, **{**kw, "least": 0}))
    check = gpu_check.Check(device=torch.device("cpu"), quick=True, deadline=time.monotonic() + 2)
    gpu_check.section_compile(check)  # no CUDA: skipped, and that does not count
    assert check.status() == 0
    gpu_check.section_smoke(check, smoke)
    assert [(r.section, r.verdict, r.claim) for r in check.rows][-1] == ("smoke", "skipped", "out of time (--budget)")
    assert check.status() == 2
    check.row("smoke", "a failure", "-", "-", False)
    assert check.status() == 1


def test_main_exits_2_where_the_budget_leaves_a_section_out(tmp_path, monkeypatch, capsys):
    gpu_check = _module()
    smoke = tmp_path / "real_usage_smoke.py"
    smoke.write_text(STAND_IN)
    argv = [str(SCRIPT), "--device", "cpu", "--quick", "--smoke", str(smoke), "--budget", "5", "--sections"]
    monkeypatch.setattr(sys, "argv", [*argv, "graphs,compile"])  # skipped for want of CUDA only
    assert gpu_check.main() == 0
    monkeypatch.setattr(sys, "argv", [*argv, "graphs,smoke"])  # the smoke needs 10 s to start
    assert gpu_check.main() == 2
    row = "| smoke | real_usage_smoke.py, default device cpu | - | out of time (--budget) | skipped |"
    assert row in capsys.readouterr().out


def test_the_smoke_runs_from_its_own_file_on_the_default_device(tmp_path):
    gpu_check = _module()
    smoke = tmp_path / "real_usage_smoke.py"
    smoke.write_text(STAND_IN)
    check = gpu_check.Check(device=torch.device("cpu"), quick=True, deadline=float("inf"))
    gpu_check.section_smoke(check, smoke)
    assert [(r.measured, r.verdict) for r in check.rows] == [("rc 0: 2 ok, 0 not", "ok")], check.notes


@pytest.mark.parametrize("tail, counts", [
    ("1 failed, 2 passed, 3 errors in 1.02s", (2, 1, 3, 0)),
    ("==== 13 skipped, 1 error in 0.40s ====", (0, 0, 1, 13)),
    ("ERROR tests/test_x.py\n!!! Interrupted: 1 error during collection !!!\n1 error in 0.31s", (0, 0, 1, 0)),
    ("tests/test_x.py ..\n[stopped at its limit: 240 s]", (0, 0, 0, 0)),  # killed: no summary
])
def test_pytest_counts_count_errors(tail, counts):
    n = _module()._pytest_counts("collected 3 items\n" + tail)
    assert (n["passed"], n["failed"], n["errors"], n["skipped"]) == counts


@pytest.mark.parametrize("rc, out", [(0, "12 skipped, 1 error in 3.0s"), (2, "1 error in 0.3s"), (124, ""),
                                     (5, "no tests ran in 0.01s")])
def test_the_cuda_tests_row_fails_on_errors_and_on_a_run_that_broke_off(monkeypatch, rc, out):
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "_subprocess", lambda *a, **kw: (rc, out, 1.0))
    check = gpu_check.Check(device=torch.device("cpu"), quick=True, deadline=float("inf"))
    gpu_check.section_tests(check)
    assert check.rows[0].item.startswith("the CUDA tests") and check.rows[0].verdict == "FAIL"
    assert f"rc {rc}" in check.rows[0].measured


def test_the_check_stops_at_once_without_pytest_or_hypothesis():
    # (and a short run where the check were missing: hypothesis is only the suite's need)
    blocked = ("import runpy, sys; sys.modules['hypothesis'] = None; "
               "sys.argv = ['gpu_check.py', '--device', 'cpu', '--quick', '--sections', 'graphs']; "
               f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "hypothesis missing" in done.stderr and "pip install" in done.stderr
