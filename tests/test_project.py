"""The frame around the chapters: install files, README, CI, syllabus, public names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lokr_edu
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
