"""Execute the course's notebooks: `make course` for readers, `--inplace` for authors.

    python -m lokr_edu.course run                  # every lecture -> build/ (executed + HTML)
    python -m lokr_edu.course run notebooks/01_*.ipynb
    python -m lokr_edu.course execute --inplace solutions/01_kronecker_product_solutions.ipynb

`run` writes each lecture's time (whole seconds), with the machine it ran on, into the results
file the syllabus reads (`lokr_edu.syllabus.TIMES_FILE`; `--times` for another): only the
lectures it ran, and only those that ran to the end.

`execute --inplace` is how an author commits outputs: a clean top-to-bottom run in a fresh kernel
of the current environment, then metadata trimmed to kernel + language, so diffs show content.

The course tooling (this module, `lokr_edu.exercises`, `lokr_edu.syllabus`, `lokr_edu.grade`)
works on the files of a checkout of the lokr-edu repository: notebooks/, solutions/, exercises/.
It finds them through one function, `repository_root()`, which says so clearly when lokr_edu was
installed as a plain package, without the repository around it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_core.paths import jupyter_runtime_dir
from traitlets.config import Config

PACKAGE = Path(__file__).resolve().parent  # lokr_edu/; the repository root is its parent
CHECKOUT_MARKERS = ("pyproject.toml", "notebooks", "solutions", "exercises")
KERNEL_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # in tracebacks from the kernel
TIMES_ABOUT = (
    "Each lecture's run time in whole seconds, written by `python -m lokr_edu.course run` "
    "(make course) with the machine it ran on; lokr_edu.syllabus reads it."
)
MAX_SOCKET_PREFIX = 96  # + "-<n>": under the 104 bytes of a macOS Unix socket path (108 Linux)

__all__ = [
    "NotACheckoutError",
    "repository_root",
    "clean_metadata",
    "execute_notebook",
    "kernel_config",
    "lectures",
    "machine",
    "record_time",
    "main",
]


class NotACheckoutError(RuntimeError):
    """lokr_edu runs outside a checkout of the repository, so the course's files are not there."""


def repository_root(package: Path | None = None) -> Path:
    """The checkout of the lokr-edu repository that lokr_edu was imported from.

    That is the folder above the package (`package`, default lokr_edu/ itself) when it holds the
    repository's pyproject.toml, notebooks/, solutions/ and exercises/: a clone, installed with
    `make install` (`pip install -e .`), or run from the clone. A plain `pip install` puts
    lokr_edu alone into site-packages, where there are no notebooks to run, build or grade: that
    is a NotACheckoutError saying what to do instead.
    """
    root = (package or PACKAGE).parent
    missing = [name for name in CHECKOUT_MARKERS if not (root / name).exists()]
    if missing:
        raise NotACheckoutError(
            f"the course tooling needs a checkout of the lokr-edu repository, but lokr_edu was "
            f"imported from {root / (package or PACKAGE).name}, and {root} has no "
            f"{', '.join(missing)} (lokr_edu was installed as a package). Clone the repository, "
            "run `make install` in the clone (an editable install), and run this there."
        )
    return root


def clean_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep only kernel and language in the notebook metadata, and only tags and the slideshow
    marks (`tools/slides.py`) in cell metadata."""
    nb.metadata = nbformat.from_dict(KERNEL_METADATA)
    for cell in nb.cells:
        kept = {key: cell.metadata[key] for key in ("tags", "slideshow") if cell.metadata.get(key)}
        cell.metadata = nbformat.from_dict(kept)
    return nb


def kernel_config() -> Config:
    """How the kernel talks to us: over Unix sockets (ZeroMQ "ipc") where there are any.

    Over the default TCP, ipykernel warns on every start that its traffic is unencrypted
    ("Kernel is running over TCP without encryption"), once per chapter of `make course`. Its
    advice is IPC: sockets in Jupyter's runtime folder, which only this user can open; nothing
    else is silenced. The socket path must be absolute: the kernel runs in the notebook's
    folder. Windows has no Unix sockets for ZeroMQ, and a socket path has at most about 100
    characters (104 on macOS): TCP in both cases.
    """
    runtime = Path(jupyter_runtime_dir())
    sockets = runtime / f"lokr-edu-{os.getpid()}-{secrets.token_hex(4)}-ipc"  # + "-<n>" each
    if sys.platform == "win32" or len(str(sockets)) > MAX_SOCKET_PREFIX:
        return Config()
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Config({"KernelManager": {"transport": "ipc", "ip": str(sockets)}})


def execute_notebook(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in a fresh python3 kernel of this environment.

    A cell's printed lines can arrive in several stream messages; they are joined into one
    output per stream, so re-executing a notebook does not change its file when its output
    does not change."""
    from nbclient import NotebookClient
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        config=kernel_config(),
    )
    client.execute()
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    return clean_metadata(nb), time.perf_counter() - start


