"""The exercise pipeline: exercises/ is generated from solutions/, and each exercise fails, alone,
with its NotImplementedError until the student fills it in."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lokr_edu.course import repository_root
from lokr_edu.exercises import (
    TITLE,
    build_notebook,
    exercise_kinds,
    exercise_path,
    exercise_title,
    main,
    stub_cell_source,
)

EXERCISES, SOLUTIONS = repository_root() / "exercises", repository_root() / "solutions"
SOLUTION_NOTEBOOKS = sorted(SOLUTIONS.glob("*_solutions.ipynb"))

EXERCISE_CELL = '''# Exercise 9.1: add two numbers
def add(a, b):
    """Return a + b."""
    # BEGIN SOLUTION
    total = a + b
    return total
    # END SOLUTION


check(add)'''


def test_stub_replaces_the_solution_block_at_its_indentation() -> None:
    assert stub_cell_source(EXERCISE_CELL) == (
        "# Exercise 9.1: add two numbers\n"
        "def add(a, b):\n"
        '    """Return a + b."""\n'
        '    raise NotImplementedError("Exercise 9.1: add two numbers (replace this line)")\n'
        "\n\ncheck(add)"
    )


def test_malformed_exercise_cells_are_refused() -> None:
    with pytest.raises(ValueError, match="must start with '# Exercise N.M: title'"):
        exercise_title("x = 1\n# BEGIN SOLUTION\nx = 2\n# END SOLUTION")
    with pytest.raises(ValueError, match="without # END SOLUTION"):
        stub_cell_source("# Exercise 1.1: t\n# BEGIN SOLUTION\nx = 2")
    with pytest.raises(ValueError, match="without # BEGIN SOLUTION"):
        stub_cell_source("# Exercise 1.1: t\n# END SOLUTION\n# BEGIN SOLUTION\n")
    with pytest.raises(ValueError, match="_solutions.ipynb"):
        exercise_path(Path("solutions/01_kron.ipynb"))


def test_build_drops_solution_only_cells_and_outputs() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("intro"),
        nbformat.v4.new_markdown_cell("solution remark", metadata={"tags": ["solution-only"]}),
        nbformat.v4.new_code_cell(EXERCISE_CELL, execution_count=3),
    ]
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="✓ add\n")]
    built = build_notebook(nb)
    assert [c.source for c in built.cells][:1] == ["intro"] and len(built.cells) == 2
    assert built.cells[1].outputs == [] and built.cells[1].execution_count is None
    assert "total = a + b" not in built.cells[1].source
    assert nb.cells[2].outputs, "the solution notebook itself is not modified"


def test_committed_exercises_are_exactly_what_the_builder_writes(capsys) -> None:
    assert SOLUTION_NOTEBOOKS, "no solution notebooks found"
    assert main(["check"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("solution", SOLUTION_NOTEBOOKS, ids=lambda p: p.stem)
def test_each_solution_has_at_least_four_exercises(solution: Path) -> None:
    nb = nbformat.read(solution, as_version=4)
    titles = [exercise_title(c.source) for c in nb.cells if c.cell_type == "code"]
    titles = [t for t in titles if t]
    assert len(titles) >= 4, titles
    assert len(set(titles)) == len(titles), "exercise numbers must be unique"
    for cell in nb.cells:
        if cell.cell_type == "code" and exercise_title(cell.source):
            assert "checks.check_" in cell.source, f"{exercise_title(cell.source)} calls no check"


# chapters whose exercises teach beyond re-implementing: ≥ 5 exercises, ≥ 3 not "implement"
BEYOND_IMPLEMENT = ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("solution", SOLUTION_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_heading_states_kind_difficulty_and_time(solution: Path) -> None:
    nb = nbformat.read(solution, as_version=4)
    titles = [exercise_title(c.source) for c in nb.cells if c.cell_type == "code"]
    titles = [t.split(":")[0] for t in titles if t]
    kinds = exercise_kinds(solution)
    assert list(kinds) == titles, "each exercise needs a heading '## Exercise N.M — kind ★ (N min)'"
    if solution.name[:2] in BEYOND_IMPLEMENT:
        assert len(kinds) >= 5, kinds
        assert sum(kind != "implement" for kind in kinds.values()) >= 3, kinds


@pytest.mark.parametrize("solution", SOLUTION_NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_notebook_as_shipped_fails_exactly_at_its_exercises(solution: Path) -> None:
    path = exercise_path(solution)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(EXERCISES)}},
    ).execute()
    failed = {}
    for index, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        if errors:
            failed[index] = (errors[0].ename, errors[0].evalue)
    expected = {
        index: "{}: {}".format(*TITLE.match(cell.source.splitlines()[0]).groups())
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and 'raise NotImplementedError("Exercise' in cell.source
    }
    assert set(failed) == set(expected), f"failed cells {failed}, exercise cells {expected}"
    for index, title in expected.items():
        ename, evalue = failed[index]
        assert ename == "NotImplementedError" and evalue.startswith(title), (ename, evalue)
