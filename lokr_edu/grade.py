"""Grade a class's exercise notebooks: one command, a table on screen and a CSV.

    python -m lokr_edu.grade submissions/ --chapter 01          # a folder, one notebook per student
    python -m lokr_edu.grade alice.ipynb bob.ipynb --csv ch01.csv --timeout 120
    lokr-edu-grade exercises/ solutions/                       # each notebook against its chapter

Each submission runs top to bottom in a fresh kernel of this environment, with a time limit per
cell. The chapter is found from the notebook itself (its `# Exercise N.M` cells, its heading and
the checks it calls), matched against the course's exercise notebooks. After each exercise's cell
the grader runs that exercise's check itself, from a freshly reloaded `lokr_edu.checks`, so a
student who deleted, edited or replaced the check line is still graded, and flagged.

Every exercise gets one row: student (file), exercise, kind, passed, message. Kinds:

    pass     the check passed; the message is the check's own ✓ line
    wrong    the check found a wrong answer; the message is the check's own explanation
    blank    not done: the exercise's `raise NotImplementedError(...)` is still there
    error    the cell or the student's function raised another error, or the function is not defined
    timeout  the cell, or the check calling the student's function, ran past the time limit
    missing  no cell for the exercise and nothing the check could call
    not-run  the kernel died (exit(), out of memory) before the exercise was graded

A message starting with FLAGGED says the notebook was tampered with (check line edited away, the
`checks` module deleted or a check replaced): the grade comes from the grader's own check. A
submission that cannot be graded gets one row: `invalid` (not a notebook, corrupt), `wrong-chapter`
(with --chapter) or `unknown-chapter`. Each student ends with a `total` row, e.g. passed = 3/5.
Other students are graded whatever one submission does.

Grading runs the students' code as you: for a class you do not trust, run it in a container.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from lokr_edu.course import KERNEL_METADATA, NotACheckoutError, repository_root

MAX_BYTES = 20 * 1024 * 1024
FIELDS = ["student", "exercise", "kind", "passed", "message"]
KINDS = ("pass", "wrong", "blank", "error", "timeout", "missing", "not-run")
SUBMISSION_KINDS = ("invalid", "wrong-chapter", "unknown-chapter")
HEADING = re.compile(r"^#\s*Chapter\s+(\d+)\s+exercises\b", re.IGNORECASE)
EXERCISE_LINE = re.compile(r"^#\s*Exercise\s+(\d+)\.(\d+)\b", re.IGNORECASE)

__all__ = [
    "Exercise",
    "Chapter",
    "Row",
    "Report",
    "load_chapters",
    "identify_chapter",
    "grade_file",
    "grade",
    "submissions",
    "write_csv",
    "format_table",
    "main",
]


@dataclass(frozen=True)
class Exercise:
    number: str  # "1.1"
    title: str  # "Exercise 1.1: the Kronecker product"
    check: str  # "check_kron"
    argument: str  # "my_kron" (or "A, B"): what the check is called on
    check_line: str  # "checks.check_kron(my_kron)"
    defines: tuple[str, ...]  # names the exercise cell defines at top level


@dataclass(frozen=True)
class Chapter:
    number: str  # "01"
    heading: str  # "Chapter 01 exercises — the Kronecker product"
    path: Path
    exercises: tuple[Exercise, ...]
    module: str  # "lokr_edu.checks.ch01"


@dataclass
class Row:
    student: str
    exercise: str
    kind: str
    passed: str  # "yes" / "no" for an exercise, "3/5" for a total
    message: str


@dataclass
class Report:
    student: str
    chapter: Chapter | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> int:
        return sum(row.passed == "yes" for row in self.rows if row.kind in KINDS)

    @property
    def out_of(self) -> int:
        return len(self.chapter.exercises) if self.chapter else 0

    def total(self) -> Row:
        flagged = sum(row.message.startswith("FLAGGED") for row in self.rows)
        if any(row.kind in SUBMISSION_KINDS for row in self.rows):
            message = "not graded"
        else:
            message = f"{self.score} of {self.out_of} exercises passed"
        if self.chapter:
            message += f" (chapter {self.chapter.number})"
        if flagged:
            message += f"; {flagged} flagged"
        message = "; ".join([message, *self.notes])
        return Row(self.student, "total", "total", f"{self.score}/{self.out_of}", message)


# --- the course's exercises ------------------------------------------------------------------


def _check_call(source: str) -> tuple[str, str, str] | None:
    """('check_kron', 'my_kron', 'checks.check_kron(my_kron)') for the cell's top-level check;
    a check of several arguments gives them as one expression, ('check_rank_loss', 'A, B', ...)."""
    for node in ast.parse(source).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "checks"
            and call.func.attr.startswith("check_")
            and call.args
            and not call.keywords
        ):
            arguments = ", ".join(ast.unparse(a) for a in call.args)
            return call.func.attr, arguments, ast.unparse(call)
    return None


def _defined_names(source: str) -> tuple[str, ...]:
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
    return tuple(names)


def load_chapters(folder: Path | None = None) -> dict[str, Chapter]:
    """The course's exercise notebooks (built from solutions/), keyed by chapter: {'01': ...}.

    folder: default exercises/ of this checkout (`lokr_edu.course.repository_root`)."""
    from lokr_edu import checks
    from lokr_edu.exercises import TITLE

    folder = Path(folder) if folder is not None else repository_root() / "exercises"
    chapters = {}
    for path in sorted(folder.glob("[0-9][0-9]_*_exercises.ipynb")):
        nb = nbformat.read(path, as_version=4)
        number = path.name[:2]
        heading = next(
            (c.source.splitlines()[0].lstrip("# ").strip() for c in nb.cells if c.source.strip()),
            "",
        )
        exercises, modules = [], set()
        for cell in nb.cells:
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            match = TITLE.match(cell.source.splitlines()[0])
            if match is None:
                continue
            found = _check_call(cell.source)
            if found is None:
                raise ValueError(f"{path.name}: {match.group(1)} has no checks.check_…(…) line")
            check, argument, line = found
            modules.add(getattr(checks, check).__module__)
            exercises.append(
                Exercise(
                    number=match.group(1).split()[1],
                    title=f"{match.group(1)}: {match.group(2)}",
                    check=check,
                    argument=argument,
                    check_line=line,
                    defines=_defined_names(cell.source),
                )
            )
        if len(modules) != 1:
            raise ValueError(f"{path.name}: checks from {sorted(modules)}, expected one module")
        chapters[number] = Chapter(number, heading, path, tuple(exercises), modules.pop())
    if not chapters:
        raise FileNotFoundError(
            f"no exercise notebooks in {folder}: pass --exercises path/to/lokr-edu/exercises"
        )
    return chapters


# --- reading a submission ----------------------------------------------------------------------


class InvalidSubmission(Exception):
    """The file cannot be graded; the message says why, for the student's row."""