def lectures() -> list[Path]:
    """notebooks/NN_*.ipynb of this checkout, in course order."""
    return sorted((repository_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def machine() -> dict[str, object]:
    """What a time was measured on: the cores this process may use, torch's threads (a kernel
    started from here has the same), torch's version."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def record_time(notebook: Path, seconds: float, times: Path) -> str | None:
    """Write a lecture's time into the results file `times`; other entries stay as they are.

    A lecture is notebooks/NN_topic.ipynb; its entry is keyed "notebooks/NN_topic.ipynb", as in
    the syllabus. Any other notebook (a solution, a copy elsewhere) is not recorded: None. A
    missing file is started. The file is replaced in one step (a new file, then `os.replace`),
    so a reader never sees half of it, and an interrupted run leaves the old one.
    """
    path = notebook.resolve()
    if path.parent.name != "notebooks" or not re.fullmatch(r"\d\d_\w+\.ipynb", path.name):
        return None
    key = f"notebooks/{path.name}"
    data = json.loads(times.read_text(encoding="utf-8")) if times.exists() else {}
    mode = times.stat().st_mode & 0o777 if times.exists() else 0o644  # a temporary file's is 0o600
    data = {"about": TIMES_ABOUT, "chapters": data.get("chapters", {})}
    entry = {"seconds": round(seconds), "date": datetime.date.today().isoformat(), **machine()}
    data["chapters"] = dict(sorted((data["chapters"] | {key: entry}).items()))
    times.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=times.parent, prefix=f".{times.name}.", delete=False
    ) as file:
        try:
            file.write(json.dumps(data, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
            os.chmod(file.name, mode)
        except BaseException:
            file.close()
            os.unlink(file.name)
            raise
    os.replace(file.name, times)
    return key


def run_course(paths: list[Path], out: Path, times: Path | None = None) -> int:
    """Execute each notebook into out/notebooks and render it to out/html; print a summary.

    A notebook that fails (an error in a cell, a cell past its timeout, a kernel that died)
    does not stop the others; the summary names the first that broke. Each lecture that ran
    has its time written into `times` (default: the syllabus' results file, `TIMES_FILE`).
    """
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from nbconvert import HTMLExporter

    from lokr_edu.syllabus import TIMES_FILE

    times = times or TIMES_FILE
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    (out / "html").mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    recorded: list[str] = []
    for path in paths:
        try:
            nb, seconds = execute_notebook(path)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            failures.append(path.name)
            lines = ANSI_COLOR.sub("", str(error)).strip().splitlines() or [type(error).__name__]
            # an error's last line names it; a timeout's first line says after how long
            first_line = (lines[-1] if isinstance(error, CellExecutionError) else lines[0])[:120]
            print(f"{path.stem:<32} FAILED   {first_line}", flush=True)
            continue
        nbformat.write(nb, out / "notebooks" / path.name)
        html, _ = HTMLExporter().from_notebook_node(nb)
        (out / "html" / f"{path.stem}.html").write_text(html, encoding="utf-8")
        print(f"{path.stem:<32} ok       {seconds:6.1f} s", flush=True)
        if key := record_time(path, seconds, times):
            recorded.append(key)
    if recorded:
        print(f"{len(recorded)} lecture time(s) written to {times}")
    print(f"{len(paths) - len(failures)}/{len(paths)} chapters ran; HTML in {out / 'html'}")
    if failures:
        print(f"first to break: {failures[0]}")
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
    run.add_argument("--out", type=Path, help="default: build/ of this checkout")
    run.add_argument(
        "--times", type=Path, help="results file for the lectures' times (default: the syllabus')"
    )
    execute = commands.add_parser("execute", help="execute notebooks and save them in place")
    execute.add_argument("paths", nargs="+", type=Path)
    execute.add_argument("--inplace", action="store_true", required=True)
    args = parser.parse_args(argv)

    if args.command == "run":
        try:
            out = args.out or repository_root() / "build"
            paths = args.paths or lectures()
        except NotACheckoutError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        return run_course(paths, out, args.times)
    for path in args.paths:
        nb, seconds = execute_notebook(path)
        nbformat.write(nb, path)
        print(f"{path}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
