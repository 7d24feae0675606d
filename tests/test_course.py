"""lokr_edu.course: `make course` prints the course's own lines, not the kernel's chatter."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from lokr_edu import course, syllabus

SETUP = Path(__file__).resolve().parent.parent / "notebooks" / "00_setup.ipynb"


def test_running_a_chapter_prints_no_kernel_transport_warning(tmp_path) -> None:
    # chapter 00 is the cheapest (~10 s); a copy, so that a stray socket file would show
    notebook = shutil.copy(SETUP, tmp_path / SETUP.name)
    # a runtime folder of its own, with a path short enough for a Unix socket (tmp_path is not)
    runtime = Path(tempfile.mkdtemp(prefix="rt-"))
    result = subprocess.run(
        [sys.executable, "-m", "lokr_edu.course", "run", "--out", str(tmp_path / "build")]
        + [str(notebook)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"JUPYTER_RUNTIME_DIR": str(runtime)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "00_setup" in output and " ok " in output
    assert "without encryption" not in output and "WARNING" not in output, output
    # the kernel's sockets were in the runtime folder, and are gone with the kernel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_setup.ipynb", "build"]
    assert list(runtime.iterdir()) == []
    runtime.rmdir()


def test_the_kernel_talks_over_unix_sockets_at_an_absolute_path(monkeypatch) -> None:
    config = course.kernel_config()["KernelManager"]
    assert config["transport"] == "ipc" and Path(config["ip"]).is_absolute()
    assert course.kernel_config()["KernelManager"]["ip"] != config["ip"]  # one per kernel
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", "/" + "deep/" * 20)  # too long a socket path
    assert "KernelManager" not in course.kernel_config()  # TCP, the default
    monkeypatch.delenv("JUPYTER_RUNTIME_DIR")
    monkeypatch.setattr(course.sys, "platform", "win32")  # no Unix sockets
    assert "KernelManager" not in course.kernel_config()


def test_the_summary_names_the_first_notebook_that_broke(tmp_path, monkeypatch, capsys) -> None:
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    def execute(path: Path):  # no kernel: what nbclient raises, per notebook
        if path.stem == "02_error":
            colored = "traceback\n\x1b[31mZeroDivisionError\x1b[39m: by zero"
            raise CellExecutionError(colored, "ZeroDivisionError", "by zero")
        if path.stem == "03_dead":
            raise DeadKernelError("Kernel died")
        if path.stem == "05_slow":
            cell = nbformat.v4.new_code_cell("train()")
            raise CellTimeoutError.error_from_timeout_and_cell("timed out", 600, cell)
        return nbformat.v4.new_notebook(), 1.0

    monkeypatch.setattr(course, "execute_notebook", execute)
    names = ("01_fine", "02_error", "03_dead", "04_fine", "05_slow")
    assert course.run_course([Path(f"{name}.ipynb") for name in names], tmp_path) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:5]] == [
        ["01_fine", "ok"],
        ["02_error", "FAILED"],
        ["03_dead", "FAILED"],
        ["04_fine", "ok"],
        ["05_slow", "FAILED"],
    ]
    assert lines[1].endswith("FAILED   ZeroDivisionError: by zero")  # without colour codes
    assert lines[2].endswith("FAILED   Kernel died")
    assert lines[4].endswith(
        "FAILED   A cell timed out while it was being executed, after 600 seconds."
    )
    assert lines[-2:] == [
        f"2/5 chapters ran; HTML in {tmp_path / 'html'}",
        "first to break: 02_error.ipynb",
    ]


def test_running_a_lecture_writes_its_time_into_the_results_file(tmp_path) -> None:
    """`course run` on one tiny lecture, in a real kernel: its entry in a copy of the committed
    results file is replaced by the measured time and this machine; every other entry stays."""
    import torch

    lecture = tmp_path / "notebooks" / "01_tiny.ipynb"
    lecture.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), lecture)
    committed = syllabus.TIMES_FILE.read_bytes()
    chapters = json.loads(committed)["chapters"]
    stale = {"seconds": 999, "date": "2000-01-01", "cores": 0, "torch_threads": 0, "torch": "0"}
    times = tmp_path / "chapter_times.json"
    times.write_text(json.dumps({"chapters": chapters | {"notebooks/01_tiny.ipynb": stale}}))
    mode = times.stat().st_mode

    argv = ["run", "--out", str(tmp_path / "build"), "--times", str(times), str(lecture)]
    assert course.main(argv) == 0
    written = json.loads(times.read_text())
    entry = written["chapters"].pop("notebooks/01_tiny.ipynb")
    assert written == {"about": course.TIMES_ABOUT, "chapters": chapters}
    assert isinstance(entry.pop("seconds"), int) and entry["date"] != stale["date"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert entry == {
        "date": datetime.date.today().isoformat(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["build", "chapter_times.json", "notebooks"]  # no temporary file stays
    assert times.stat().st_mode == mode  # not a temporary file's 0o600
    assert syllabus.TIMES_FILE.read_bytes() == committed  # the committed file is not touched


def test_only_lectures_that_ran_to_the_end_get_a_time(tmp_path, monkeypatch, capsys) -> None:
    from nbclient.exceptions import CellExecutionError

    seconds = {"01_fine": 12.4, "02_error": None, "01_fine_solutions": 3.0, "03_copy": 5.0}

    def execute(path: Path):  # no kernel: a time per notebook, or the error of a failing cell
        if seconds[path.stem] is None:
            raise CellExecutionError("traceback", "ZeroDivisionError", "by zero")
        return nbformat.v4.new_notebook(), seconds[path.stem]

    monkeypatch.setattr(course, "execute_notebook", execute)
    times = tmp_path / "times" / "chapter_times.json"  # missing: the first run starts it
    lectures = tmp_path / "notebooks"
    fine, error = lectures / "01_fine.ipynb", lectures / "02_error.ipynb"
    assert course.run_course([fine], tmp_path / "build", times) == 0
    assert capsys.readouterr().out.splitlines()[-2] == f"1 lecture time(s) written to {times}"
    first = json.loads(times.read_text())["chapters"]
    assert list(first) == ["notebooks/01_fine.ipynb"]
    assert first["notebooks/01_fine.ipynb"]["seconds"] == 12

    seconds["01_fine"] = 20.6
    old = {"seconds": 7, "date": "2000-01-01", "cores": 2, "torch_threads": 2, "torch": "2.4.0"}
    times.write_text(json.dumps({"chapters": first | {"notebooks/02_error.ipynb": old}}))
    others = [tmp_path / "solutions" / "01_fine_solutions.ipynb", tmp_path / "03_copy.ipynb"]
    assert course.run_course([fine, error, *others], tmp_path / "build", times) == 1
    second = json.loads(times.read_text())["chapters"]
    assert list(second) == ["notebooks/01_fine.ipynb", "notebooks/02_error.ipynb"]
    assert second["notebooks/01_fine.ipynb"]["seconds"] == 21  # whole seconds
    assert second["notebooks/02_error.ipynb"] == old  # it broke: its last time stays


def test_the_repository_root_is_this_checkout_and_a_plain_install_is_told_so(tmp_path) -> None:
    root = Path(__file__).resolve().parent.parent
    assert course.repository_root() == root
    with pytest.raises(course.NotACheckoutError, match="needs a checkout of the lokr-edu") as e:
        course.repository_root(tmp_path / "site-packages" / "lokr_edu")
    message = str(e.value)
    assert "has no pyproject.toml, notebooks, solutions, exercises" in message
    assert "make install" in message


def test_the_course_tooling_outside_a_checkout_fails_with_that_message(tmp_path) -> None:
    """lokr_edu copied alone into a site-packages folder, as a plain pip install leaves it: the
    package imports, and each tool says it needs a checkout instead of failing on a missing file
    (or, worse, finding no notebooks and reporting success)."""
    site = tmp_path / "site-packages"
    source = Path(course.__file__).parent
    # the package data a plain install has, less the large weights the course tooling never reads
    ignored = shutil.ignore_patterns("*.safetensors", "digits_sd", "__pycache__")
    shutil.copytree(source, site / "lokr_edu", ignore=ignored)
    env = os.environ | {"PYTHONPATH": str(site)}
    commands = {
        "course": ["-m", "lokr_edu.course", "run"],
        "exercises": ["-m", "lokr_edu.exercises", "check"],
        "grade": ["-m", "lokr_edu.grade", str(tmp_path)],
        "syllabus": ["-c", "import lokr_edu.syllabus as s; s.markdown_table()"],
    }
    for name, command in commands.items():
        done = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert done.returncode != 0, name
        assert "needs a checkout of the lokr-edu repository" in done.stderr, (name, done.stderr)
        assert str(site / "lokr_edu") in done.stderr, name
        if name != "syllabus":  # a library call raises; the commands say it in one message
            assert "Traceback" not in done.stderr, (name, done.stderr)
