"""Strict JSON: only values every JSON reader takes the same way.

Python's json module reads `NaN`, `Infinity` and `-Infinity` (JSON has none of them),
turns `1e999` into an infinite float, reads integers of any size up to 4,300 digits and
raises a bare ValueError past that. PostgreSQL refuses `NaN` in a JSON column,
JavaScript rounds integers past 2**53 and most other readers overflow past 64 bits.

`check_strict_json` is the one check that a value is strict JSON: finite floats and
integers within a signed 64-bit range only. `check_input` (runner/control/runs.py)
applies it to every run input (the API, replay and `runner processor run` alike); the
worker can apply it to a result. `strict_loads` reads JSON text without ever failing
on a number (a too-long integer becomes a `TooLongNumber` marker), so the check that
follows can name the field instead of the parser answering with a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any

from runner.errors import InvalidRequestError

MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
# Python's own cap on int() of a digit string (sys.get_int_max_str_digits()).
MAX_INT_DIGITS = 4300


class TooLongNumber:
    """An integer in JSON text too long to be read (kept to be refused by its place)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _read_int(text: str) -> int | TooLongNumber:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_INT_DIGITS else TooLongNumber(digits)


def strict_loads(text: str | bytes) -> Any:
    """JSON text as Python values, never failing on a number.

    NaN and the infinities come back as floats and a too-long integer as a
    `TooLongNumber`, each for `check_strict_json` to refuse naming its place.

    Raises:
        json.JSONDecodeError: the text is not JSON.
    """
    return json.loads(text, parse_int=_read_int)


# A place in the value walked: (key or index, the parent's place), or None for the top;
# a linked list, so a step deeper costs the same at any depth.
_Place = tuple[str | int, "_Place"] | None


def _where(field: str, place: _Place) -> str:
    parts: list[str | int] = []
    while place is not None:
        part, place = place
        parts.append(part)
    text = field
    for part in reversed(parts):
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _problem(value: object) -> str | None:
    """Why `value` itself (not what it holds) is not strict JSON, or None."""
    if value is None or isinstance(value, bool | str | list | dict):
        return None
    if isinstance(value, int):
        if MIN_INT <= value <= MAX_INT:
            return None
        # str() of an int past 4,300 digits raises too: say its size, not its digits.
        shown = (str(value) if value.bit_length() <= 256 else
                 f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits")
        return f"{shown} is outside the 64-bit range (-2**63 to 2**63-1)"
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{value} is not a JSON number (NaN and the infinities are not JSON)"
    if isinstance(value, TooLongNumber):
        return (f"an integer of {value.digits} digits is outside the 64-bit range "
                "(-2**63 to 2**63-1)")
    return f"a {type(value).__name__} is not a JSON value"


def check_strict_json(value: object, field: str) -> None:
    """Refuse what is not strict JSON anywhere in `value` (walked without recursion).

    Raises:
        InvalidRequestError: with `field` as its field; the message names the place
            (e.g. `input.items[2].price`) and what is wrong there.
    """
    stack: list[tuple[_Place, object]] = [(None, value)]
    while stack:
        place, item = stack.pop()
        problem = _problem(item)
        if problem is not None:
            raise InvalidRequestError(f"{_where(field, place)}: {problem}", field=field)
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise InvalidRequestError(
                        f"{_where(field, place)}: the key {key!r} is not a string",
                        field=field)
            # Pushed last first, so the first problem in document order is the one named.
            stack.extend(((key, place), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((index, place), item[index]) for index in range(len(item) - 1, -1, -1))
