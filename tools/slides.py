"""Lecture slides from the lecture notebooks: mark the cells, check the marks, build offline HTML.

    python tools/slides.py mark notebooks/07_*.ipynb   # set every cell's slideshow.slide_type
    python tools/slides.py check                       # exit 1 if a lecture cell has no slide type
    python tools/slides.py build                       # make slides: build/slides/*.slides.html

`mark` applies one rule set, so it can be re-run after a notebook changes (it only rewrites cell
metadata, never sources or outputs; `--keep` leaves cells that already have a slide type alone):

- `#` and `##` headings open a slide, `###` headings a sub-slide;
- a figure (a code cell with an image) gets a sub-slide of its own, shown full size;
- the explanation after a code cell opens a sub-slide (one idea per slide); further paragraphs of a
  derivation come in as fragments while they fit, and open a sub-slide when they do not;
- code that fits under its explanation comes in as a fragment on the same slide (more code after
  it with `-`), longer code gets a sub-slide of its own;
- setup cells (only imports and `setup_notebook`, no output) and empty cells are skipped.

`build` exports each lecture with nbconvert's reveal.js exporter into one HTML file per lecture
that needs no network: reveal.js and MathJax come from their npm packages (`npm pack`, pinned by
version and checksum, cached in build/vendor/) and are copied next to the HTML files in
build/slides/_static/; jQuery, require.js and mermaid (CDN links in nbconvert's template) are left
out, and figures are inlined. The code of figure cells is hidden in the HTML (RISE shows it live).
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nbformat

from lokr_edu.course import lectures

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "slides_templates"
SLIDE_TYPES = ("slide", "subslide", "fragment", "-", "skip", "notes")
BUDGET = 30  # lines that fit on a 960×700 slide (code is set smaller; a longer slide scrolls)
FULL = 10_000  # a figure fills its slide
WRAP = 90  # characters per rendered line
OUTPUT_LINES = 14  # long text outputs scroll; count at most this many
NPM = {  # package: (version, npm integrity), both pinned; the files used from each
    "reveal.js": (
        "5.2.1",
        "sha512-r7//6mIM5p34hFiDMvYfXgyjXqGRta+/psd9YtytsgRlrpRzFv4RbH76TXd2qD+7ZPZEbpBDhdRhJaFgfQ7zNQ==",
        ["dist/reveal.css", "dist/reveal.js", "dist/theme/white.css", "dist/theme/fonts",
         "plugin/notes/notes.js", "LICENSE"],
    ),
    "mathjax": (
        "3.2.2",
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        ["es5/tex-svg-full.js", "LICENSE"],
    ),
}  # fmt: skip


# --- marking -----------------------------------------------------------------------------------


def _lines(text: str) -> int:
    return sum(max(1, -(-len(line) // WRAP)) for line in text.splitlines())


def _has_image(cell: nbformat.NotebookNode) -> bool:
    return any(
        any(key.startswith("image/") for key in output.get("data", {}))
        for output in cell.get("outputs", [])
    )


def _height(cell: nbformat.NotebookNode) -> int:
    """Roughly how many lines the cell takes on a slide."""
    if cell.cell_type != "code":
        return _lines(cell.source) + cell.source.count("$$") + 1
    if _has_image(cell):
        return FULL
    text = "".join(
        output.get("text", "") if isinstance(output.get("text"), str) else ""
        for output in cell.get("outputs", [])
    )
    text += "".join(
        output.get("data", {}).get("text/plain", "") for output in cell.get("outputs", [])
    )
    return _lines(cell.source) + min(_lines(text), OUTPUT_LINES) + 1


def _is_setup(cell: nbformat.NotebookNode) -> bool:
    """Imports and setup_notebook(...) only, and no output: nothing to show on a slide."""
    if cell.cell_type != "code" or cell.get("outputs"):
        return False
    try:
        body = ast.parse(cell.source).body
    except SyntaxError:
        return False
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("setup_notebook"):
            continue
        return False
    return bool(body)


def slide_types(nb: nbformat.NotebookNode) -> list[str]:
    """The slide type of every cell, by the rules in this module's docstring."""
    types: list[str] = []
    used = FULL  # lines used on the current slide; FULL: the next cell opens one
    previous = None  # the cell type of the last shown cell
    for cell in nb.cells:
        source = cell.source.strip()
        first = source.splitlines()[0] if source else ""
        height = _height(cell)
        if not source or _is_setup(cell):
            kind = "skip"
        elif cell.cell_type == "markdown" and (first.startswith(("# ", "## ")) or not types):
            kind = "slide"
        elif cell.cell_type == "markdown" and first.startswith("### "):
            kind = "subslide"
        elif cell.cell_type == "code" and _has_image(cell):
            kind = "subslide"
        elif cell.cell_type == "markdown":
            fits = previous == "markdown" and used + height <= BUDGET
            kind = "fragment" if fits else "subslide"
        elif used + height > BUDGET:
            kind = "subslide"
        else:  # the computation under its explanation comes in on the next click
            kind = "fragment" if previous == "markdown" else "-"
        if kind == "skip":
            types.append(kind)
            continue
        used = height if kind in ("slide", "subslide") else used + height
        previous = cell.cell_type
        types.append(kind)
    return types


