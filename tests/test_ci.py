"""The GitHub Actions workflows: ci.yml does what .ci/run does; latest.yml is weekly and opt-in.

They cannot run here; these tests pin what they say, so that an edit cannot drift from .ci/run
or the Makefile unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def workflow(name: str) -> tuple[dict, dict, list[dict]]:
    """(triggers, the one job, its steps). YAML 1.1 reads the key `on` as True."""
    document = yaml.safe_load((WORKFLOWS / name).read_text())
    (job,) = document["jobs"].values()
    return document[True], job, job["steps"]


def recipe(target: str) -> str:
    """The recipe lines of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    return text.split(f"\n{target}:")[1].split("\n\n")[0]


def test_ci_runs_ci_run_on_every_push_and_pull_request_with_two_pythons() -> None:
    triggers, job, steps = workflow("ci.yml")
    assert set(triggers) == {"push", "pull_request"}
    assert job["runs-on"] == "ubuntu-latest"
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    assert [step["run"] for step in steps if "run" in step] == [".ci/run"]
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"
    assert setup["with"]["cache"] == "pip"
    assert setup["with"]["cache-dependency-path"].split() == ["pyproject.toml", "constraints.txt"]
    assert job["env"] == {"PIP_EXTRA_INDEX_URL": CPU_INDEX}  # torch's CPU build, not CUDA's


def test_the_weekly_run_is_opt_in_and_installs_without_constraints() -> None:
    triggers, job, steps = workflow("latest.yml")
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    assert "vars.LOKR_EDU_LATEST == 'true'" in job["if"]
    assert job["env"] == {"PIP_EXTRA_INDEX_URL": CPU_INDEX}
    assert [s["run"] for s in steps if "run" in s][0] == "make test-latest TORCH=torch"
    latest = recipe("install-latest") + recipe("test-latest")
    assert "-e '.[dev]'" in latest and "constraints" not in latest
    assert "notebooks/*.ipynb solutions/*.ipynb" in latest
    assert "-c constraints.txt -e '.[dev]'" in recipe("$(INSTALLED)")  # the pinned install
