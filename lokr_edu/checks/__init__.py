"""The checks that exercise notebooks call: `from lokr_edu import checks; checks.check_kron(f)`.

One module per chapter; every check is re-exported here, so notebooks only need `checks.NAME`.
A check prints one line starting with ✓, or raises `CheckError` saying what is wrong, which a
notebook shows as one line starting with ✗ (`checks.common` says how).
"""

from lokr_edu.checks import ch01, ch02, ch03, ch04, ch05, ch06, ch07
from lokr_edu.checks.ch01 import *  # noqa: F403
from lokr_edu.checks.ch02 import *  # noqa: F403
from lokr_edu.checks.ch03 import *  # noqa: F403
from lokr_edu.checks.ch04 import *  # noqa: F403
from lokr_edu.checks.ch05 import *  # noqa: F403
from lokr_edu.checks.ch06 import *  # noqa: F403
from lokr_edu.checks.ch07 import *  # noqa: F403
from lokr_edu.checks.common import CheckError

__all__ = [
    "CheckError",
    *ch01.__all__,
    *ch02.__all__,
    *ch03.__all__,
    *ch04.__all__,
    *ch05.__all__,
    *ch06.__all__,
    *ch07.__all__,
]