def _read_notebook(path: Path) -> list[tuple[str, str]]:
    """The notebook's cells as (cell_type, source); InvalidSubmission if it is not a notebook."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InvalidSubmission(f"cannot read the file: {error.strerror or error}") from error
    if size > MAX_BYTES:
        raise InvalidSubmission(f"not graded: {size / 2**20:.0f} MiB is too large for a notebook")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InvalidSubmission(f"cannot read the file: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise InvalidSubmission("not a Jupyter notebook: the file is not text (binary?)") from error
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        if path.suffix != ".ipynb":
            raise InvalidSubmission(
                f"not a Jupyter notebook: a {path.suffix or 'file without extension'} "
                "that is not notebook JSON"
            ) from error
        raise InvalidSubmission(
            f"a corrupt notebook: invalid JSON at line {error.lineno} column {error.colno} "
            f"({error.msg}); was it truncated or edited by hand?"
        ) from error
    if not isinstance(raw, dict) or "cells" not in raw and "worksheets" not in raw:
        raise InvalidSubmission("not a Jupyter notebook: JSON without notebook cells")
    try:
        nb = nbformat.reads(text, as_version=4)
        cells = [(str(c["cell_type"]), _source(c.get("source", ""))) for c in nb["cells"]]
    except Exception as error:  # nbformat raises many kinds on damaged files
        raise InvalidSubmission(
            f"a corrupt notebook: {type(error).__name__}: {str(error)[:200]}"
        ) from error
    return cells


def _source(source: object) -> str:
    if isinstance(source, list) and all(isinstance(s, str) for s in source):
        return "".join(source)
    if not isinstance(source, str):
        raise TypeError(f"a cell's source is {type(source).__name__}, not text")
    return source


def _first_line(source: str) -> str:
    return next((line.strip() for line in source.splitlines() if line.strip()), "")


def identify_chapter(
    cells: Sequence[tuple[str, str]], chapters: dict[str, Chapter]
) -> tuple[str | None, str]:
    """The chapter a notebook belongs to, from its own cells, and the evidence for it."""
    votes: Counter[str] = Counter()
    calls = {e.check: number for number, c in chapters.items() for e in c.exercises}
    for cell_type, source in cells:
        first = _first_line(source)
        if cell_type == "markdown" and (match := HEADING.match(first)):
            votes[match.group(1).zfill(2)] += 2
        if cell_type == "code":
            if match := EXERCISE_LINE.match(first):
                votes[match.group(1).zfill(2)] += 1
            for check in set(re.findall(r"\bchecks\.(check_\w+)", source)):
                if check in calls:
                    votes[calls[check]] += 1
    votes = Counter({number: n for number, n in votes.items() if number in chapters})
    if not votes:
        return None, "no exercise of this course in the notebook"
    (best, n), *rest = votes.most_common()
    evidence = f"chapter {best} ({n} matching headings, exercise cells and checks)"
    if rest and rest[0][1] == n:
        return None, f"cells of chapters {best} and {rest[0][0]} in equal number"
    return best, evidence


def _find_cell(exercise: Exercise, cells: Sequence[tuple[str, str]]) -> int | None:
    """Index of the student's cell for the exercise: its title line, else its definition."""
    by_title, by_definition = None, None
    for index, (cell_type, source) in enumerate(cells):
        if cell_type != "code":
            continue
        match = EXERCISE_LINE.match(_first_line(source))
        if match and f"{match.group(1)}.{match.group(2)}" == exercise.number:
            by_title = index
        elif any(re.search(rf"\b(def|class)\s+{name}\b", source) for name in exercise.defines):
            by_definition = index
    return by_title if by_title is not None else by_definition


