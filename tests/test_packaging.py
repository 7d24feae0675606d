"""What a user installs: the license, the dependencies and their bounds, the extras, the console
scripts, the version, and an import without side effects."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import logging
import pkgutil
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import lokr_edu
from lokr_edu import scripts
from lokr_edu.kron_apply import compute_dtype

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
# The course tooling: the only modules of the package that may import the [course] extra.
COURSE_TOOLING = {"lokr_edu.course", "lokr_edu.exercises", "lokr_edu.grade"}


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_the_license_file_is_the_mit_license_pyproject_names() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the lokr-edu authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    # an SPDX string in `license` is read from setuptools 77 on (PEP 639)
    setuptools = next(
        Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")
    )
    assert str(setuptools.specifier) == ">=77"


# The torch APIs newer than 2.1 that the package calls, and the release that brought each:
# torch.amp.GradScaler(device) in 2.3; the device_type forms of torch.get_autocast_dtype and
# torch.is_autocast_enabled (pytorch/pytorch#124359, #124479) and torch.amp.is_autocast_available
# (#124938) in 2.4. On 2.3, torch.is_autocast_enabled("cpu") raises TypeError and the two
# others do not exist.
NEWER_TORCH_APIS = {
    "torch.amp.GradScaler": Version("2.3"),
    "torch.get_autocast_dtype": Version("2.4"),
    "torch.is_autocast_enabled": Version("2.4"),  # with a device_type argument
    "torch.amp.is_autocast_available": Version("2.4"),
}


def _torch_calls() -> set[str]:
    """Every `torch.x.y(...)` call spelled out in the package, as "torch.x.y"."""
    calls = set()
    for path in (REPO / "lokr_edu").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch."):
                name = ast.unparse(node.func)
                if name != "torch.is_autocast_enabled" or node.args:
                    calls.add(name)
    return calls


def test_the_torch_lower_bound_is_the_newest_api_the_package_calls() -> None:
    torch_requirement = next(
        Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"
    )
    bound = Version(str(torch_requirement.specifier).removeprefix(">="))
    used = {api: version for api, version in NEWER_TORCH_APIS.items() if api in _torch_calls()}
    assert set(used) == set(NEWER_TORCH_APIS)  # the table above lists what the code calls
    assert bound == max(used.values()) == Version("2.4")
    installed = Version(torch.__version__).release
    assert installed >= bound.release, f"torch {torch.__version__} is older than torch>={bound}"


def test_the_apis_behind_the_torch_bound() -> None:
    """Each call that needs torch 2.4, run: on an older torch this test fails at that call."""
    x = torch.ones(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.amp.is_autocast_available("cpu") and torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert compute_dtype(x) == torch.bfloat16  # the dtype F.linear would run in
        assert compute_dtype(x.long()) == torch.int64  # autocast leaves integers alone
        assert compute_dtype(torch.ones(2, 3, device="meta")) == torch.float32  # no autocast
    assert not torch.amp.is_autocast_available("meta")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # diffusion.train's, without fp16
    loss = torch.tensor(2.5)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0


def _third_party_imports(source: str) -> set[str]:
    """The top-level names of every module `source` imports, outside the standard library,
    except an optional one (imported in a `try` whose `except ImportError` carries on)."""
    tree = ast.parse(source)
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            handler.type is not None
            and {"ImportError", "ModuleNotFoundError"}
            & set(re.findall(r"\w+", ast.unparse(handler.type)))
            for handler in node.handlers
        ):
            optional |= {id(n) for statement in node.body for n in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lokr_edu", "__future__"}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _distribution(module: str) -> str:
    """The installed distribution that provides `module` (its own name when not installed)."""
    found = _packages_distributions().get(module, [module])
    return canonicalize_name(found[0])


def test_every_import_of_the_package_is_a_dependency_or_the_course_extra() -> None:
    dependencies, course = _names(PROJECT["dependencies"]), _names(EXTRAS["course"])
    for path in (REPO / "lokr_edu").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        allowed = dependencies | course if module in COURSE_TOOLING else dependencies
        for name in _third_party_imports(path.read_text()):
            assert _distribution(name) in allowed, f"{module} imports {name}"


def test_every_import_of_the_tests_tools_and_notebooks_is_declared() -> None:
    declared = _names(PROJECT["dependencies"]) | _names(EXTRAS["course"]) | _names(EXTRAS["dev"])
    sources = {}
    for folder in ["tests", "tools", "benchmarks"]:
        for path in (REPO / folder).glob("*.py"):
            sources[path] = path.read_text()
    for path in REPO.glob("*/[0-9][0-9]_*.ipynb"):  # lectures, solutions, exercises
        cells = json.loads(path.read_text())["cells"]
        sources[path] = "\n".join(
            "".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"
        )
    assert len(sources) > 40
    # tools/browser_test.py drives a browser ([browser]); tools/book.py builds the book ([book])
    # and tests it in that browser
    book, browser = _names(EXTRAS["book"]), _names(EXTRAS["browser"])
    tool_extras = {"browser_test.py": browser, "book.py": book | browser}
    for path, source in sources.items():
        local = {p.stem for p in path.parent.glob("*.py")}  # tests/tiny_sd.py, tools/slides.py
        allowed = declared | tool_extras.get(path.name, set())
        for name in _third_party_imports(source) - local:
            assert _distribution(name) in allowed, f"{path.relative_to(REPO)} imports {name}"


def test_the_library_imports_without_the_course_extra() -> None:
    """Every module but the course tooling imports with Jupyter's packages (and the dev extra's
    reference libraries) absent; the course tooling fails on exactly those."""
    blocked = [*scripts.COURSE_MODULES.values(), "IPython", "nbval", "pytest", "peft", "lycoris"]
    modules = [m.name for m in pkgutil.walk_packages(lokr_edu.__path__, "lokr_edu.")]
    done = _run(
        f"""
        import importlib, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # `import name` now raises ModuleNotFoundError
        failed = []
        for module in {modules!r}:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                failed.append((module, error.name))
        print(sorted(failed))
        """
    )
    assert done.returncode == 0, done.stderr
    failed = dict(ast.literal_eval(done.stdout))
    assert set(failed) == COURSE_TOOLING
    assert set(failed.values()) <= set(scripts.COURSE_MODULES.values())
    assert {"lokr_edu.kron", "lokr_edu.adapters", "lokr_edu.train", "lokr_edu.scripts"} <= set(
        modules
    )


def test_the_course_extra_is_what_the_grade_script_checks_and_dev_brings_it() -> None:
    assert _names(EXTRAS["course"]) == set(scripts.COURSE_MODULES)
    assert "lokr-edu[course]" in EXTRAS["dev"]
    for extra in EXTRAS["course"]:  # not repeated in dev
        assert canonicalize_name(Requirement(extra).name) not in _names(EXTRAS["dev"])


def test_each_console_script_points_at_a_main_that_exists() -> None:
    entries = PROJECT["scripts"]
    assert entries == {
        "lokr-edu-train": "lokr_edu.train:main",
        "lokr-edu-grade": "lokr_edu.scripts:grade",
    }
    for entry in entries.values():
        module, function = entry.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_lokr_edu_grade_without_the_course_extra_says_which_extra_in_one_line(
    monkeypatch, capsys
) -> None:
    for module in scripts.COURSE_MODULES.values():
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lokr_edu.grade", raising=False)
    assert scripts.grade(["--help"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "lokr-edu-grade needs the [course] extra: pip install 'lokr-edu[course]'\n"
    assert "lokr_edu.grade" not in sys.modules  # stopped before the import that would fail


def test_lokr_edu_grade_with_one_course_package_missing_says_the_same(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ipykernel", None)  # the kernel: only needed to run cells
    assert scripts.missing_modules(list(scripts.COURSE_MODULES.values())) == ["ipykernel"]
    assert scripts.grade(["--help"]) == 1
    assert "[course] extra" in capsys.readouterr().err


def test_lokr_edu_grade_with_the_course_extra_runs_the_grader(capsys) -> None:
    assert scripts.missing_modules(list(scripts.COURSE_MODULES.values())) == []
    try:
        scripts.grade(["--help"])
    except SystemExit as stop:  # argparse's --help
        assert stop.code == 0
    else:
        raise AssertionError("--help did not reach the grader's parser")
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m lokr_edu.grade") and "--chapter" in out
    assert err == ""


def test_the_version_is_written_once_in_pyproject() -> None:
    version = PROJECT["version"]
    assert lokr_edu.__version__ == importlib.metadata.version("lokr-edu") == version
    for path in (REPO / "lokr_edu").rglob("*.py"):
        assert f'"{version}"' not in path.read_text(), path


def test_a_checkout_that_was_never_installed_has_an_unknown_version() -> None:
    done = _run(
        """
        import importlib.metadata

        def not_installed(name):
            raise importlib.metadata.PackageNotFoundError(name)

        importlib.metadata.version = not_installed
        import lokr_edu
        print(lokr_edu.__version__)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0+unknown\n"
    assert Version("0+unknown") < Version(PROJECT["version"])  # a valid version, the lowest


