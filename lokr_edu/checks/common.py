"""What every chapter's checks share: the error they raise and how they report.

Each `check_*` takes the student's function, runs it on cases with known answers, and either
prints one line starting with ✓ or raises `CheckError` saying what is wrong: a shape, a value,
and a hint at the likely mistake. The reference answers are the package's own functions.

What the student sees in a notebook is the verdict, not the checks' code: IPython shows an
exception that has a `_render_traceback_` method by the lines it returns, so

- a `CheckError` reads as one line, `✗ what is wrong`;
- an exercise not done yet (its `raise NotImplementedError("Exercise N.M: …")` still in place,
  or an answer left as None) reads as one line, `✗ not done yet: Exercise N.M: …`;
- a crash inside the student's own code shows the student's lines (the frames from their
  function down, none of the checks' frames) and then the check's one line.

The exception types do not change: graders and tests still read `CheckError` and
`NotImplementedError`; outside IPython (pytest, a script) the traceback is Python's own.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch

__all__ = [
    "CheckError",
    "call_student",
    "not_answered",
    "passed",
    "prediction_pair",
    "random_tensor",
    "require_tensor",
    "shape_str",
    "shown_briefly",
]

CHECKS = Path(__file__).resolve().parent  # the checks' own code: never shown to the student
STUB = re.compile(r"Exercise \d+\.\d+\b")  # how an exercise's NotImplementedError starts


def _is_checks_frame(tb: TracebackType) -> bool:
    return Path(tb.tb_frame.f_code.co_filename).resolve().parent == CHECKS


def _student_lines(error: BaseException | None, tb: TracebackType | None) -> list[str]:
    """`error` as IPython would show it, from the first frame below the checks' own code.

    `tb` is the error's traceback as it was when the checks caught it: it starts in the checks
    (where the student's function was called) and goes down into the student's code. An empty
    list when nothing is left (the error was raised by the checks themselves)."""
    while tb is not None and _is_checks_frame(tb):
        tb = tb.tb_next
    if error is None or tb is None:
        return []
    try:
        from IPython import get_ipython
    except ImportError:  # _render_traceback_ is only called by IPython; this is a safe default
        shell = None
    else:
        shell = get_ipython()
    if shell is not None:
        return shell.InteractiveTB.structured_traceback(type(error), error, tb, tb_offset=0)
    return [line.rstrip("\n") for line in traceback.format_exception(type(error), error, tb)]


class CheckError(AssertionError):
    """A student's answer is wrong; the message says how.

    In IPython it shows as one line, `✗ message`; when it was raised from a crash of the
    student's code (`raise CheckError(...) from error`), the student's frames come first."""

    def _render_traceback_(self) -> list[str]:
        origin = self.__cause__
        if origin is None and not self.__suppress_context__:
            origin = self.__context__
        tb = origin.__traceback__ if origin is not None else None
        return [*_student_lines(origin, tb), f"✗ {self}"]


def shown_briefly(error: BaseException, tb: TracebackType | None = None) -> BaseException:
    """`error` (same type, same message), shown by IPython without the checks' frames.

    An exercise's own NotImplementedError ("Exercise N.M: …") reads as one line, `✗ not done
    yet: …`; any other error shows the student's frames of `tb` (the error's traceback when it
    was caught, by default its current one) and its message. Returns `error`, to `raise`."""
    tb = error.__traceback__ if tb is None else tb

    def render() -> list[str]:  # IPython calls it with no arguments
        if isinstance(error, NotImplementedError) and STUB.match(str(error)):
            return [f"✗ not done yet: {error}"]
        return _student_lines(error, tb) or [f"✗ {type(error).__name__}: {error}"]

    error._render_traceback_ = render
    return error


def brief_blank_exercises(shell=None) -> None:
    """Show an exercise's stub raised at a cell's top level (`prediction = ...` cells, whose
    `raise NotImplementedError("Exercise N.M: … (replace this line)")` runs before any check)
    as one line too, `✗ not done yet: …`, in the IPython kernel running the notebook.

    An IPython custom exception handler for NotImplementedError: a stub gets the one-line
    rendering of `shown_briefly`, any other NotImplementedError IPython's usual traceback; the
    error itself (type, message) is unchanged. Outside IPython it does nothing.
    `lokr_edu.repro.setup_notebook` calls it."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:  # a script, not a notebook
            return
        shell = get_ipython()
        if shell is None:
            return

    def handler(self, etype, value, tb, tb_offset=None):
        if STUB.match(str(value)):
            shown_briefly(value, tb)
        self.showtraceback((etype, value, tb), tb_offset=tb_offset)

    shell.set_custom_exc((NotImplementedError,), handler)


def not_answered(message: str) -> NotImplementedError:
    """The error for an answer left blank (None or ...): "Exercise N.M: title: not answered yet
    (write …)". A NotImplementedError, as a blank exercise raises, shown as one line."""
    return shown_briefly(NotImplementedError(message))  # type: ignore[return-value]


def passed(message: str) -> None:
    print(f"✓ {message}")


def random_tensor(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "×".join(str(s) for s in t.shape)


def require_tensor(name: str, value: object, shape: tuple[int, ...], context: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise CheckError(f"{name} must return a torch.Tensor, got {type(value).__name__} {context}")
    if tuple(value.shape) != shape:
        raise CheckError(f"{name} returned shape {tuple(value.shape)} {context}; expected {shape}")


def prediction_pair(prediction: object, is_value: Callable[[object], bool], what: str) -> tuple:
    """A prediction of two values, written as a tuple (a, b) or a list [a, b], as a tuple.

    `is_value` accepts one value; `what` names the pair in the message of the CheckError raised
    for anything else, e.g. "two booleans, (one layer, network)"."""
    if isinstance(prediction, tuple | list) and len(prediction) == 2:
        if all(is_value(v) for v in prediction):
            return tuple(prediction)
    raise CheckError(f"write your prediction as {what}, got {prediction!r}")


def call_student(
    name: str, function: Callable, *args: object, context: str, **kwargs: object
) -> object:
    """Call the student's function; report a crash with the case that caused it.

    A crash becomes a CheckError naming the case, raised from the student's error so that a
    notebook shows the student's lines; a NotImplementedError (not done yet) and a CheckError
    pass through unchanged, the first shown as one line."""
    try:
        return function(*args, **kwargs)
    except CheckError:
        raise
    except NotImplementedError as error:
        shown_briefly(error, error.__traceback__)  # the student's error itself, re-raised
        raise
    except Exception as error:
        raise CheckError(f"{name} raised {type(error).__name__} {context}: {error}") from error
