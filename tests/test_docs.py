"""Every `>>>` example in the README and MIGRATION.md runs and prints what it says."""

import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("doc", ["README.md", "MIGRATION.md"])
def test_markdown_examples_run(doc):
    result = doctest.testfile(str(ROOT / doc), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"no examples found in {doc}"
    assert result.failed == 0


def test_readme_quick_start_has_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -r requirements-ci.txt -e ".[test]" && python -m pytest'
    assert test_command in readme and test_command in ci
    assert "pip install -r requirements-ci.txt . && python examples/bug_repro.py" in readme
    assert "torch==2.13.0" in (ROOT / "requirements-ci.txt").read_text()