def _has_check_line(exercise: Exercise, source: str) -> bool:
    """Does the cell still call its check at top level, as the exercise notebook does?"""
    try:
        found = _check_call(source)
    except SyntaxError:
        return any(line.strip() == exercise.check_line for line in source.splitlines())
    return found is not None and found[2] == exercise.check_line


# --- running a submission ----------------------------------------------------------------------

_GRADER_CELL = """\
def __lokr_edu_grade(namespace):
    import contextlib, importlib, io, json, sys
    result = {{"flags": []}}
    try:
        import lokr_edu.checks
        package = sys.modules["lokr_edu.checks"]
        if namespace.get("checks") is not package:
            result["flags"].append(
                "the notebook's `checks` is not lokr_edu.checks (deleted or replaced)"
            )
        original = sys.modules.get({module!r})
        function = getattr(package, {check!r}, None)
        if (
            function is None
            or function is not getattr(original, {check!r}, None)
            or getattr(getattr(function, "__code__", None), "co_filename", None)
            != getattr(original, "__file__", None)
        ):
            result["flags"].append("checks.{check} was deleted or replaced")
        common = importlib.reload(importlib.import_module("lokr_edu.checks.common"))
        fresh = importlib.reload(importlib.import_module({module!r}))
        for name in common.__all__:  # checks.CheckError is the class the fresh checks raise
            if hasattr(package, name):
                setattr(package, name, getattr(common, name))
        for name in fresh.__all__:
            setattr(package, name, getattr(fresh, name))
        check = getattr(fresh, {check!r})
        try:
            arguments = eval("(" + {argument!r} + ",)", namespace)
        except NameError as error:
            result.update(status="undefined", ename="NameError", message=str(error))
        else:
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                    check(*arguments)
            except BaseException as error:
                names = {{c.__name__ for c in type(error).__mro__}}
                result.update(
                    status="raised",
                    ename=type(error).__name__,
                    message=str(error),
                    check_error="CheckError" in names,
                )
            else:
                lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
                marks = [line for line in lines if line.startswith("\\u2713")]
                result.update(status="passed", message=(marks or lines or ["passed"])[-1])
    except BaseException as error:
        result.update(status="grader", ename=type(error).__name__, message=str(error))
    with open({path!r}, "w", encoding="utf-8") as file:
        json.dump(result, file)


__lokr_edu_grade(globals())
del __lokr_edu_grade
"""


