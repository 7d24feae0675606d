"""The course as a book: a static website of every chapter, from the committed notebooks.

    python tools/book.py build                  # make book: build/book/index.html
    python tools/book.py build --no-solutions   # make book SOLUTIONS=no: without the solutions
    python tools/book.py test                   # make test-book: the built book in Chromium

`build` is Sphinx with myst-nb and the book theme (the `[book]` extra), in three steps:

1. pages: build/book-work/source/ gets copies of the notebooks, unchanged, and pages written
   from `lokr_edu.course.lectures()` and `lokr_edu.syllabus`, the course's one chapter list: the
   front page (tools/book_front.md, with the syllabus table of `syllabus.markdown_table()`), a
   page per chapter (what it needs, its lecture, exercises, solutions and `lokr_edu` modules), a
   page per module (its source) and the table of contents. A new lecture is a new chapter here.
2. MathJax: the version `make slides` pins (tools/slides.py: `npm pack`, checksum checked, kept
   in build/vendor/), copied into the book's _static/; the SVG build, so no font is loaded.
3. Sphinx writes build/book/. Notebooks are rendered as committed (myst-nb's execution mode
   "off"): nothing is re-executed. The pages load nothing from the network, and open from disk
   (build/book/index.html) as from any static host (`python -m http.server -d build/book`).

Solutions are a part of their own in the table of contents; `--no-solutions` leaves them out of
the book altogether (no page, no link, nothing in the search index).

`test` opens build/book/index.html from disk in headless Chromium (Debian's package, driven by
Playwright, as tools/browser_test.py does), follows the table of contents to every page and
checks: every image loaded, every formula typeset by MathJax (no raw `$$`), each lecture shows as
many figures as its notebook holds, search finds chapter 03, and no request left the machine.
Then the same book served by `http.server` on 127.0.0.1. Screenshots: build/screenshots/book_*.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from lokr_edu.course import lectures, repository_root
from lokr_edu.exercises import exercise_path
from lokr_edu.syllabus import CHAPTERS, Chapter, markdown_table

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
FRONT = TOOLS / "book_front.md"
OUT = REPO / "build" / "book"
WORK = REPO / "build" / "book-work"  # the pages Sphinx reads, and its doctrees
VENDOR = REPO / "build" / "vendor"  # shared with make slides
SHOTS = REPO / "build" / "screenshots"
SEARCH_WORD = ("Hadamard", "03_loha_and_lokr")  # a word of chapter 03, and its page

# Sphinx's settings (what a conf.py would hold); "syllabus" and the paths are added by build().
SETTINGS = {
    "project": "lokr-edu",
    "html_title": "lokr-edu",
    "extensions": ["myst_nb"],
    "nb_execution_mode": "off",  # the outputs as committed
    "nb_ipywidgets_js": {},  # no widget manager from a CDN
    "myst_enable_extensions": ["dollarmath", "amsmath", "substitution"],
    "html_theme": "sphinx_book_theme",
    "html_theme_options": {
        "home_page_in_toc": True,
        "use_download_button": True,  # the page's source: the .ipynb of a notebook page
    },
    "html_sourcelink_suffix": "",  # download notebook.ipynb, not notebook.ipynb.txt
    "mathjax_path": "mathjax/es5/tex-svg-full.js",  # in _static/, see vendor_mathjax()
}


# --- pages ---------------------------------------------------------------------------------------


def chapters() -> list[tuple[Path, Chapter]]:
    """The book's chapters: every lecture of `lectures()`, in course order, with its syllabus
    entry (a lecture the syllabus does not list yet gets a bare one)."""
    listed = {repository_root() / c.notebook: c for c in CHAPTERS}
    return [
        (path, listed.get(path) or Chapter(path.stem[:2], path.stem, "", (), "", None, None))
        for path in lectures()
    ]


def solution_of(exercises: Path) -> Path | None:
    """The solutions notebook whose exercises (`lokr_edu.exercises.exercise_path`) these are."""
    for solution in sorted((repository_root() / "solutions").glob("*_solutions.ipynb")):
        if exercise_path(solution) == exercises:
            return solution
    return None


def notebooks(path: Path, chapter: Chapter, solutions: bool = True) -> dict[str, Path]:
    """A chapter's notebooks by part: its lecture, its exercises and, with `solutions`, theirs."""
    parts = {"Lecture": path}
    if chapter.exercises:
        parts["Exercises"] = repository_root() / chapter.exercises
        solution = solution_of(parts["Exercises"])
        if solutions and solution:
            parts["Solutions"] = solution
    return parts


