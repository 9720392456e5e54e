"""The one way numbers are written for people: the report, `compare`, and the CLI's tables.

Every formatter takes whatever an artifact holds (a float, an int, None, NaN, a missing key's None)
and returns text; what is not a finite number becomes ``missing`` ("-" unless the caller's medium
marks gaps its own way, as the HTML report does).
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

MISSING = "-"


def is_number(v: Any) -> TypeGuard[int | float]:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def num(v: Any, digits: int = 2, missing: str = MISSING) -> str:
    """``v`` with ``digits`` decimals: num(0.5) == '0.50', num(None) == '-'."""
    return f"{float(v):.{digits}f}" if is_number(v) else missing


def signed(v: Any, digits: int = 3, missing: str = MISSING) -> str:
    """``v`` with an explicit sign, for differences: signed(0.01) == '+0.010'."""
    return f"{float(v):+.{digits}f}" if is_number(v) else missing


def arrow(before: Any, after: Any, digits: int = 2, missing: str = MISSING) -> str:
    """'before->after', each formatted by ``num``."""
    return f"{num(before, digits, missing)}->{num(after, digits, missing)}"


def joined(values: list[Any], digits: int = 2, sep: str = "/", missing: str = MISSING) -> str:
    """Several numbers in one cell: joined([0.9, None]) == '0.90/-'."""
    return sep.join(num(v, digits, missing) for v in values)


def ci_ends(record: dict[str, Any]) -> tuple[Any, Any]:
    """(lo, hi) of a rate record's ci95, None where an end is missing."""
    ends = list(record.get("ci95") or [])
    return (ends[0] if ends else None, ends[1] if len(ends) > 1 else None)
