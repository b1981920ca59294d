"""Reading and writing the API's JSON: the conversions the generated models
(`_models_gen`) are built from.

Answers are read leniently, as they always were: a field that is missing
gets its type's zero value (an older server leaves out what a newer one
added), and only a missing required time is an error, having no zero."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable, List, Mapping, Optional, TypeVar

T = TypeVar("T")

_FRACTION = re.compile(r"\.(\d+)")


def parse_time(value: Optional[str]) -> Optional[datetime]:
    """Parses an RFC 3339 time as the server writes it (``Z`` suffix, up to
    nanoseconds) into an aware UTC ``datetime``; ``None`` stays ``None``."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # datetime.fromisoformat before 3.11 takes exactly 3 or 6 fractional digits.
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def time(value: Any) -> datetime:
    """A time the document marks required."""
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError("a required time is missing from the server's answer")
    return parsed


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as the server writes times; a naive
    ``datetime`` is taken to be UTC already."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def opt(convert: Callable[[Any], T], value: Any) -> Optional[T]:
    """``convert(value)``, with ``None`` (JSON null, or absent) kept as ``None``."""
    return None if value is None else convert(value)


def mapping(value: Any) -> Mapping[str, Any]:
    """A JSON object, or an empty one where there is none."""
    return value if isinstance(value, Mapping) else {}


def items(value: Any) -> List[Any]:
    """A JSON array, or an empty one where there is none."""
    return value if isinstance(value, list) else []
