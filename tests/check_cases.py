"""The two tests every chapter's checks get (used by tests/test_checks_chNN.py).

CASES is a list of (check, reference answer, [(wrong answer, expected message fragment), ...]):
the check must pass, printing its ✓ line, on the reference, and raise CheckError with the
fragment in its message on every wrong answer.
"""

from __future__ import annotations

import re

import pytest

from lokr_edu.checks import CheckError


def _name(value: object) -> str:
    return getattr(value, "__name__", str(value)[:24])


def check_tests(cases: list) -> tuple:
    @pytest.mark.parametrize(("check", "answer"), [(c, a) for c, a, _ in cases], ids=_name)
    def test_check_passes_on_the_reference(check, answer, capsys) -> None:
        check(answer)
        assert capsys.readouterr().out.startswith("✓ ")

    @pytest.mark.parametrize(
        ("check", "wrong", "message"),
        [(c, w, m) for c, _, wrongs in cases for w, m in wrongs],
        ids=_name,
    )
    def test_check_explains_a_wrong_answer(check, wrong, message: str) -> None:
        with pytest.raises(CheckError, match=re.escape(message)):
            check(wrong)

    return test_check_passes_on_the_reference, test_check_explains_a_wrong_answer