def mark(nb: nbformat.NotebookNode, keep: bool = False) -> int:
    """Set slideshow.slide_type on every cell; return how many cells changed."""
    changed = 0
    for cell, kind in zip(nb.cells, slide_types(nb), strict=True):
        current = cell.metadata.get("slideshow", {}).get("slide_type")
        if keep and current in SLIDE_TYPES:
            continue
        if current != kind:
            cell.metadata["slideshow"] = {"slide_type": kind}
            changed += 1
    return changed


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What keeps a notebook from reading as slides: unmarked cells, no opening slide."""
    found = []
    for index, cell in enumerate(nb.cells):
        kind = cell.metadata.get("slideshow", {}).get("slide_type")
        if kind not in SLIDE_TYPES:
            found.append(f"cell {index + 1}: slide_type {kind!r}")
    shown = [c for c in nb.cells if c.metadata.get("slideshow", {}).get("slide_type") != "skip"]
    if shown and shown[0].metadata.get("slideshow", {}).get("slide_type") != "slide":
        found.append("the first shown cell does not open a slide")
    return found


# --- building ----------------------------------------------------------------------------------


def _npm_package(name: str, vendor: Path) -> Path:
    """The package's files, unpacked from `npm pack NAME@VERSION` (checked), cached in vendor/."""
    version, integrity, _ = NPM[name]
    folder = vendor / f"{name}-{version}"
    if (folder / "package.json").exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            f"make slides needs {name} {version} from the npm registry, and `npm` is not "
            "installed: on Debian/Ubuntu `apt-get install npm` (or install Node.js), then rerun"
        )
    vendor.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", f"{name}@{version}", "--silent", "--pack-destination", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        algorithm, digest = integrity.split("-", 1)
        got = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
        if got != digest:
            raise SystemExit(f"{tarball.name}: checksum {got} is not the pinned {digest}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(unpacked, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(unpacked / "package", folder)
    return folder


def vendor_static(out: Path, vendor: Path) -> Path:
    """Copy the reveal.js and MathJax files the slides load into out/_static/."""
    static = out / "_static"
    for name, (_, _, files) in NPM.items():
        source = _npm_package(name, vendor)
        for relative in files:
            target = static / name / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if (source / relative).is_dir():
                shutil.copytree(source / relative, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source / relative, target)
    return static


def export(path: Path, out: Path, nb: nbformat.NotebookNode | None = None) -> Path:
    """One lecture as out/NN_topic.slides.html, loading reveal.js and MathJax from _static/."""
    from nbconvert import SlidesExporter

    nb = nb if nb is not None else nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and _has_image(cell):
            cell.metadata["transient"] = {"remove_source": True}  # the figure fills the slide
    exporter = SlidesExporter(
        template_name="lokr_slides",
        extra_template_basedirs=[str(TEMPLATES)],
        reveal_url_prefix="_static/reveal.js",
        reveal_theme="white",
        reveal_transition="none",
        reveal_number="c/t",
        mathjax_url="_static/mathjax/es5/tex-svg-full.js",
        jquery_url="",
        require_js_url="",
        mermaid_js_url="",
    )
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
    target = out / f"{path.stem}.slides.html"
    target.write_text(html, encoding="utf-8")
    return target


def build(paths: list[Path], out: Path, vendor: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    vendor_static(out, vendor)
    written = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if problems(nb):
            print(f"{path} is not marked for slides: using the rules (python tools/slides.py mark)")
            mark(nb, keep=True)
        written.append(export(path, out, nb))
        print(f"wrote {written[-1]}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/slides.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    marking = commands.add_parser("mark", help="set slideshow.slide_type on every cell")
    marking.add_argument("paths", nargs="+", type=Path)
    marking.add_argument("--keep", action="store_true", help="keep slide types already set")
    checking = commands.add_parser("check", help="exit 1 if a lecture cell has no slide type")
    checking.add_argument("paths", nargs="*", type=Path)
    building = commands.add_parser("build", help="write build/slides/NN_*.slides.html")
    building.add_argument("paths", nargs="*", type=Path)
    building.add_argument("--out", type=Path, default=REPO / "build" / "slides")
    building.add_argument("--vendor", type=Path, default=REPO / "build" / "vendor")
    args = parser.parse_args(argv)

    if args.command == "mark":
        for path in args.paths:
            nb = nbformat.read(path, as_version=4)
            changed = mark(nb, keep=args.keep)
            nbformat.write(nb, path)
            kinds = [c.metadata["slideshow"]["slide_type"] for c in nb.cells]
            print(
                f"{path}: {changed} cells changed; {kinds.count('slide')} slides, "
                f"{kinds.count('subslide')} sub-slides, {kinds.count('fragment')} fragments, "
                f"{kinds.count('skip')} skipped"
            )
        return 0
    if args.command == "check":
        failed = 0
        for path in args.paths or lectures():
            found = problems(nbformat.read(path, as_version=4))
            if found:
                failed = 1
                more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
                print(f"{path}: {'; '.join(found[:3])}{more}: run python tools/slides.py mark")
        return failed
    build(args.paths or lectures(), args.out, args.vendor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
