"""The torch version matrix: the whole test suite once per torch release, each in its own venv.

    pip install nox
    nox -s tests                      # every version below (CUDA builds: ~3 GB each, deleted after)
    nox -s "tests(torch='2.1.2')"     # one version
    nox -s table                      # results of the runs so far, as a Markdown table

Each run writes `.nox/results/torch-<version>.xml` (JUnit) and `.json` (seconds); `table`
reads them.  Only torch 2.13.0 is a CPU build on this workplace's disk; the others come from the
package registry as CUDA builds, so each venv is deleted when its run ends (keep it with
`--keep-venv`, given after `--`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

# Every minor release from the oldest one tried to the newest on the registry, latest patch.
TORCH = ["2.1.2", "2.2.2", "2.3.1", "2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1",
         "2.10.0", "2.11.0", "2.12.1", "2.13.0", "2.14.1", "2.15.0"]
# The test tools as CI pins them (requirements-ci.txt), without its torch pin.
TOOLS = ["pytest==9.0.3", "hypothesis==6.155.2", "matplotlib==3.10.7"]
RESULTS = Path(".nox/results")

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = False


@nox.session(python="3.11")
@nox.parametrize("torch", TORCH)
def tests(session: nox.Session, torch: str) -> None:
    keep = "--keep-venv" in session.posargs
    started = time.monotonic()
    # numpy 2 breaks the extensions of torch releases built against numpy 1 (before 2.3)
    release = tuple(map(int, torch.split(".")[:2]))
    numpy = "numpy<2" if release < (2, 3) else "numpy"
    # inductor imports pkg_resources before torch 2.4, and new venvs no longer hold setuptools
    extra = ["setuptools<81"] if release < (2, 4) else []
    # an empty constraints file lifts a workplace pip cap (here: torch<=2.14.1) on new releases
    session.install(f"torch=={torch}", numpy, *extra, *TOOLS, env={"PIP_CONSTRAINT": os.devnull})
    session.install("--no-deps", ".")
    installed = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    xml = RESULTS / f"torch-{torch}.xml"
    try:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                    f"--junitxml={xml}", *[a for a in session.posargs if a != "--keep-venv"])
    finally:
        (RESULTS / f"torch-{torch}.json").write_text(json.dumps(
            {"install_s": round(installed), "total_s": round(time.monotonic() - started)}))
        if not keep:
            shutil.rmtree(session.virtualenv.location, ignore_errors=True)


@nox.session(python=False)
def table(session: nox.Session) -> None:
    """The matrix so far, one row per torch version run."""
    rows = ["| torch | passed | failed | errors | skipped | test s | install s |", "|---|---|---|---|---|---|---|"]
    for torch in TORCH:
        xml = RESULTS / f"torch-{torch}.xml"
        if not xml.exists():
            continue
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        seconds = json.loads((RESULTS / f"torch-{torch}.json").read_text())
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        rows.append(f"| {torch} | {passed} | {n['failures']} | {n['errors']} | {n['skipped']} | "
                    f"{float(suite.get('time', 0)):.0f} | {seconds['install_s']} |")
    print("\n".join(rows))
