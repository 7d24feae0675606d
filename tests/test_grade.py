"""The grader: solutions get full marks, blank exercises zero, wrong answers partial marks with the
checks' own messages, and every kind of bad submission is reported in its student's rows while
the others are still graded.

One grading run of chapter 01 (four notebooks executed, one of them hitting the time limit) is
shared by the tests below; the rest need no kernel.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import nbformat
import pytest

from lokr_edu.course import repository_root
from lokr_edu.exercises import exercise_kinds
from lokr_edu.grade import (
    _has_check_line,
    identify_chapter,
    load_chapters,
    main,
    submissions,
)

REPO = Path(__file__).resolve().parent.parent
EXERCISES, SOLUTIONS = repository_root() / "exercises", repository_root() / "solutions"
CH01 = "01_kronecker_product"
TIMEOUT = 15  # seconds per cell: the setup cell imports torch; the infinite loop costs this much

CORRECT = {
    "1.1": """\
def my_kron(A, B):
    (m, n), (p, q) = A.shape, B.shape
    return (A[:, None, :, None] * B[None, :, None, :]).reshape(m * p, n * q)
""",
    "1.2": """\
def my_kron_singular_values(A, B):
    s = torch.outer(torch.linalg.svdvals(A), torch.linalg.svdvals(B)).flatten()
    return torch.sort(s, descending=True).values
""",
    "1.4": """\
def my_kron_matvec(A, B, x):
    (m, n), (p, q) = A.shape, B.shape
    return (A @ x.reshape(*x.shape[:-1], n, q) @ B.T).reshape(*x.shape[:-1], m * p)
""",
    "1.5": """\