def _doc(path: Path) -> str:
    """A notebook's page from the book's root: notebooks/01_kronecker_product."""
    return path.relative_to(repository_root()).with_suffix("").as_posix()


def _module_doc(module: str) -> str:
    """lokr_edu/sd_data.py -> modules/sd_data"""
    return "modules/" + Path(module).stem


def _toctree(entries: list[str], caption: str | None = None, hidden: bool = False) -> str:
    options = (f":caption: {caption}\n" if caption else "") + (":hidden:\n" if hidden else "")
    return "```{toctree}\n" + options + ":maxdepth: 1\n\n" + "\n".join(entries) + "\n```\n"


def chapter_page(path: Path, chapter: Chapter, solutions: bool = True) -> str:
    """chapters/NN.md: what the chapter needs, and links to everything that belongs to it.

    Its lecture and exercises are its pages in the table of contents; its solutions are in the
    book's Solutions part."""
    parts = notebooks(path, chapter, solutions)
    lines = [f"# Chapter {chapter.number}: {chapter.title}", ""]
    if chapter.ready:
        lines += [f"Needs: {chapter.needs}. Runs in about {chapter.cpu_seconds} s on a CPU.", ""]
    lines.append(f"- **Lecture**: {{doc}}`../{_doc(parts['Lecture'])}`")
    if "Exercises" in parts:
        lines.append(
            f"- **Exercises**: {{doc}}`../{_doc(parts['Exercises'])}`: fill in each exercise; "
            "its check says whether you are right, and what is wrong when you are not"
        )
    if "Solutions" in parts:
        lines.append(
            f"- **Solutions**: {{doc}}`Chapter {chapter.number} solutions "
            f"<../{_doc(parts['Solutions'])}>`, every exercise solved and explained"
        )
    if chapter.modules:
        modules = ", ".join(f"{{doc}}`{m} <../{_module_doc(m)}>`" for m in chapter.modules)
        lines.append(f"- **In `lokr_edu`**, the chapter's answer key: {modules}")
    own = [f"{part} <../{_doc(nb)}>" for part, nb in parts.items() if part != "Solutions"]
    return "\n".join(lines) + "\n\n" + _toctree(own, hidden=True)


def module_page(module: str, source: Path) -> str:
    """modules/NAME.md: the module's source, and the chapters it belongs to."""
    taught = [c for _, c in chapters() if module in c.modules]
    links = ", ".join(
        f"{{doc}}`Chapter {c.number}: {c.title} <../chapters/{c.number}>`" for c in taught
    )
    include = os.path.relpath(repository_root() / module, source / "modules")
    return (
        f"# {module}\n\nThe answer key of {links}.\n\n"
        f"```{{literalinclude}} {include}\n:language: python\n:linenos:\n```\n"
    )


def write_pages(source: Path, solutions: bool = True) -> list[str]:
    """Write the book's pages into `source`; return the chapters' pages, in course order.

    The front page's table of contents has three parts: the chapters (each with its lecture and
    exercises), the solutions (with `solutions` only) and the modules of `lokr_edu`. Notebooks are
    copied byte for byte: the book shows exactly the committed outputs.
    """
    shutil.rmtree(source, ignore_errors=True)
    (source / "chapters").mkdir(parents=True)
    (source / "modules").mkdir()
    book = [(path, chapter, notebooks(path, chapter, solutions)) for path, chapter in chapters()]
    for _, _, parts in book:
        for notebook in parts.values():
            target = source / notebook.relative_to(repository_root())
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(notebook, target)
    pages = [f"chapters/{chapter.number}" for _, chapter, _ in book]
    for (path, chapter, _), page in zip(book, pages, strict=True):
        (source / f"{page}.md").write_text(chapter_page(path, chapter, solutions), "utf-8")
    modules = list(dict.fromkeys(m for _, chapter, _ in book for m in chapter.modules))
    for module in modules:
        (source / f"{_module_doc(module)}.md").write_text(module_page(module, source), "utf-8")

    front = FRONT.read_text("utf-8") + "\n" + _toctree(pages, caption="Chapters")
    solved = [
        f"Chapter {chapter.number} solutions <{_doc(parts['Solutions'])}>"
        for _, chapter, parts in book
        if "Solutions" in parts
    ]
    if solved:
        front += _toctree(solved, caption="Solutions")
    front += _toctree([f"{m} <{_module_doc(m)}>" for m in modules], caption="The package lokr_edu")
    (source / "index.md").write_text(front, "utf-8")
    return pages