def _grader_source(exercise: Exercise, chapter: Chapter, path: Path) -> str:
    return _GRADER_CELL.format(
        module=chapter.module, check=exercise.check, argument=exercise.argument, path=str(path)
    )


@dataclass
class _Run:
    """What happened to one cell of the run: its error, a timeout, or a dead kernel."""

    error: tuple[str, str] | None = None
    timeout: bool = False
    dead: bool = False


def _error_of(cell: nbformat.NotebookNode) -> tuple[str, str] | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return str(output.get("ename", "")), str(output.get("evalue", ""))[:500]
    return None


def _execute(sources: list[str], workdir: Path, timeout: int) -> list[_Run]:
    """Run the cells in order in one fresh kernel.

    A cell past the time limit is interrupted (KeyboardInterrupt) and the run goes on; a cell
    that is still running one time limit after the interrupt ends the run (the kernel hung).
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbclient.util import ensure_async

    class Client(NotebookClient):
        """Interrupts a cell at the time limit, and gives up on it at the second."""

        async def _async_handle_timeout(self, timeout, cell=None):  # noqa: ANN001
            if id(cell) in self.interrupted:
                raise CellTimeoutError.error_from_timeout_and_cell(
                    "Cell execution timed out", timeout, cell
                )
            self.interrupted.add(id(cell))
            await ensure_async(self.km.interrupt_kernel())
            return None

    nb = nbformat.v4.new_notebook(metadata=KERNEL_METADATA)
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    client = Client(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        shutdown_kernel="immediate",
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.interrupted = set()
    runs = [_Run() for _ in sources]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    with client.setup_kernel(env=env, stderr=subprocess.DEVNULL):
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
                runs[index].error = _error_of(cell)
                runs[index].timeout = id(cell) in client.interrupted
            except (CellTimeoutError, DeadKernelError) as error:
                runs[index].timeout = isinstance(error, CellTimeoutError)
                for later in runs[index:]:
                    later.dead = True
                break
    return runs


def _row_for(
    student: str,
    exercise: Exercise,
    cell_index: int | None,
    cell: _Run | None,
    grader: _Run,
    result: dict | None,
    flags: list[str],
    timeout: int,
) -> Row:
    """Turn what the student's cell and the grader's check did into the exercise's row."""
    where = f"cell {cell_index + 1}" if cell_index is not None else "no cell"
    if cell is not None and cell.timeout:
        stopped = "could not be stopped" if cell.dead else "was interrupted"
        kind, passed, message = (
            "timeout",
            False,
            f"{where} did not finish within {timeout} s (an infinite loop?) and {stopped}",
        )
    elif cell is not None and cell.dead or grader.dead:
        kind, passed, message = (
            "not-run",
            False,
            "not graded: the kernel died or hung before this exercise was checked",
        )
    elif grader.timeout:
        kind, passed, message = (
            "timeout",
            False,
            f"the check calling {exercise.argument} did not finish within {timeout} s "
            "(an infinite loop?)",
        )
    elif result is None:
        kind, passed, message = "error", False, "the grader's check did not report a result"
    else:
        flags = [*flags, *result.get("flags", [])]
        status, ename, text = result.get("status"), result.get("ename", ""), result.get("message")
        cell_error = cell.error if cell is not None else None
        if status == "passed":
            kind, passed, message = "pass", True, text
        elif status == "raised" and ename == "NotImplementedError":
            kind, passed, message = "blank", False, f"NotImplementedError: {text}"
        elif status == "raised" and ename == "KeyboardInterrupt":
            kind, passed, message = "timeout", False, "the check was interrupted"
        elif status == "raised" and result.get("check_error"):
            kind, passed, message = "wrong", False, text
        elif status == "raised":
            kind, passed, message = "error", False, f"the check raised {ename}: {text}"
        elif status == "undefined" and cell_index is None:
            flags = [f for f in flags if not f.startswith("no cell")]
            kind, passed, message = "missing", False, f"no cell for {exercise.title} ({text})"
        elif status == "undefined" and cell_error and cell_error[0] == "NotImplementedError":
            kind, passed, message = "blank", False, f"NotImplementedError: {cell_error[1]}"
        elif status == "undefined":
            kind, passed, message = "error", False, f"{exercise.argument} is not defined"
        else:
            kind, passed, message = "error", False, f"the grader failed: {ename}: {text}"
        if cell_error and not (
            cell_error[0] in ("NotImplementedError", "CheckError") or kind == "blank"
        ):
            message += f" ({where} raised {cell_error[0]}: {cell_error[1]})"
        if flags:
            message = (
                "FLAGGED: " + "; ".join(flags) + ". Graded with the grader's check: " + message
            )
    message = " ".join(str(message).split())[:1000]
    return Row(student, exercise.title, kind, "yes" if passed else "no", message)