def test_importing_lokr_edu_leaves_logging_as_it_was() -> None:
    """Importing the package, its training code and its command line changes no logger (level,
    filters, handlers); `setup_notebook` is what hides transformers' torchvision notice."""
    done = _run(
        """
        import logging
        import diffusers, transformers  # their loggers exist before lokr_edu is imported

        def state():
            loggers = logging.root.manager.loggerDict
            return {
                name: (logger.level, list(logger.filters), list(logger.handlers))
                for name, logger in [("", logging.root), *loggers.items()]
                if isinstance(logger, logging.Logger) or name == ""
            }

        before = state()
        import lokr_edu, lokr_edu.diffusion, lokr_edu.sd15, lokr_edu.train, lokr_edu.repro
        after = state()
        changed = [n for n in before if before[n] != after.get(n)]
        print(len(before), changed)
        source = logging.getLogger("transformers.utils.import_utils")
        print(source.filters == [])
        lokr_edu.repro.setup_notebook()
        lokr_edu.repro.setup_notebook()  # twice: still one filter
        print([type(f).__name__ for f in source.filters])
        """
    )
    assert done.returncode == 0, done.stderr
    loggers, untouched, installed = done.stdout.splitlines()
    counted, changed = loggers.split(maxsplit=1)
    assert int(counted) > 100 and changed == "[]"  # diffusers' and transformers' loggers
    assert untouched == "True"
    assert installed == "['_KnownHarmless']"