# --- building ------------------------------------------------------------------------------------


def vendor_mathjax(static: Path) -> None:
    """MathJax as `make slides` has it (pinned, checked, cached in build/vendor/)."""
    from slides import NPM, _npm_package  # tools/slides.py (python tools/book.py: on the path)

    package = _npm_package("mathjax", VENDOR)
    for relative in NPM["mathjax"][2]:
        target = static / "mathjax" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / relative, target)


def build(out: Path = OUT, solutions: bool = True) -> Path:
    from sphinx.application import Sphinx

    start = time.perf_counter()
    source, static = WORK / "source", WORK / "static"
    shutil.rmtree(WORK, ignore_errors=True)
    pages = write_pages(source, solutions)
    vendor_mathjax(static)
    settings = {
        **SETTINGS,
        "html_static_path": [str(static)],
        "myst_substitutions": {"syllabus": markdown_table()},
    }
    app = Sphinx(
        srcdir=source,
        confdir=None,  # no conf.py: SETTINGS above
        outdir=WORK / "book",  # myst-nb writes figures beside it, into WORK/jupyter_execute
        doctreedir=WORK / "doctrees",
        buildername="html",
        confoverrides=settings,
        freshenv=True,
        status=None,  # warnings and errors still print
    )
    app.build()
    if app.statuscode:
        raise SystemExit(f"Sphinx failed (status {app.statuscode})")
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(WORK / "book", out)
    seconds = time.perf_counter() - start
    print(
        f"wrote {out / 'index.html'}: {len(pages)} chapters, solutions "
        f"{'included' if solutions else 'left out'}, {seconds:.0f} s"
    )
    return out / "index.html"


# --- the browser test ----------------------------------------------------------------------------


