"""The checks that exercise notebooks call: `from lokr_edu import checks; checks.check_kron(f)`.

One module per chapter; every check is re-exported here, so notebooks only need `checks.NAME`.
A check prints one line starting with ✓, or raises `CheckError` saying what is wrong.
"""

from lokr_edu.checks.ch01 import (
    check_factorize,
    check_kron,
    check_kron_matvec,
    check_kron_singular_values,
    check_numerical_rank,
)
from lokr_edu.checks.common import CheckError

__all__ = [
    "CheckError",
    "check_factorize",
    "check_kron",
    "check_kron_matvec",
    "check_kron_singular_values",
    "check_numerical_rank",
]
