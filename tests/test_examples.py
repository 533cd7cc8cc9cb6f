"""The examples run and show what they claim."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def bug_repro() -> str:
    """The README's demo, run once for the tests below (it takes seconds)."""
    return _run("examples/bug_repro.py")


def test_bug_repro_shows_upstream_wrong_and_safe_norm_right_in_both_apis(bug_repro):
    out = bug_repro
    errors = dict(re.findall(r"^\s+(upstream hook|upstream param\.|safe_norm hook|safe_norm param\.): (\S+)$", out, flags=re.M))
    assert len(errors) == 4, out
    assert float(errors["upstream hook"]) > 1.0, out
    assert float(errors["upstream param."]) > 1e-3, out
    assert float(errors["safe_norm hook"]) < 1e-4 and float(errors["safe_norm param."]) < 1e-4, out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d", line)]
    assert len(rows) == 3, out
    for _, _, up_hook, _, ours_hook, ours_param in rows:
        assert abs(float(up_hook)) > 0.5, out
        assert abs(float(ours_hook)) < 1e-4 and abs(float(ours_param)) < 1e-4, out


def test_bug_repro_follows_training_steps_from_the_eval_error(bug_repro):
    out = bug_repro
    table = out[out.index("then training forwards"):]
    rows = {m[1]: [float(x) for x in m[2].split()] for m in re.finditer(
        r"^\s+(upstream hook|upstream param\.|safe_norm hook|safe_norm param\.)\s+(\S.*)$", table, flags=re.M)}
    assert len(rows) == 4 and all(len(values) == 7 for values in rows.values()), out
    assert rows["upstream hook"][0] > 0.5 and rows["upstream param."][0] > 1e-3
    assert rows["safe_norm hook"][0] < 1e-4 and rows["safe_norm param."][0] < 1e-4
    assert rows["safe_norm hook"][1] < 1e-4  # the first training forward divides by a valid sigma


def test_operator_sigma_shows_reshaped_normalised_convs_above_1_lipschitz(tmp_path):
    out = tmp_path / "plot.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "examples/operator_sigma.py"), "--steps", "20", "--every", "10",
                          "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^\| conv [^|]+\| (\S+) \| (\S+) \| (\S+) \|$", run.stdout, flags=re.M)
    assert len(rows) == 3, run.stdout
    assert all(float(x) > 1.2 for row in rows for x in row), run.stdout  # measured 1.31-2.23
    assert out.stat().st_size > 10_000
