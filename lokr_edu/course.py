"""Execute the course's notebooks: `make course` for readers, `--inplace` for authors.

    python -m lokr_edu.course run                  # every lecture -> build/ (executed + HTML)
    python -m lokr_edu.course run notebooks/01_*.ipynb
    python -m lokr_edu.course execute --inplace solutions/01_kronecker_product_solutions.ipynb

`execute --inplace` is how an author commits outputs: a clean top-to-bottom run in a fresh kernel
of the current environment, then metadata trimmed to kernel + language, so diffs show content.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
KERNEL_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}

__all__ = ["clean_metadata", "execute_notebook", "main"]


def clean_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep only kernel and language in the notebook metadata, and only tags and the slideshow
    marks (`tools/slides.py`) in cell metadata."""
    nb.metadata = nbformat.from_dict(KERNEL_METADATA)
    for cell in nb.cells:
        kept = {key: cell.metadata[key] for key in ("tags", "slideshow") if cell.metadata.get(key)}
        cell.metadata = nbformat.from_dict(kept)
    return nb


def execute_notebook(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in a fresh python3 kernel of this environment."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    client.execute()
    return clean_metadata(nb), time.perf_counter() - start


def _lectures() -> list[Path]:
    return sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run_course(paths: list[Path], out: Path) -> int:
    """Execute each notebook into out/notebooks and render it to out/html; print a summary."""
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    (out / "html").mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in paths:
        try:
            nb, seconds = execute_notebook(path)
        except CellExecutionError as error:
            failures += 1
            first_line = str(error).strip().splitlines()[-1][:120]
            print(f"{path.stem:<32} FAILED   {first_line}", flush=True)
            continue
        nbformat.write(nb, out / "notebooks" / path.name)
        html, _ = HTMLExporter().from_notebook_node(nb)
        (out / "html" / f"{path.stem}.html").write_text(html, encoding="utf-8")
        print(f"{path.stem:<32} ok       {seconds:6.1f} s", flush=True)
    print(f"{len(paths) - failures}/{len(paths)} chapters ran; HTML in {out / 'html'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokr_edu.course",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute lectures into build/ with HTML renderings")
    run.add_argument("paths", nargs="*", type=Path)
    run.add_argument("--out", type=Path, default=REPO / "build")
    execute = commands.add_parser("execute", help="execute notebooks and save them in place")
    execute.add_argument("paths", nargs="+", type=Path)
    execute.add_argument("--inplace", action="store_true", required=True)
    args = parser.parse_args(argv)

    if args.command == "run":
        return run_course(args.paths or _lectures(), args.out)
    for path in args.paths:
        nb, seconds = execute_notebook(path)
        nbformat.write(nb, path)
        print(f"{path}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
