"""Committed notebooks are complete and clean: what nbval compares must be a real, full run.

nbval itself (configured in pyproject.toml and tests/conftest.py) re-executes notebooks/ and
solutions/ and compares every output; these tests check what nbval does not.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from lokr_edu.course import KERNEL_METADATA

REPO = Path(__file__).resolve().parent.parent
EXECUTED = sorted((REPO / "notebooks").glob("*.ipynb")) + sorted(
    (REPO / "solutions").glob("*.ipynb")
)
ALLOWED_TAGS = {"nbval-ignore-output", "solution-only", "nbval-skip"}
SLIDE_TYPES = {"slide", "subslide", "fragment", "-", "skip", "notes"}  # tools/slides.py marks them


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What a student (or nbval) would trip over in a committed, executed notebook."""
    found, counts = [], []
    if nb.metadata != KERNEL_METADATA:
        found.append(f"notebook metadata is {dict(nb.metadata)}, expected only kernel + language")
    for index, cell in enumerate(nb.cells):
        tags = set(cell.metadata.get("tags", []))
        slideshow = cell.metadata.get("slideshow", {"slide_type": "-"})
        if (
            set(cell.metadata) - {"tags", "slideshow"}
            or tags - ALLOWED_TAGS
            or set(slideshow) != {"slide_type"}
            or slideshow["slide_type"] not in SLIDE_TYPES
        ):
            found.append(f"cell {index}: unexpected metadata {dict(cell.metadata)}")
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if cell.execution_count is None:
            found.append(f"cell {index}: not executed")
            continue
        counts.append(cell.execution_count)
        for output in cell.outputs:
            if output.output_type == "error":
                found.append(f"cell {index}: error output {output.ename}")
            if output.output_type == "stream" and output.name == "stderr":
                found.append(f"cell {index}: writes to stderr: {output.text[:80]!r}")
        if "nbval-ignore-output" in tags and "assert" not in cell.source:
            found.append(f"cell {index}: output ignored by nbval without an assertion to check it")
        if "nbval-skip" in tags:
            found.append(f"cell {index}: skipped by nbval")
    if counts != list(range(1, len(counts) + 1)):
        found.append(f"execution counts {counts} are not 1..{len(counts)}: run top to bottom")
    return found


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.name)
def test_committed_notebook_is_a_clean_full_run(path: Path) -> None:
    assert problems(nbformat.read(path, as_version=4)) == []


def _executed(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=KERNEL_METADATA)
    nb.cells = [nbformat.v4.new_code_cell(s, execution_count=i + 1) for i, s in enumerate(sources)]
    return nb


def test_problems_finds_each_kind_of_defect() -> None:
    assert problems(_executed("x = 1", "print(x)")) == []
    unexecuted = _executed("x = 1", "print(x)")
    unexecuted.cells[1].execution_count = None
    assert problems(unexecuted) == ["cell 1: not executed"]
    out_of_order = _executed("x = 1", "print(x)")
    out_of_order.cells[0].execution_count = 2
    out_of_order.cells[1].execution_count = 1
    assert "not 1..2" in problems(out_of_order)[0]
    errored = _executed("1 / 0")
    errored.cells[0].outputs = [
        nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="", traceback=[])
    ]
    assert problems(errored) == ["cell 0: error output ZeroDivisionError"]
    warned = _executed("import warnings")
    warned.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="UserWarning")]
    assert "writes to stderr" in problems(warned)[0]
    ignored = _executed("print(time.time())")
    ignored.cells[0].metadata["tags"] = ["nbval-ignore-output"]
    assert "without an assertion" in problems(ignored)[0]
    slides = _executed("x = 1")
    slides.cells[0].metadata["slideshow"] = {"slide_type": "fragment"}
    assert problems(slides) == []
    slides.cells[0].metadata["slideshow"] = {"slide_type": "fragmant"}
    assert "unexpected metadata" in problems(slides)[0]
    slides.cells[0].metadata = {"collapsed": True}
    assert "unexpected metadata" in problems(slides)[0]


@pytest.mark.parametrize("path", sorted((REPO / "exercises").glob("*.ipynb")), ids=lambda p: p.name)
def test_exercise_notebooks_ship_unexecuted(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is None and cell.outputs == []


def test_each_worker_and_each_notebook_kernel_uses_its_share_of_the_cores() -> None:
    """A worker runs cores ÷ workers threads (conftest); every notebook runs on one thread
    (setup_notebook's default, the count its committed outputs were made with: no notebook asks
    for more), which with one worker per core is its share; the kernels' BLAS/OpenMP too."""
    import os
    import re

    import torch
    from conftest import share_of_the_cores

    assert torch.get_num_threads() == share_of_the_cores() >= 1
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT") == str(os.cpu_count()):
        assert share_of_the_cores() == 1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    for path in EXECUTED:
        calls = re.findall(r"setup_notebook\(([^)]*)\)", path.read_text(encoding="utf-8"))
        threads = [re.search(r"threads\s*=\s*(\w+)", call) for call in calls]
        assert calls and all(t is None or t[1] == "1" for t in threads), path.name