def grade_file(
    path: Path,
    chapters: dict[str, Chapter],
    *,
    student: str | None = None,
    expected: str | None = None,
    timeout: int = 60,
) -> Report:
    """Grade one submission; never raises for anything the file contains."""
    student = student or str(path)
    start = time.perf_counter()
    try:
        cells = _read_notebook(path)
    except InvalidSubmission as error:
        report = Report(student, chapters.get(expected) if expected else None)
        report.rows.append(Row(student, "(submission)", "invalid", "no", str(error)))
        return report
    number, evidence = identify_chapter(cells, chapters)
    if number is None:
        report = Report(student, chapters.get(expected) if expected else None)
        message = f"not an exercise notebook of this course: {evidence}"
        report.rows.append(Row(student, "(submission)", "unknown-chapter", "no", message))
        return report
    if expected and number != expected:
        report = Report(student, chapters[expected])
        message = (
            f"this is {evidence.split(' (')[0]}'s notebook ({chapters[number].heading}), "
            f"not chapter {expected}'s: not graded"
        )
        report.rows.append(Row(student, "(submission)", "wrong-chapter", "no", message))
        return report
    chapter = chapters[number]
    report = Report(student, chapter)
    try:
        _run_and_grade(report, cells, chapter, timeout)
    except Exception as error:  # a grader bug or a broken kernel: this student only
        report.rows = [
            Row(student, e.title, "not-run", "no", f"the grader failed: {type(error).__name__}")
            for e in chapter.exercises
        ]
        report.notes.append(f"grading stopped: {type(error).__name__}: {str(error)[:200]}")
    report.seconds = time.perf_counter() - start
    return report


def _run_and_grade(
    report: Report, cells: list[tuple[str, str]], chapter: Chapter, timeout: int
) -> None:
    matched = {e.number: _find_cell(e, cells) for e in chapter.exercises}
    with tempfile.TemporaryDirectory(prefix="lokr-grade-") as tmp:
        workdir = Path(tmp)
        sources: list[str] = []
        student_at: dict[int, int] = {}  # notebook cell index -> run index
        grader_at: dict[str, int] = {}  # exercise number -> run index

        def add_graders(exercises: Iterable[Exercise]) -> None:
            for exercise in exercises:
                grader_at[exercise.number] = len(sources)
                result = workdir / f"result-{exercise.number}.json"
                sources.append(_grader_source(exercise, chapter, result))

        for index, (cell_type, source) in enumerate(cells):
            if cell_type != "code" or not source.strip():
                continue
            student_at[index] = len(sources)
            sources.append(source)
            add_graders(e for e in chapter.exercises if matched[e.number] == index)
        add_graders(e for e in chapter.exercises if matched[e.number] is None)
        runs = _execute(sources, workdir, timeout)

        for exercise in chapter.exercises:
            index = matched[exercise.number]
            flags = []
            if index is None:
                flags.append(f"no cell starting '# {exercise.title.split(':')[0]}'")
            elif not _has_check_line(exercise, cells[index][1]):
                flags.append(f"the check line `{exercise.check_line}` was edited away")
            result_path = workdir / f"result-{exercise.number}.json"
            try:
                result = json.loads(result_path.read_text("utf-8"))
                if not isinstance(result, dict):
                    result = None
            except (OSError, ValueError):
                result = None
            cell = runs[student_at[index]] if index is not None else None
            grader = runs[grader_at[exercise.number]]
            row = _row_for(report.student, exercise, index, cell, grader, result, flags, timeout)
            report.rows.append(row)

        exercise_cells = {i for i in matched.values() if i is not None}
        for index, at in student_at.items():
            run = runs[at]
            if index in exercise_cells:
                continue
            if run.dead and (at == 0 or not runs[at - 1].dead):
                report.notes.append(f"the kernel died or hung at cell {index + 1}")
            elif run.timeout:
                report.notes.append(f"cell {index + 1} timed out after {timeout} s")
            elif run.error:
                report.notes.append(f"cell {index + 1} raised {run.error[0]}")


