"""The frame around the chapters: install files, README, CI, syllabus, public names."""

from __future__ import annotations

import ast
import datetime
import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lokr_edu
from lokr_edu import syllabus
from lokr_edu.syllabus import CHAPTERS, markdown_table

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_names() -> set[str]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] + [
        r for rs in project["optional-dependencies"].values() for r in rs
    ]
    return {Requirement(line).name.lower() for line in lines}


def test_environment_yml_names_no_package_that_pyproject_does_not() -> None:
    conda, pip = [], []
    section = conda
    for raw in (REPO / "environment.yml").read_text().splitlines():
        line = raw.split("#")[0].rstrip()
        if re.match(r"^\s*- pip:\s*$", line):
            section = pip
        elif re.match(r"^\s+- ", line) and line.strip() != "- conda-forge":
            section.append(line.strip()[2:].strip())
    assert conda == ["python=3.11", "pip"]  # Python itself and its installer, nothing else
    assert pip == ["-e .[dev]"]
    for entry in pip:
        if not entry.startswith("-e"):
            assert Requirement(entry).name.lower() in _pyproject_names()


def test_torch_is_pinned_to_the_cpu_build_for_installs() -> None:
    pins = [
        line
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith("torch")
    ]
    assert pins == ["torch==2.13.0"]
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    torch_requirement = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")
    )
    assert str(torch_requirement.specifier).startswith(">="), "users elsewhere get a lower bound"


def test_dev_extra_has_the_tools_and_the_reference_libraries() -> None:
    dev = {Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"jupyterlab", "nbval", "pytest", "peft", "lycoris-lora"} <= dev


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("```")[1]
    assert quick_start.split() == ["make", "course", "make", "test"]


def test_readme_syllabus_is_the_package_syllabus() -> None:
    assert markdown_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c.ready], ids=lambda c: c.number)
def test_ready_chapters_have_their_files(chapter) -> None:
    assert (REPO / chapter.notebook).exists()
    for module in chapter.modules:
        assert (REPO / module).exists(), module
    if chapter.exercises:
        assert (REPO / chapter.exercises).exists()
        solution = chapter.exercises.replace("exercises", "solutions")
        assert (REPO / solution).exists()


def _typed_times(source: str) -> list[str]:
    """The times typed into a module: every number in its code (a `Chapter(..., 12, ...)`
    argument, `seconds=12`), and every number with a unit of time in its text or comments."""
    numbers = [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float)
    ]
    unit = r"\b\d+(?:\.\d+)?\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b"
    texts = [
        f"line {n}: {match.group()}"
        for n, line in enumerate(source.splitlines(), 1)
        for match in re.finditer(unit, line)
    ]
    return numbers + texts


def test_no_time_is_typed_into_the_syllabus() -> None:
    """Chapter times come from the results file `make course` writes, never from the code."""
    assert _typed_times('Chapter("01", "t", "n", (), "CPU", 12, None)') == ["line 1: 12"]
    assert _typed_times("x = f(minutes=2.5)  # about 3 s") == ["line 1: 2.5", "line 1: 3 s"]
    assert _typed_times('"""runs in ~12 s"""') == ["line 1: 12 s"]
    assert _typed_times(Path(syllabus.__file__).read_text()) == []


def test_the_syllabus_times_are_the_results_files() -> None:
    """Every ready chapter's time is its entry in lokr_edu/data/chapter_times.json, which the
    package installs; each entry says when and on what it was measured, and names a chapter."""
    path = REPO / "lokr_edu" / "data" / "chapter_times.json"
    assert syllabus.TIMES_FILE == path
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lokr_edu"]
    assert any(fnmatch.fnmatch("data/chapter_times.json", p) for p in patterns)
    entries = json.loads(path.read_text())["chapters"]
    assert {c.notebook: c.cpu_seconds for c in CHAPTERS if c.ready} == {
        notebook: entry["seconds"] for notebook, entry in entries.items()
    }
    for entry in entries.values():
        assert set(entry) == {"seconds", "date", "cores", "torch_threads", "torch"}
        assert isinstance(entry["seconds"], int) and entry["seconds"] >= 0
        datetime.date.fromisoformat(entry["date"])
        assert entry["cores"] >= 1 and entry["torch_threads"] >= 1


def test_every_lecture_notebook_is_in_the_syllabus() -> None:
    listed = {c.notebook for c in CHAPTERS if c.ready}
    on_disk = {f"notebooks/{p.name}" for p in (REPO / "notebooks").glob("*.ipynb")}
    assert on_disk == listed


def test_version_is_consistent() -> None:
    assert lokr_edu.__version__ == PYPROJECT["project"]["version"]
    assert f"## {lokr_edu.__version__}" in (REPO / "CHANGELOG.md").read_text()


def test_public_names() -> None:
    for name in ["kron", "factorize"]:
        assert callable(getattr(lokr_edu, name)), name


def test_contributing_names_only_what_exists() -> None:
    """CONTRIBUTING.md's checklist points at tests, tools and make targets: each must exist."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    for path in set(re.findall(r"`((?:tests|tools|lokr_edu)/[\w/.]+\.py)`", text)):
        if "NN" not in path and "<module>" not in path:  # templates, not files
            assert (REPO / path).exists(), path
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    for target in set(re.findall(r"`make ([\w-]+)`", text)):
        assert target in targets, f"make {target}"
