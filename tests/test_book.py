"""The book's pages (tools/book.py, `make book`): its table of contents is the course's chapter
list, and its notebooks are the committed ones. Sphinx and the browser are `make test-book`'s."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from lokr_edu.course import lectures
from lokr_edu.syllabus import CHAPTERS

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("book", REPO / "tools" / "book.py")
book = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(book)
TOCTREE = re.compile(r"```\{toctree\}\n(.*?)```", re.S)


def toctrees(page: Path) -> list[list[str]]:
    """The entries of each toctree of a written page: 'Title <doc>' or 'doc'."""
    return [
        [line for line in block.splitlines() if line and not line.startswith(":")]
        for block in TOCTREE.findall(page.read_text("utf-8"))
    ]


def target(entry: str) -> str:
    return entry.split("<")[-1].rstrip(">")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("book") / "source"
    book.write_pages(source)
    return source


def test_table_of_contents_is_the_course(pages: Path) -> None:
    """One chapter page per lecture of lectures(), in course order, each opening on its lecture:
    a new notebooks/NN_*.ipynb is a new chapter of the book with nothing else to edit."""
    chapters, solutions, modules = toctrees(pages / "index.md")
    lecture_of = [target(toctrees(pages / f"{page}.md")[0][0]) for page in chapters]
    assert lecture_of == [f"../notebooks/{path.stem}" for path in lectures()]
    assert [page.removeprefix("chapters/") for page in chapters] == [
        path.stem[:2] for path in lectures()
    ]
    assert [target(e) for e in solutions] == [
        f"solutions/{p.stem}" for p in sorted((REPO / "solutions").glob("*_solutions.ipynb"))
    ]
    listed = {m for c in CHAPTERS if REPO / c.notebook in lectures() for m in c.modules}
    assert {target(e) for e in modules} == {f"modules/{Path(m).stem}" for m in listed}


def test_chapter_pages_link_exercises_solutions_and_modules(pages: Path) -> None:
    for chapter in CHAPTERS:
        if REPO / chapter.notebook not in lectures():
            continue
        text = (pages / "chapters" / f"{chapter.number}.md").read_text("utf-8")
        assert f"# Chapter {chapter.number}: {chapter.title}" in text
        for module in chapter.modules:
            assert f"{{doc}}`{module} <../modules/{Path(module).stem}>`" in text
            assert (pages / "modules" / f"{Path(module).stem}.md").exists()
        if chapter.exercises:
            exercises = chapter.exercises.removesuffix(".ipynb")
            assert f"Exercises <../{exercises}>" in text
            solutions = exercises.replace("exercises", "solutions")
            assert f"<../{solutions}>`" in text


def test_notebooks_are_copied_as_committed(pages: Path) -> None:
    copies = sorted(pages.glob("*/*.ipynb"))
    assert len(copies) >= len(lectures())
    for copy in copies:
        assert copy.read_bytes() == (REPO / copy.relative_to(pages)).read_bytes(), copy


def test_without_solutions_nothing_of_them_is_left(tmp_path: Path) -> None:
    book.write_pages(tmp_path, solutions=False)
    assert not (tmp_path / "solutions").exists()
    for page in tmp_path.rglob("*.md"):
        assert "_solutions" not in page.read_text("utf-8"), page
    assert len(toctrees(tmp_path / "index.md")) == 2  # chapters and modules


def test_pages_workflow_is_opt_in_and_publishes_make_book() -> None:
    """.github/workflows/pages.yml cannot run here: this pins what it says."""
    document = yaml.safe_load((REPO / ".github" / "workflows" / "pages.yml").read_text())
    (job,) = document["jobs"].values()
    assert set(document[True]) == {"push", "workflow_dispatch"}  # YAML 1.1 reads `on` as True
    assert "vars.LOKR_EDU_PAGES == 'true'" in job["if"]
    assert job["env"] == {"PIP_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert runs == ["make book SOLUTIONS=${{ vars.LOKR_EDU_BOOK_SOLUTIONS || 'yes' }}"]
    upload = next(s for s in job["steps"] if "upload-pages-artifact" in s.get("uses", ""))
    assert upload["with"]["path"] == "build/book"
    assert "--no-solutions" in (REPO / "Makefile").read_text().split("\nbook:")[1].split("\n\n")[0]