def submissions(paths: Sequence[Path], skip: Path | None = None) -> list[tuple[str, Path]]:
    """(student, file) for every file given or found under a folder given, in a stable order."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    skip = skip.resolve() if skip else None
    for given in paths:
        given = Path(given)
        if given.is_dir():
            files = sorted(
                p
                for p in given.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(given).parts)
            )
        else:
            files = [given]
        for file in files:
            resolved = file.resolve()
            if resolved in seen or resolved == skip:
                continue
            seen.add(resolved)
            found.append((str(file), file))
    return found


def grade(
    paths: Sequence[Path],
    *,
    chapter: str | None = None,
    timeout: int = 60,
    exercises: Path | None = None,
    skip: Path | None = None,
    progress: bool = False,
) -> list[Report]:
    """Grade every submission under `paths`; one Report per file, in order. exercises: the
    course's exercise notebooks (default exercises/ of this checkout)."""
    chapters = load_chapters(exercises)
    if chapter is not None:
        chapter = chapter.zfill(2)
        if chapter not in chapters:
            raise ValueError(f"no chapter {chapter}; chapters with exercises: {sorted(chapters)}")
    reports = []
    for student, path in submissions(paths, skip):
        if progress:
            print(f"grading {student} ...", end=" ", flush=True)
        report = grade_file(path, chapters, student=student, expected=chapter, timeout=timeout)
        reports.append(report)
        if progress:
            print(f"{report.score}/{report.out_of} ({report.seconds:.1f} s)", flush=True)
    return reports


def rows(reports: Iterable[Report]) -> list[Row]:
    out = []
    for report in reports:
        out.extend(report.rows)
        out.append(report.total())
    return out


def write_csv(reports: Sequence[Report], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(FIELDS)
        for row in rows(reports):
            writer.writerow([row.student, row.exercise, row.kind, row.passed, row.message])


def format_table(reports: Sequence[Report], width: int = 100) -> str:
    """The rows as a plain-text table; messages are shortened to `width` (the CSV has them all)."""
    table = [[r.student, r.exercise, r.kind, r.passed, r.message] for r in rows(reports)]
    header = [name.upper() for name in FIELDS]
    limits = [48, 40, 15, 6, width]
    cells = [
        [line[0] if len(line[0]) <= limits[0] else "…" + line[0][1 - limits[0] :]]
        + [
            c if len(c) <= limit else c[: limit - 1] + "…"
            for c, limit in zip(line[1:], limits[1:], strict=True)
        ]
        for line in [header, *table]
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(FIELDS))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokr_edu.grade",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="notebooks, or folders of them (any names)"
    )
    parser.add_argument(
        "--chapter", help="the chapter handed out (e.g. 01): other chapters' notebooks are flagged"
    )
    parser.add_argument("--csv", type=Path, default=Path("grades.csv"), help="default grades.csv")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per cell (default 60)")
    parser.add_argument(
        "--exercises",
        type=Path,
        help="the course's exercise notebooks (default: exercises/ of this checkout)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        reports = grade(
            args.paths,
            chapter=args.chapter,
            timeout=args.timeout,
            exercises=args.exercises,
            skip=args.csv,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except NotACheckoutError as error:
        parser.error(f"{error} Or pass --exercises FOLDER, the exercises/ of a checkout.")
    if not reports:
        print("no submissions found", file=sys.stderr)
        return 1
    print()
    print(format_table(reports))
    write_csv(reports, args.csv)
    graded = sum(1 for r in reports if not any(row.kind in SUBMISSION_KINDS for row in r.rows))
    print(f"\n{len(reports)} submissions, {graded} graded; all rows in {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