def my_factorize(dim, factor=-1):
    if factor > 0 and dim % factor == 0:
        return (min(factor, dim // factor), max(factor, dim // factor))
    cap = dim if factor == -1 else factor
    p = max(d for d in range(1, cap + 1) if dim % d == 0 and d * d <= dim)
    return (p, dim // p)
""",
}
CHECK = {
    "1.1": "checks.check_kron(my_kron)",
    "1.2": "checks.check_kron_singular_values(my_kron_singular_values)",
    "1.3": "checks.check_numerical_rank(my_numerical_rank)",
    "1.4": "checks.check_kron_matvec(my_kron_matvec)",
    "1.5": "checks.check_factorize(my_factorize)",
}

# A student with three wrong answers, each the mistake its check names.
CAROL = {
    "1.1": """\
def my_kron(A, B):
    (m, n), (p, q) = A.shape, B.shape
    return (B[:, None, :, None] * A[None, :, None, :]).reshape(m * p, n * q)  # B ⊗ A

checks.check_kron(my_kron)""",
    "1.2": CORRECT["1.2"] + "\n" + CHECK["1.2"],
    "1.3": """\
def my_numerical_rank(M, rtol):
    s = torch.linalg.svdvals(M)
    return int((s >= rtol * s[0]).sum())  # ≥: the zero matrix gets full rank

checks.check_numerical_rank(my_numerical_rank)""",
    "1.4": CORRECT["1.4"] + "\n" + CHECK["1.4"],
    "1.5": CORRECT["1.5"].replace("return (p, dim // p)", "return (dim // p, p)")
    + "\n"
    + CHECK["1.5"],
}

# A student who breaks everything the grader must survive.
MALLORY = {
    "1.1": CORRECT["1.1"],  # right, but the check line is gone
    "1.2": "1 / 0\n" + CORRECT["1.2"] + "\n" + CHECK["1.2"],  # raises before defining
    "1.3": "while True:\n    pass",  # runs forever
    "1.4": 'checks.check_kron_matvec = lambda f: print("✓ all good")\n'  # a fake check ...
    + CORRECT["1.4"].replace("@ B.T", "@ B")  # ... hiding a wrong answer
    + "\n"
    + CHECK["1.4"],
    "1.5": "del checks\n" + CORRECT["1.5"] + "\n" + CHECK["1.5"],  # its own check cannot run
}


def _with_answers(answers: dict[str, str], extra: list[str] = ()) -> nbformat.NotebookNode:
    nb = nbformat.read(EXERCISES / f"{CH01}_exercises.ipynb", as_version=4)
    for cell in nb.cells:
        first = cell.source.splitlines()[0] if cell.source else ""
        for number, source in answers.items():
            if cell.cell_type == "code" and first.startswith(f"# Exercise {number}:"):
                cell.source = first + "\n" + source
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra]
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> tuple[dict[str, list[dict]], str]:
    """Grade one class folder once: {file name: rows}, and what the grader printed."""
    folder = tmp_path_factory.mktemp("class")
    shutil.copy(SOLUTIONS / f"{CH01}_solutions.ipynb", folder / "alice.ipynb")
    shutil.copy(EXERCISES / f"{CH01}_exercises.ipynb", folder / "bob.ipynb")
    nbformat.write(_with_answers(CAROL), folder / "carol.ipynb")
    nbformat.write(_with_answers(MALLORY, ["import os\nos._exit(1)"]), folder / "mallory.ipynb")
    (folder / "erin.txt").write_text("my answers: 1.1 is kron(A, B)\n")
    text = (EXERCISES / f"{CH01}_exercises.ipynb").read_text()
    (folder / "frank.ipynb").write_text(text[: len(text) // 2])  # truncated upload
    shutil.copy(EXERCISES / "02_peft_and_lora_exercises.ipynb", folder / "grace.ipynb")
    shutil.copy(REPO / "notebooks" / f"{CH01}.ipynb", folder / "heidi.ipynb")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "alice-checkpoint.ipynb").write_text("{}")

    out = folder.parent / "grades.csv"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [str(folder), "--chapter", "1", "--csv", str(out), "--timeout", str(TIMEOUT), "--quiet"]
        )
    assert code == 0, printed.getvalue()
    with out.open(newline="", encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    by_student: dict[str, list[dict]] = {}
    for row in table:
        by_student.setdefault(Path(row["student"]).name, []).append(row)
    return by_student, printed.getvalue()


N = len(exercise_kinds(SOLUTIONS / f"{CH01}_solutions.ipynb"))  # chapter 01's exercises


def _exercise_rows(rows: list[dict]) -> dict[str, dict]:
    return {r["exercise"].split(":")[0].split()[1]: r for r in rows if r["kind"] != "total"}


def _total(rows: list[dict]) -> dict:
    (total,) = [r for r in rows if r["kind"] == "total"]
    return total


def test_every_file_gets_rows_and_a_total_hidden_files_are_skipped(graded) -> None:
    by_student, printed = graded
    names = {"alice", "bob", "carol", "mallory", "erin", "frank", "grace", "heidi"}
    assert {Path(n).stem for n in by_student} == names
    for rows in by_student.values():
        assert list(rows[0]) == ["student", "exercise", "kind", "passed", "message"]
        assert rows[-1]["kind"] == "total"
    assert "STUDENT" in printed and "mallory.ipynb" in printed and "8 submissions" in printed


def test_solutions_get_full_marks_with_the_checks_messages(graded) -> None:
    rows = graded[0]["alice.ipynb"]
    assert _total(rows)["passed"] == f"{N}/{N}"
    for row in _exercise_rows(rows).values():
        assert (row["kind"], row["passed"]) == ("pass", "yes")
        assert row["message"].startswith("✓ ")
    assert "kron matches torch.kron" in _exercise_rows(rows)["1.1"]["message"]


def test_blank_exercises_get_zero_with_their_messages(graded) -> None:
    rows = graded[0]["bob.ipynb"]
    assert _total(rows)["passed"] == f"0/{N}"
    for number, row in _exercise_rows(rows).items():
        assert (row["kind"], row["passed"]) == ("blank", "no")
        assert row["message"].startswith(f"NotImplementedError: Exercise {number}:")
        assert "FLAGGED" not in row["message"]


def test_wrong_answers_get_partial_marks_with_the_checks_explanations(graded) -> None:
    rows = graded[0]["carol.ipynb"]
    assert _total(rows)["passed"] == f"2/{N}"
    got = _exercise_rows(rows)
    answered = ["wrong", "pass", "wrong", "pass", "wrong"]  # 1.1-1.5; the rest left blank
    assert [got[n]["kind"] for n in sorted(got)] == answered + ["blank"] * (N - 5)
    assert "kron computed B ⊗ A" in got["1.1"]["message"]
    assert "the zero matrix has rank 0" in got["1.3"]["message"]
    assert "return the smaller factor first" in got["1.5"]["message"]
    assert not any("FLAGGED" in r["message"] for r in rows)


def test_a_tampered_notebook_is_flagged_and_graded_by_the_graders_own_checks(graded) -> None:
    rows = graded[0]["mallory.ipynb"]
    got = _exercise_rows(rows)
    # the check line edited away: still graded (right), and flagged
    assert (got["1.1"]["kind"], got["1.1"]["passed"]) == ("pass", "yes")
    assert "FLAGGED" in got["1.1"]["message"] and "edited away" in got["1.1"]["message"]
    # a cell that raises before defining the function
    assert (got["1.2"]["kind"], got["1.2"]["passed"]) == ("error", "no")
    assert "not defined" in got["1.2"]["message"] and "ZeroDivisionError" in got["1.2"]["message"]
    # an infinite loop: interrupted at the time limit, and the rest of the notebook still runs
    assert (got["1.3"]["kind"], got["1.3"]["passed"]) == ("timeout", "no")
    assert f"within {TIMEOUT} s" in got["1.3"]["message"]
    # a replaced check printing ✓ does not hide a wrong answer
    assert (got["1.4"]["kind"], got["1.4"]["passed"]) == ("wrong", "no")
    assert "FLAGGED" in got["1.4"]["message"] and "replaced" in got["1.4"]["message"]
    assert "used B instead of Bᵀ" in got["1.4"]["message"]
    # `del checks`: the cell's own check line fails, the grader's passes, and it is flagged
    assert (got["1.5"]["kind"], got["1.5"]["passed"]) == ("pass", "yes")
    assert "FLAGGED" in got["1.5"]["message"] and "NameError" in got["1.5"]["message"]
    # the last cell kills the kernel: said in the total, the grades stand
    total = _total(rows)
    assert total["passed"] == f"2/{N}"
    # flagged: 1.1, 1.4, 1.5, and every later exercise, whose check line `del checks` broke
    assert f"{3 + N - 5} flagged" in total["message"] and "kernel died" in total["message"]


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("erin.txt", "invalid", "not a Jupyter notebook"),
        ("frank.ipynb", "invalid", "corrupt notebook"),
        ("grace.ipynb", "wrong-chapter", "chapter 02's notebook"),
        ("heidi.ipynb", "unknown-chapter", "not an exercise notebook"),
    ],
)
def test_each_bad_submission_is_reported_in_its_row(graded, name, kind, words) -> None:
    rows = graded[0][name]
    assert [r["kind"] for r in rows] == [kind, "total"]
    assert words in rows[0]["message"] and rows[0]["passed"] == "no"
    assert rows[1]["passed"] == f"0/{N}" and "not graded" in rows[1]["message"]


# --- no kernel needed --------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [EXERCISES, SOLUTIONS], ids=["exercises", "solutions"])
def test_every_course_notebook_is_identified_as_its_own_chapter(folder: Path) -> None:
    chapters = load_chapters()
    for path in sorted(folder.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        number, evidence = identify_chapter([(c.cell_type, c.source) for c in nb.cells], chapters)
        assert number == path.name[:2], (path.name, evidence)


def test_every_exercise_of_the_course_has_a_check_the_grader_can_call() -> None:
    chapters = load_chapters()
    assert sorted(chapters) == sorted(p.name[:2] for p in EXERCISES.glob("*.ipynb"))
    for chapter in chapters.values():
        assert len(chapter.exercises) >= 4
        for exercise in chapter.exercises:
            assert exercise.check_line == f"checks.{exercise.check}({exercise.argument})"


def test_check_line_edits_are_detected() -> None:
    (exercise, *_) = load_chapters()["01"].exercises
    body = CORRECT["1.1"]
    assert _has_check_line(exercise, body + "\ncheck = 1\nchecks.check_kron(my_kron)")
    assert not _has_check_line(exercise, body)
    assert not _has_check_line(exercise, body + "\n# checks.check_kron(my_kron)")
    assert not _has_check_line(
        exercise, body + "\ntry:\n    checks.check_kron(my_kron)\nexcept:\n 1"
    )
    assert not _has_check_line(exercise, body + "\nchecks.check_kron(torch.kron)")
    assert _has_check_line(exercise, "def my_kron(:\nchecks.check_kron(my_kron)")  # syntax error


def test_submissions_walk_folders_skip_hidden_files_and_the_csv(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ["a.ipynb", "b/c.ipynb", ".hidden.ipynb", "grades.csv"]:
        (tmp_path / name).write_text("{}")
    found = submissions([tmp_path, tmp_path / "a.ipynb"], skip=tmp_path / "grades.csv")
    assert [Path(name).relative_to(tmp_path).as_posix() for name, _ in found] == [
        "a.ipynb",
        "b/c.ipynb",
    ]