def _figures(path: Path) -> int:
    """How many image outputs a notebook holds."""
    nb = nbformat.read(path, as_version=4)
    return sum(
        any(key.startswith("image/") for key in output.get("data", {}))
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


# What a page shows, once MathJax has typeset it: images that did not load, figures (notebook
# outputs), formulas (Sphinx's .math elements, and those MathJax replaced), raw $$ in the prose.
PAGE = """async () => {
    if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
    const article = document.querySelector('article.bd-article');
    const prose = article.cloneNode(true);
    prose.querySelectorAll('pre, code').forEach(e => e.remove());
    return {
        broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
                                    .map(i => i.src),
        images: document.images.length,
        figures: article.querySelectorAll('.cell_output img').length,
        math: article.querySelectorAll('.math').length,
        typeset: article.querySelectorAll('.math mjx-container').length,
        raw: prose.innerText.includes('$$'),
    };
}"""


def check_page(page, url: str) -> dict:
    page.goto(url)
    shown = page.evaluate(PAGE)
    name = "/".join(url.split("#")[0].split("/")[-2:])
    assert not shown["broken"], f"{name}: images that did not load: {shown['broken']}"
    assert shown["typeset"] == shown["math"], f"{name}: {shown} (formulas not typeset)"
    assert not shown["raw"], f"{name}: raw $$ in the text"
    return shown


def check_book(page, front: str) -> str:
    """Every page of the table of contents, from the front page; each lecture's figures."""
    page.goto(front)
    toc = page.locator("nav.bd-docs-nav a.reference.internal").evaluate_all(
        "links => links.map(a => a.href.split('#')[0])"
    )
    figures = {path.stem: _figures(path) for path in lectures()}
    pages, images, formulas = 0, 0, 0
    for url in dict.fromkeys([front, *toc]):
        shown = check_page(page, url)
        stem = Path(url).stem
        if stem in figures:
            assert shown["figures"] == figures.pop(stem), f"{stem}: {shown['figures']} figures"
        pages, images, formulas = pages + 1, images + shown["images"], formulas + shown["typeset"]
    assert not figures, f"lectures missing from the table of contents: {sorted(figures)}"
    solutions = sum("/solutions/" in url for url in toc)
    return (
        f"{pages} pages from the table of contents ({len(lectures())} lectures, {solutions} "
        f"solutions), {images} images loaded, none broken, {formulas} formulas typeset, no raw $$"
    )


def check_search(page, front: str) -> str:
    """The header's search box finds a word of chapter 03."""
    word, expected = SEARCH_WORD
    page.goto(front)
    page.locator("button.search-button__button").first.click()
    page.locator("input[name=q]:visible").fill(word)
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-results li a", timeout=30_000)
    hits = page.locator("#search-results li a").evaluate_all("links => links.map(a => a.href)")
    assert any(expected in hit for hit in hits), f"search for {word!r} found {hits}"
    return f"search for {word!r} lists {len(hits)} pages, chapter 03 among them"


@contextlib.contextmanager
def http_server(folder: Path):
    """`python -m http.server` on 127.0.0.1 serving `folder`; yields its URL."""
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", folder],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:  # it prints "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
        yield server.stdout.readline().split("(")[1].split(")")[0]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test() -> int:
    from browser_test import chromium, ensure_playwright  # tools/browser_test.py, as above

    if not (OUT / "index.html").exists():
        raise SystemExit(f"{OUT / 'index.html'} is missing: run `make book` first")
    executable = chromium()
    ensure_playwright()
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("book_*.png"):
        old.unlink()
    start = time.perf_counter()
    requests, outside, errors = [], [], []
    with http_server(OUT) as served, sync_playwright() as p:
        local = ("file:", "data:", "blob:", "about:", served)

        def route(route) -> None:  # anything bound off this machine is recorded and refused
            requests.append(route.request.url)
            if route.request.url.startswith(local):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        browser = p.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", route)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append((page.url, str(error))))
        front = (OUT / "index.html").as_uri()
        print(f"ok  from disk: {check_book(page, front)}", flush=True)
        print(f"ok  from disk: {check_search(page, front)}", flush=True)
        page.goto(front)
        page.screenshot(path=SHOTS / "book_front.png")
        chapter = (OUT / "notebooks" / "07_stable_diffusion_lokr.html").as_uri()
        check_page(page, chapter)
        page.locator("article .cell_output img").first.scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "book_chapter_07.png")
        check_page(page, served)
        check_page(page, served + "notebooks/07_stable_diffusion_lokr.html")
        print(f"ok  from {served}: front page, chapter 07, {check_search(page, served)}")
        browser.close()
    # From disk, Sphinx's search lists its results but cannot fetch the pages for the text under
    # each (a browser refuses fetch() of file: URLs); over http it shows that text too.
    summaries = [(url, e) for url, e in errors if url.startswith("file:") and "search.html" in url]
    assert all(e == "Failed to fetch" for _, e in summaries), summaries
    assert not (other := [e for e in errors if e not in summaries]), f"JavaScript errors: {other}"
    assert not outside, f"requests to the network: {outside}"
    print(f"ok  {len(requests)} requests, all to files or 127.0.0.1: none to the network")
    print(f"screenshots: {SHOTS / 'book_front.png'}, {SHOTS / 'book_chapter_07.png'}")
    print(f"passed in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/book.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    building = commands.add_parser("build", help="write build/book/")
    building.add_argument("--out", type=Path, default=OUT)
    building.add_argument("--no-solutions", action="store_true", help="leave the solutions out")
    commands.add_parser("test", help="check build/book/ in headless Chromium")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, solutions=not args.no_solutions)
        return 0
    return test()


if __name__ == "__main__":
    sys.exit(main())
