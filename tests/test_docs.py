"""Every `>>>` example in the README and MIGRATION.md runs and prints what it says; MIGRATION.md's
other snippets run, or (install lines) are checked against the package."""

import doctest
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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


def _blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)


def test_migration_python_blocks_that_are_not_doctests_run():
    scripts = [block for block in _blocks("MIGRATION.md", "python") if ">>>" not in block]
    assert scripts
    for block in scripts:
        exec(compile(block, "MIGRATION.md", "exec"), {})


def test_migration_install_lines_name_this_package_and_are_met_by_this_install():
    """The pip and requirements lines are checked, not run (that needs the package index)."""
    extras = set(metadata.metadata("safe_norm").get_all("Provides-Extra") or [])
    pip_lines = [line.split("#")[0] for block in _blocks("MIGRATION.md", "bash") for line in block.splitlines()]
    pip_lines = [line for line in pip_lines if line.strip()]
    assert pip_lines
    for line in pip_lines:
        words = shlex.split(line)
        assert words[:2] == ["pip", "install"], line
        for word in words[2:]:
            req = Requirement(word)
            assert req.name == "safe_norm" and req.extras <= extras, line
    requirements = [Requirement(line) for block in _blocks("MIGRATION.md", "text") for line in block.splitlines() if line.strip()]
    assert {r.name for r in requirements} == {"safe_norm", "torch"}
    for req in requirements:
        assert req.specifier.contains(metadata.version(req.name), prereleases=True), req
    declared = [Requirement(r) for r in metadata.requires("safe_norm") or [] if "extra ==" not in r]
    assert [str(r) for r in declared] == [str(r) for r in requirements if r.name == "torch"]