def test_only_the_known_harmless_torchvision_notice_is_hidden() -> None:
    from lokr_edu.sd15 import _KNOWN_HARMLESS, hide_known_harmless_notices

    source = logging.getLogger("transformers.utils.import_utils")
    already = _KNOWN_HARMLESS in source.filters
    hide_known_harmless_notices()
    try:

        def passes(message: str) -> bool:
            record = source.makeRecord(source.name, logging.WARNING, __file__, 0, message, (), None)
            return bool(source.filter(record))

        notice = "`SiglipImageProcessor` requires torchvision (not installed); falling back to `X`"
        assert not passes(notice)
        assert passes("`SiglipImageProcessor` could not be imported: a real problem")
    finally:
        if not already:
            source.removeFilter(_KNOWN_HARMLESS)


def test_the_installation_check_lists_the_extras_dev_includes() -> None:
    """Chapter 00's table: [dev] names lokr-edu[course], so the course's packages are rows of
    their own, and lokr-edu itself is not a row."""
    from lokr_edu.environment import check_installation

    names = {row.name.lower() for row in check_installation()}
    assert {"nbformat", "nbclient", "ipykernel", "pytest", "torch"} <= names
    assert "lokr-edu" not in names
    core = {row.name.lower() for row in check_installation(extras=())}
    assert "torch" in core and "nbformat" not in core and "pytest" not in core
