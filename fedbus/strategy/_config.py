"""Constructor-argument checks shared by the strategies.

Strategy arguments arrive from TOML job configs, so they are checked for type as well as range and the
error names the argument: ``FedBuff: buffer_size must be an integer >= 1, got 0``. TOML writes
``server_lr = 1`` as an int, so float arguments accept ints; bools are refused everywhere (``True`` is
an int in Python, but never a sensible buffer size).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from fedbus.errors import ConfigError


def check_int(owner: str, name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or ConfigError naming ``owner``'s argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_opt_int(owner: str, name: str, value: object, *, minimum: int) -> int | None:
    """Like :func:`check_int`, but None passes through (meaning "no limit")."""
    return None if value is None else check_int(owner, name, value, minimum=minimum)


def check_float(
    owner: str,
    name: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, or ConfigError naming the argument."""
    bounds = " and ".join(f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt)) if b is not None)
    # NaN fails every check below: a bool (True is an int, never a rate) or a non-number is refused.
    number = math.nan if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    ok = (
        math.isfinite(number)
        and (gt is None or number > gt)
        and (ge is None or number >= ge)
        and (lt is None or number < lt)
    )
    if not ok:
        what = f"a finite number {bounds}" if bounds else "a finite number"
        raise ConfigError(f"{owner}: {name} must be {what}, got {value!r}")
    return number


def check_opt_float(owner: str, name: str, value: object, *, gt: float) -> float | None:
    """Like :func:`check_float` with a lower bound, but None passes through."""
    return None if value is None else check_float(owner, name, value, gt=gt)


def check_choice(owner: str, name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return str(value)
