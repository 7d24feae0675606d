"""The exercise pipeline: exercises/ is generated from solutions/, and each exercise fails, alone,
with its NotImplementedError until the student fills it in; what a student sees when a check
fails (one line, no frame of the checks' own code; their own lines when their code crashes)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell
from nbclient import NotebookClient
from traitlets.config import Config

from lokr_edu.checks import CheckError
from lokr_edu.checks.common import brief_blank_exercises, not_answered, prediction_pair
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
        # what the student sees: no frame of the checks' code; through a check, one line
        (error,) = [o for o in nb.cells[index].outputs if o.output_type == "error"]
        lines = [ANSI.sub("", line) for line in error.traceback]
        assert not any(CHECKS_CODE in line for line in lines), (
            f"{title}: the student sees the checks' frames; the check must call the student's "
            "function through common.call_student, and raise common.not_answered(...) for a "
            "blank answer",
            lines,
        )
        # one line, whether a check ran the stub or the cell's own line raised it
        # (setup_notebook's brief_blank_exercises)
        assert lines == [f"✗ not done yet: {evalue}"], (title, lines)


# --- what a student sees -------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHECKS_CODE = "lokr_edu/checks"  # the checks' own files: never in what the student sees
BLANK_KRON = """def my_kron(A, B):
    raise NotImplementedError("Exercise 1.1: the Kronecker product (replace this line)")


checks.check_kron(my_kron)"""


@pytest.fixture(scope="module")
def shell():
    """An IPython shell, as a notebook's kernel runs cells (no colours, history in memory)."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ipython = InteractiveShell.instance(config=config, colors="nocolor")
    assert ipython.run_cell("import torch\nfrom lokr_edu import checks").success
    yield ipython
    InteractiveShell.clear_instance()


def shown(shell: InteractiveShell, capsys, source: str) -> tuple[BaseException, list[str]]:
    """Run a cell that fails; return its error and the lines IPython printed for it."""
    capsys.readouterr()
    result = shell.run_cell(source)
    assert not result.success, "the cell was expected to fail"
    text = ANSI.sub("", capsys.readouterr().out)
    return result.error_in_exec, [line for line in text.splitlines() if line.strip()]


def test_a_blank_exercise_is_one_line_through_the_check(shell, capsys) -> None:
    error, lines = shown(shell, capsys, BLANK_KRON)
    assert type(error) is NotImplementedError  # what graders and tests read is unchanged
    assert lines == ["✗ not done yet: Exercise 1.1: the Kronecker product (replace this line)"]


def test_an_answer_left_as_none_is_one_line(shell, capsys) -> None:
    source = (
        "def check(value):\n"
        "    if value is None:\n"
        "        raise not_answered('Exercise 9.1: predict (write your prediction)')\n"
        "check(None)"
    )
    shell.user_ns["not_answered"] = not_answered
    error, lines = shown(shell, capsys, source)
    assert type(error) is NotImplementedError
    assert lines == ["✗ not done yet: Exercise 9.1: predict (write your prediction)"]


def test_a_wrong_answer_is_one_line_naming_the_mistake(shell, capsys) -> None:
    source = (
        "def my_kron(A, B):\n"
        "    return torch.zeros(A.shape[0] * B.shape[0], A.shape[1] * B.shape[1],"
        " dtype=A.dtype)\n"
        "checks.check_kron(my_kron)"
    )
    error, lines = shown(shell, capsys, source)
    assert isinstance(error, CheckError)
    assert len(lines) == 1 and lines[0].startswith("✗ kron is wrong for A 2×3 and B 3×4"), lines
    assert lines[0] == f"✗ {error}"


def test_a_wrong_shape_raised_by_a_shared_helper_is_one_line(shell, capsys) -> None:
    source = "def my_kron(A, B):\n    return A\nchecks.check_kron(my_kron)"
    error, lines = shown(shell, capsys, source)
    assert isinstance(error, CheckError)
    assert lines == [f"✗ {error}"] and "returned shape (2, 3)" in lines[0]


def test_a_crash_in_the_students_code_shows_their_lines_and_no_checks_frame(shell, capsys) -> None:
    source = (
        "def my_kron(A, B):\n"
        "    blocks = A.shape[0]\n"
        "    return helper(A, B)\n"
        "def helper(A, B):\n"
        "    return A + 'x'\n"
        "checks.check_kron(my_kron)"
    )
    error, lines = shown(shell, capsys, source)
    assert isinstance(error, CheckError) and isinstance(error.__cause__, TypeError)
    text = "\n".join(lines)
    assert CHECKS_CODE not in text and "call_student" not in text, text
    assert "in my_kron(A, B)" in text and "in helper(A, B)" in text, text
    assert "---->" in text and "return A + 'x'" in text, text  # the student's failing line
    assert lines[-2].startswith("TypeError: unsupported operand")
    assert lines[-1].startswith("✗ kron raised TypeError for A 2×3 and B 3×4: unsupported")


def test_another_not_implemented_error_in_the_students_code_shows_their_lines(
    shell, capsys
) -> None:
    source = (
        "def my_kron(A, B):\n"
        "    raise NotImplementedError('this dtype is not supported')\n"
        "checks.check_kron(my_kron)"
    )
    error, lines = shown(shell, capsys, source)
    assert type(error) is NotImplementedError
    text = "\n".join(lines)
    assert CHECKS_CODE not in text and "in my_kron(A, B)" in text, text
    assert lines[-1] == "NotImplementedError: this dtype is not supported"


def test_an_error_outside_the_checks_keeps_ipythons_traceback(shell, capsys) -> None:
    error, lines = shown(shell, capsys, "def f():\n    return 1 / 0\nf()")
    assert isinstance(error, ZeroDivisionError)
    text = "\n".join(lines)
    assert "Traceback (most recent call last)" in text and "in f()" in text, text


# --- predictions written as a pair -------------------------------------------------------------


def is_bool(value: object) -> bool:
    return isinstance(value, bool)


@pytest.mark.parametrize("pair", [(True, False), [True, False]], ids=["tuple", "list"])
def test_a_prediction_pair_is_a_tuple_or_a_list(pair) -> None:
    assert prediction_pair(pair, is_bool, "two booleans, (a, b)") == (True, False)


@pytest.mark.parametrize("wrong", [(True,), [True, False, True], ("yes", "no"), True, None])
def test_anything_else_is_not_a_prediction_pair(wrong) -> None:
    with pytest.raises(CheckError, match=r"write your prediction as two booleans, \(a, b\), got"):
        prediction_pair(wrong, is_bool, "two booleans, (a, b)")


def test_a_blank_raised_at_the_cells_top_level_is_one_line(shell, capsys) -> None:
    """A `prediction = ...` exercise raises its stub before any check runs: one line too, once
    setup_notebook (here its part, brief_blank_exercises) has run in the kernel."""
    stub = 'raise NotImplementedError("Exercise 4.7: predict η (replace this line)")'
    error, lines = shown(shell, capsys, stub)
    assert len(lines) > 1  # IPython's traceback of the cell, before the handler
    brief_blank_exercises(shell)
    try:
        error, lines = shown(shell, capsys, stub)
        assert type(error) is NotImplementedError
        assert lines == ["✗ not done yet: Exercise 4.7: predict η (replace this line)"]
        # any other NotImplementedError keeps its traceback
        error, lines = shown(shell, capsys, "raise NotImplementedError('not this dtype')")
        assert len(lines) > 1 and lines[-1] == "NotImplementedError: not this dtype", lines
    finally:
        shell.set_custom_exc((), None)
