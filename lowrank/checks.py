"""The shared checks of every option in the project: one formatter for problems, a few type tests.

Validation collects problems (strings) instead of raising at the first one, so a user sees every mistake at once::

    problems = [problem("optimizer.lowrank.rank", 0, "an integer >= 1")]
    raise_problems("invalid optimizer configuration", problems)   # no-op for an empty list

Every problem names the key, the offending value and the accepted values, in one format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def is_int(value: Any, minimum: int | None = None) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a count here), at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: Any) -> bool:
    """A finite real number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def join_accepted(values: Iterable[Any]) -> str:
    """``a | b | c``: how accepted choices are listed in every message."""
    return " | ".join(str(value) for value in values)


def problem(key: str, value: Any, accepted: str) -> str:
    """``key: invalid value <value>; accepted: <accepted>``."""
    return f"{key}: invalid value {value!r}; accepted: {accepted}"


def check(ok: bool, key: str, value: Any, accepted: str) -> list[str]:
    """``[]`` when ``ok``, else the one :func:`problem`: ``problems += check(...)`` reads as the rule."""
    return [] if ok else [problem(key, value, accepted)]


def first_problems(problems: list[str], limit: int = 5) -> str:
    """The first ``limit`` problems joined by "; ", and how many more there are: a long list kept readable."""
    more = len(problems) - limit
    return "; ".join(problems[:limit]) + (f"; and {more} more" if more > 0 else "")


def raise_problems(title: str, problems: list[str]) -> None:
    """Raises one ``ValueError("<title>: p1; p2; ...")`` when there is any problem."""
    if problems:
        raise ValueError(f"{title}: " + "; ".join(problems))


def dotted(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` for an empty prefix."""
    return f"{prefix}.{name}" if prefix else name
