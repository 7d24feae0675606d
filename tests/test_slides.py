"""Lecture slides: every lecture is marked for a slideshow, and `make slides` writes HTML that
loads nothing from the network (tools/slides.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from lokr_edu.course import clean_metadata

REPO = Path(__file__).resolve().parent.parent
LECTURES = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
_spec = importlib.util.spec_from_file_location("slides", REPO / "tools" / "slides.py")
slides = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slides)


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.stem)
def test_every_lecture_is_marked_for_slides(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert slides.problems(nb) == []
    kinds = [c.metadata["slideshow"]["slide_type"] for c in nb.cells]
    assert kinds.count("slide") >= 2, "a title slide and at least one section"
    for cell, kind in zip(nb.cells, kinds, strict=True):
        if cell.cell_type == "code" and slides._has_image(cell):
            assert kind in ("slide", "subslide"), "a figure gets a slide of its own"


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.stem)
def test_marks_are_what_the_rules_give(path: Path) -> None:
    """`tools/slides.py mark` is repeatable: re-running it on a marked lecture changes nothing."""
    nb = nbformat.read(path, as_version=4)
    assert slides.mark(nb) == 0


def test_slide_marks_survive_re_execution_metadata_trimming() -> None:
    nb = nbformat.read(LECTURES[1], as_version=4)
    before = [c.metadata.get("slideshow") for c in nb.cells]
    assert [c.metadata.get("slideshow") for c in clean_metadata(nb).cells] == before


def test_rules_on_a_small_lecture() -> None:
    nb = nbformat.v4.new_notebook()
    figure = nbformat.v4.new_code_cell("plt.plot([1, 2])")
    figure.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "AAAA"})]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Chapter 99 — title\n\nWhat this is about."),
        nbformat.v4.new_code_cell("import torch\n\nsetup_notebook(seed=0)"),
        nbformat.v4.new_markdown_cell("## 1. A section\n\nThe claim."),
        nbformat.v4.new_code_cell("x = 1\nprint(x)"),
        nbformat.v4.new_markdown_cell("The next idea."),
        nbformat.v4.new_markdown_cell("And one more step of it."),
        figure,
        nbformat.v4.new_markdown_cell("What the figure shows."),
        nbformat.v4.new_code_cell("\n".join(f"y{i} = {i}" for i in range(40))),
        nbformat.v4.new_code_cell(""),
    ]
    assert slides.slide_types(nb) == [
        "slide",
        "skip",
        "slide",
        "fragment",
        "subslide",
        "fragment",
        "subslide",
        "subslide",
        "subslide",
        "skip",
    ]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []  # what the page loads: scripts, style sheets, images, frames

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "embed") and values.get("src"):
            self.loaded.append(values["src"])
        if tag == "link" and values.get("href"):
            self.loaded.append(values["href"])


REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if shutil.which("npm") is None and not (REPO / "build" / "vendor").exists():
        pytest.skip("make slides fetches reveal.js and MathJax with npm, which is not installed")
    out = tmp_path_factory.mktemp("slides")
    lectures = [str(p) for p in LECTURES][:2]
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "slides.py"), "build", *lectures, "--out", str(out)],
        check=True,
        cwd=REPO,
    )
    return out


def test_make_slides_output_loads_nothing_from_the_network(built: Path) -> None:
    pages = sorted(built.glob("*.slides.html"))
    assert len(pages) == 2
    for page in pages:
        html = page.read_text(encoding="utf-8")
        parser = _Links()
        parser.feed(html)
        assert parser.loaded, page.name
        remote = [url for url in parser.loaded if REMOTE.match(url)]
        assert remote == [], f"{page.name} loads {remote}"
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//", html)
        for url in parser.loaded:
            if not url.startswith(("data:", "#")):
                assert (built / url).is_file(), f"{page.name} loads {url}, which is not there"
        assert "Reveal.initialize" in html and 'class="reveal"' in html
        assert html.count("<section") > 10
    for css in built.glob("_static/**/*.css"):
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//", css.read_text("utf-8"))
