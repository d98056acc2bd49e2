import pytest

from runner.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("256Mi", 256 * 1024**2), ("4Mi", 4 * 1024**2), ("1Gi", 1024**3), ("512Ki", 512 * 1024),
    ("1M", 1_000_000), ("100", 100), (42, 42), ("1.5Ki", 1536),
])
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1", "12 parsecs", "Mi", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("300s", 300.0), ("5m", 300.0), ("500ms", 0.5), ("1h", 3600.0), (30, 30.0), ("2", 2.0),
])
def test_durations(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["soon", "5 days", "-3s"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)
