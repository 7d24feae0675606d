"""Build exercises/ from solutions/: the solution notebooks are the only source of truth.

    python -m lokr_edu.exercises build    # regenerate exercises/NN_topic_exercises.ipynb
    python -m lokr_edu.exercises check    # exit 1 if exercises/ differs from what build writes

Conventions (CONTRIBUTING.md, "Adding a chapter"):
- An exercise is a code cell whose first line is `# Exercise N.M: title` and which contains
  one or more blocks between `# BEGIN SOLUTION` and `# END SOLUTION`. Each block becomes
  `raise NotImplementedError("Exercise N.M: title ...")` at the block's indentation.
  The cell should end with a `lokr_edu.checks` call, so a student's answer is checked on the spot.
- Cells tagged `solution-only` (remarks on the solution) are left out of the exercises.
- Exercise notebooks ship unexecuted: no outputs, no execution counts.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from lokr_edu.course import NotACheckoutError, clean_metadata, repository_root

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
TITLE = re.compile(r"^# (Exercise \d+\.\d+): (.+)$")
KINDS = ("implement", "predict", "derive", "explore", "debug")
# the markdown heading above each exercise: "## Exercise 3.2 — predict ★★ (10 min): title"
HEADING = re.compile(
    r"^## (Exercise \d+\.\d+) — (" + "|".join(KINDS) + r") (★{1,3}) \((\d+) min\)", re.M
)

__all__ = [
    "KINDS",
    "exercise_kinds",
    "exercise_path",
    "exercise_title",
    "stub_cell_source",
    "build_notebook",
    "main",
]


def exercise_kinds(solution: Path) -> dict[str, str]:
    """{"Exercise N.M": kind} from a solutions notebook's exercise headings, in order."""
    nb = nbformat.read(solution, as_version=4)
    return {
        match.group(1): match.group(2)
        for cell in nb.cells
        if cell.cell_type == "markdown"
        for match in HEADING.finditer(cell.source)
    }


def exercise_path(solution: Path) -> Path:
    """solutions/01_x_solutions.ipynb -> exercises/01_x_exercises.ipynb (of this checkout)"""
    if not solution.stem.endswith("_solutions"):
        raise ValueError(f"solution notebooks end in _solutions.ipynb, got {solution.name}")
    name = f"{solution.stem.removesuffix('_solutions')}_exercises.ipynb"
    return repository_root() / "exercises" / name


def exercise_title(source: str) -> str | None:
    """'Exercise 1.2: title' for an exercise cell, None for any other cell."""
    if BEGIN not in source:
        return None
    match = TITLE.match(source.splitlines()[0])
    if match is None:
        raise ValueError(
            f"an exercise cell must start with '# Exercise N.M: title', got: {source[:60]!r}"
        )
    return f"{match.group(1)}: {match.group(2)}"


def stub_cell_source(source: str) -> str:
    """Replace every BEGIN/END SOLUTION block by a NotImplementedError naming the exercise."""
    title = exercise_title(source)
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{title}: nested {BEGIN}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("{title} (replace this line)")')
        elif stripped == END:
            if not inside:
                raise ValueError(f"{title}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{title}: {BEGIN} without {END}")
    return "\n".join(out)


def build_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The exercise notebook for a solution notebook (a new object; the input is untouched)."""
    nb = nbformat.from_dict(solution)
    cells = []
    for cell in nb.cells:
        if "solution-only" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "code":
            if exercise_title(cell.source) is not None:
                cell.source = stub_cell_source(cell.source)
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    nb.cells = cells
    return clean_metadata(nb)


def _expected() -> dict[Path, str]:
    return {
        exercise_path(path): nbformat.writes(build_notebook(nbformat.read(path, as_version=4)))
        + "\n"
        for path in sorted((repository_root() / "solutions").glob("*_solutions.ipynb"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokr_edu.exercises",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["build", "check"])
    args = parser.parse_args(argv)
    try:
        root = repository_root()
    except NotACheckoutError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    expected = _expected()
    if args.command == "build":
        (root / "exercises").mkdir(exist_ok=True)
        for path, text in expected.items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(root)}")
        return 0
    stale = [p for p, text in expected.items() if not p.exists() or p.read_text("utf-8") != text]
    extra = sorted(set((root / "exercises").glob("*.ipynb")) - set(expected))
    for path in stale:
        print(
            f"{path.relative_to(root)} differs from its solution: "
            "run python -m lokr_edu.exercises build"
        )
    for path in extra:
        print(f"{path.relative_to(root)} has no solution notebook")
    return 1 if stale or extra else 0


if __name__ == "__main__":
    sys.exit(main())
