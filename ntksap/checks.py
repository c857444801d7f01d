"""Argument checking for the library's functions: one message style, naming the
argument, the bad value and what is allowed (with the closest valid name).

Every public function that takes a count, a positive number or a choice checks it
with these before any work, so a bad call fails at once with a ``ValueError``::

    check_int("iterations", 0, minimum=1)
    # ValueError: iterations=0 is not allowed; allowed: an integer >= 1
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any


def closest(value: Any, options: Iterable[str]) -> str | None:
    """The option nearest to ``value`` by spelling, or None when none is close."""
    found = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return found[0] if found else None


def not_allowed(name: str, value: Any, allowed: str, options: Iterable[str] = ()) -> ValueError:
    """The error for ``name=value``: ``"<name>=<value> is not allowed (did you mean
    '<closest option>'?); allowed: <allowed>"``."""
    near = closest(value, options) if options else None
    hint = f" (did you mean {near!r}?)" if near is not None and near != value else ""
    return ValueError(f"{name}={value!r} is not allowed{hint}; allowed: {allowed}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError with the closest one."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise not_allowed(name, value, "one of " + ", ".join(map(repr, allowed)), allowed)
    return value


def check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``;
    ``None`` passes through when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise not_allowed(name, value, allowed + (" or None" if allow_none else ""))
    return int(value)


def check_positive(name: str, value: Any, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a finite number > 0 (the rule for every
    epsilon, learning rate and step size); ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise not_allowed(name, value, "a finite number > 0" + (" or None" if allow_none else ""))
    return float(value)
