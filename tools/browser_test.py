"""The course in JupyterLab, in a real browser: `make test-browser` (opt-in, not in `make test`).

Starts JupyterLab from .venv on 127.0.0.1 (a free port, a random token) over a scratch copy of
chapter 01 and its exercises, and drives it from headless Chromium: Debian's `chromium` package,
driven by Playwright from PyPI (`executable_path`; Playwright never downloads a browser here).

1. chapter 01: Run All Cells; no error or stderr output, and every figure is an image that loaded;
2. exercise 01, what a student sees: Run All Cells stops at the first exercise, blank, which shows
   one line (`✗ not done yet: …`); a wrong answer typed into that cell shows one line saying what
   is wrong; a crash in the student's function shows the student's lines; never a frame of the
   checks' own code (lokr_edu/checks);
3. RISE: chapter 01 as a slideshow (jupyterlab-rise, no network), on a title and a figure slide.

Screenshots go to build/screenshots/. What it needs, and what it does when that is missing:
- chromium: `apt-get install -y chromium` (it stops and prints that command);
- playwright: installed into .venv from PyPI by this script when it is missing
  (the same as `.venv/bin/python -m pip install -e '.[browser]'`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "build" / "screenshots"
CHAPTER = "01_kronecker_product.ipynb"
EXERCISE = "01_kronecker_product_exercises.ipynb"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
SETTINGS = {  # JupyterLab user settings for a quiet, fully rendered notebook
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise SystemExit(
        "make test-browser needs Debian's Chromium: run `apt-get update && apt-get install -y "
        "chromium` (as root), then `make test-browser` again"
    )


def ensure_playwright() -> None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("installing playwright into .venv from PyPI (no browser download) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints.txt")]
            + ["playwright>=1.40"],
            check=True,
            env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """JupyterLab from this environment, serving `root` on 127.0.0.1 only."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.port, self.token = free_port(), secrets.token_hex(16)
        settings = scratch / "settings"
        for name, value in SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.log = (scratch / "jupyterlab.log").open("w")
        jupyter = Path(sys.executable).with_name("jupyter")
        self.process = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}"]
            + [f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}"]
            + [f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={scratch}"]
            + ["--ServerApp.port_retries=0"]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
                "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            },
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"JupyterLab exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}") as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise SystemExit(f"JupyterLab did not start in 120 s; see {self.log.name}")

    def page(self, path: str) -> str:
        return f"{self.url}/{path}?token={self.token}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def open_notebook(page, lab: Lab, name: str) -> None:
    page.goto(lab.page(f"lab/tree/{name}"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
    # the kernel is ready when the status bar says so
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"ipykernel\) \| Idle")).wait_for(
        timeout=120_000
    )
    time.sleep(2)


def run_all(page) -> None:
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def wait_until_done(page, timeout_s: int) -> None:
    """Until a cell has run, no cell is queued or running ([*]) and the kernel is idle again."""
    deadline = time.monotonic() + timeout_s
    page.wait_for_function(
        """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) '
                  + '.jp-CodeCell .jp-InputPrompt')]
                 .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""",
        timeout=60_000,
    )
    while time.monotonic() < deadline:
        busy = page.evaluate(
            """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) '
                      + '.jp-CodeCell .jp-InputPrompt')].some(p => p.textContent.includes('*'))"""
        )
        idle = page.locator(
            ".jp-NotebookPanel:not(.lm-mod-hidden) "
            ".jp-Notebook-ExecutionIndicator[data-status='idle']"
        ).count()
        if not busy and idle:
            return
        time.sleep(1)
    raise AssertionError(f"the notebook still runs after {timeout_s} s")


def check_chapter(page, lab: Lab) -> None:
    open_notebook(page, lab, CHAPTER)
    page.screenshot(path=SHOTS / "01_chapter_opened.png")
    run_all(page)
    wait_until_done(page, 300)
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden) "
    prompts = page.locator(panel + ".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    unrun = [p for p in prompts if not re.search(r"\[\d+\]", p)]
    assert prompts and not unrun, f"cells not run: {unrun[:3]} of {len(prompts)}"
    errors = page.locator(
        panel + "[data-mime-type='application/vnd.jupyter.stderr'], " + panel + ".jp-mod-error"
    )
    assert errors.count() == 0, f"error output: {errors.first.inner_text()[:500]}"
    images = page.locator(panel + ".jp-RenderedImage img")
    expected = _image_outputs(REPO / "notebooks" / CHAPTER)
    assert images.count() == expected, f"{images.count()} figures shown, {expected} expected"
    for index in range(images.count()):
        image = images.nth(index)
        image.scroll_into_view_if_needed()
        size = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
        assert size[0] and size[1] > 100 and size[2] > 100, f"figure {index + 1} is {size}"
    images.first.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "02_chapter_figure.png")
    print(f"ok  chapter 01: {len(prompts)} cells ran, no errors, {expected} figures rendered")


def _image_outputs(path: Path) -> int:
    nb = json.loads(path.read_text("utf-8"))
    return sum(
        any(k.startswith("image/") for k in output.get("data", {}))
        for cell in nb["cells"]
        for output in cell.get("outputs", [])
    )


