"""Parse the human units used in the manifest and settings: sizes and durations."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|K|Ki|M|Mi|G|Gi|k|KB|MB|GB)?\s*$")
_SIZE_FACTORS = {
    None: 1, "B": 1,
    "K": 1000, "k": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: int | str) -> int:
    """Bytes from `256Mi`, `4M`, `1Gi` or a plain integer.

    Raises:
        ValueError: the value is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 256Mi, 4Mi, 1Gi or bytes)")
    return int(float(match.group(1)) * _SIZE_FACTORS[match.group(2)])


def parse_duration(value: int | float | str) -> float:
    """Seconds from `300s`, `5m`, `500ms`, `1h` or a plain number of seconds.

    Raises:
        ValueError: the value is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 500ms)")
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


def seconds_text(value: float) -> str:
    """A duration for people: `0.35 s`, `1.2 s`, `4.5 min`, `2.0 h` (the dashboard's
    charts and `runner ops report` write durations the same way)."""
    if value < 1:
        return f"{value:.2f} s"
    if value < 100:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
