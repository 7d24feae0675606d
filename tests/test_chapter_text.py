"""The chapters speak to the student about the subject, never about this project.

Every cell's source (markdown and code, not outputs) of every lecture, solution and exercise
notebook is searched for two kinds of text:

- documents the reader does not have: "the write-up", "the source lecture", "the source
  material" (a textbook states the fact and cites the paper);
- the project's own machinery: its tests and test tools (nbval, pytest, `make test…`, files
  under tests/), acceptance targets and PASS / FAIL lists, "holds on other CPUs", issue numbers.

Words of the subject stay legal: Welch's t-test, the test set, test accuracy, x_test, "the check
tests your function", `make install` in the setup chapter, identifiers such as
`lokr_delta_writeup` (the package's names are not prose). A failure names each notebook and cell
(cN counts cells from 0) with the words found.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from lokr_edu.course import repository_root

NOTEBOOKS = sorted(
    path
    for folder in ("notebooks", "solutions", "exercises")
    for path in (repository_root() / folder).glob("*.ipynb")
)

CASELESS = [
    r"\bwrite-?ups?\b",  # "the write-up", "writeup"; not the identifier lokr_delta_writeup
    r"\bsource lectures?\b",
    r"\bsource materials?\b",
    r"\bnbval\b",
    r"\bpytest\b",
    r"\bmake test\S*",  # make test, make test-fast, make test-full-arch, make test-browser
    r"\btest-full-arch\b",
    r"\bthe tests\b",  # "the tests compare …"; not "the t-tests", "the test set"
    r"\btest suite\b",
    r"(?<![\w.])tests/[\w./]+",  # a file of the test suite, e.g. tests/test_sd15.py
    r"\bacceptance targets?\b",
    r"\bholds on other CPUs\b",
    r"\bissue #?\d+\b",
]
EXACT = [
    r"\b(?:PASS|FAIL)(?:ED)?\b",  # a PASS / FAIL list; "pass" and "passes" are words
]
PROJECT_TALK = re.compile("|".join([f"(?i:{p})" for p in CASELESS] + [f"(?:{p})" for p in EXACT]))


def project_talk(text: str) -> list[str]:
    """The phrases of `text` that speak about documents the reader lacks or about the project."""
    return [match.group(0) for match in PROJECT_TALK.finditer(text)]


@pytest.mark.parametrize(
    "text",
    [
        "A correction to the write-up: it sets α = r.",
        "The writeup says otherwise.",
        "A correction to the Source Lecture.",
        "the source material counts α as a parameter",
        "nbval compares every output",
        "run `make test-full-arch` to check it",
        "`make test` runs this cell",
        "The tests compare these numbers exactly.",
        "(`tests/test_sd15.py` checks this)",
        "Acceptance targets: 4.",
        "This holds on other CPUs too.",
        "- lokr_apply faster than torch.kron: PASS",
        "as issue 24 asks",
        "pytest runs it",
    ],
)
def test_project_talk_is_found(text: str) -> None:
    assert project_talk(text), text


@pytest.mark.parametrize(
    "text",
    [
        "Welch's t-test on the per-seed values",
        "the t-tests agree",
        "the test set stays untouched; test accuracy is reported once",
        "print(len(data.x_test), load_digits().y_test[0])",
        "the check tests it on many shapes; test your own cases",
        "run `make install` from the repository root",
        "from lokr_edu.lowrank import lokr_delta_writeup",
        "count_params('lokr_writeup', 1280, 1280, 4)",
        "a forward pass and a backward pass; each pass; it passes the check",
        "target_modules=['to_k', 'to_v'] and the target tensor",
        "the 95 % interval of the difference",
        "write up your prediction first",
    ],
)
def test_subject_words_are_not_project_talk(text: str) -> None:
    assert not project_talk(text), project_talk(text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_cell_speaks_of_documents_the_reader_lacks_or_of_the_project(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    found = [
        f"{path.parent.name}/{path.name} c{index} ({cell.cell_type}): "
        + ", ".join(repr(p) for p in sorted(set(phrases)))
        for index, cell in enumerate(nb.cells)
        if (phrases := project_talk(cell.source))
    ]
    assert not found, "\n".join(found)


def test_every_course_notebook_is_read() -> None:
    folders = {path.parent.name for path in NOTEBOOKS}
    assert folders == {"notebooks", "solutions", "exercises"}, folders
    assert len(NOTEBOOKS) >= 3 * 7, [path.name for path in NOTEBOOKS]