EXERCISE_CELL = "# Exercise 1.1: the Kronecker product"
BLANK = "✗ not done yet: Exercise 1.1: the Kronecker product (replace this line)"
WRONG = """# Exercise 1.1: the Kronecker product
def my_kron(A, B):
    return torch.zeros(A.shape[0] * B.shape[0], A.shape[1] * B.shape[1], dtype=A.dtype)


checks.check_kron(my_kron)"""
CRASH = """# Exercise 1.1: the Kronecker product
def my_kron(A, B):
    return A * "B"


checks.check_kron(my_kron)"""
CHECKS_CODE = "lokr_edu/checks"  # the checks' own files: never in what the student sees


def shown_lines(output) -> list[str]:
    """The non-empty lines of an output, as the student reads them."""
    return [line for line in output.inner_text().splitlines() if line.strip()]


def run_in_place(page, cell, source: str, expect: str):
    """Type `source` into `cell` as a student would, run it, and return its error output."""
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(source)  # as pasted: no auto-indent or closing brackets
    page.keyboard.press("Control+Enter")
    output = cell.locator("[data-mime-type='application/vnd.jupyter.stderr']")
    output.filter(has_text=expect).wait_for(timeout=60_000)
    return output


def check_exercise(page, lab: Lab) -> None:
    open_notebook(page, lab, EXERCISE)
    run_all(page)  # stops at the first cell that raises: exercise 1.1, blank
    wait_until_done(page, 120)
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden) "
    errors = page.locator(panel + "[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 1, f"{errors.count()} error outputs, expected 1"
    blank = shown_lines(errors.first)
    assert blank == [BLANK], f"the blank exercise shows {blank}"
    errors.first.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "03_exercise_blank.png")
    print(f"ok  exercise 01: the blank exercise 1.1 shows one line, {BLANK!r}")

    cell = page.locator(panel + ".jp-CodeCell", has_text=EXERCISE_CELL).first
    wrong = shown_lines(run_in_place(page, cell, WRONG, "kron is wrong"))
    assert len(wrong) == 1 and wrong[0].startswith("✗ kron is wrong for A 2×3 and B 3×4"), wrong
    assert not any(CHECKS_CODE in line for line in wrong), wrong
    page.screenshot(path=SHOTS / "04_exercise_wrong.png")
    print(f"ok  exercise 01: a wrong answer shows one line, {wrong[0][:60]!r}…")

    crash = shown_lines(run_in_place(page, cell, CRASH, "kron raised TypeError"))
    assert not any(CHECKS_CODE in line for line in crash), crash
    assert any("in my_kron(A, B)" in line for line in crash), crash  # the student's frame
    assert any('return A * "B"' in line for line in crash), crash  # the student's line
    assert crash[-1].startswith("✗ kron raised TypeError for A 2×3 and B 3×4"), crash
    page.screenshot(path=SHOTS / "05_exercise_crash.png")
    print(
        f"ok  exercise 01: a crash in the student's function shows their lines ({len(crash)}) "
        "and the check's one line, no frame of lokr_edu/checks"
    )


def check_slideshow(page, lab: Lab) -> None:
    page.goto(lab.page(f"rise/{CHAPTER}"))
    page.wait_for_selector(".reveal .slides section.present", timeout=120_000)
    time.sleep(3)
    title = page.locator(".reveal .slides section.present").first.inner_text()
    assert "Kronecker product" in title, title[:200]
    page.screenshot(path=SHOTS / "06_slideshow_title.png")
    for _ in range(60):  # forward until a slide with a figure
        page.keyboard.press("Space")
        time.sleep(0.4)
        figure = page.locator(".reveal .slides section.present:not(.stack) .jp-RenderedImage img")
        if figure.count() and figure.first.is_visible():
            break
    else:
        raise AssertionError("no figure in the first 60 steps of the slideshow")
    time.sleep(1)
    page.screenshot(path=SHOTS / "07_slideshow_figure.png")
    print("ok  RISE: the slideshow starts on the title slide and shows a figure slide")


def main() -> int:
    executable = chromium()
    ensure_playwright()
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    work = REPO / "build" / "browser"  # scratch: the notebooks' copies, settings, the server log
    shutil.rmtree(work, ignore_errors=True)
    root, scratch = work / "course", work / "scratch"
    root.mkdir(parents=True)
    scratch.mkdir()
    if True:
        shutil.copy(REPO / "notebooks" / CHAPTER, root / CHAPTER)  # a copy: autosave is harmless
        shutil.copy(REPO / "exercises" / EXERCISE, root / EXERCISE)
        start = time.perf_counter()
        lab = Lab(root, scratch)
        print(f"JupyterLab on {lab.url} (127.0.0.1 only), Chromium {executable}", flush=True)
        failed = False
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=executable,
                    headless=True,
                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
                )
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                for check in (check_chapter, check_exercise, check_slideshow):
                    try:
                        check(page, lab)
                    except Exception as error:  # report every check, then fail
                        failed = True
                        name = check.__name__.removeprefix("check_")
                        page.screenshot(path=SHOTS / f"failed_{name}.png")
                        print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
                browser.close()
        finally:
            lab.stop()
        shots = sorted(p.name for p in SHOTS.glob("*.png"))
        print(f"screenshots in {SHOTS}: {', '.join(shots)}")
        print(f"{'FAILED' if failed else 'passed'} in {time.perf_counter() - start:.0f} s")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
