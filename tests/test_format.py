"""p2pvpn._format: sizes, durations, rates and tables (status, the demo and the benches)."""

import pytest

from p2pvpn._format import (
    format_duration,
    format_ms,
    format_rate,
    format_seconds,
    format_size,
    format_table,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (45, "45s"),
        (59.99, "59s"),
        (60, "1m00s"),
        (312, "5m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (2 * 86400 + 3 * 3600 + 59, "2d03h"),
        (400 * 86400, "400d00h"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (840, "840 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),
        (12 * 1024 * 1024 + 300 * 1024, "12.3 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**4, "5.0 TiB"),
        (5000 * 1024**4, "5000.0 TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    lines = format_table(
        ["PEER", "STATE", "RTT"],
        [["alice -> bob", "CONNECTED", "0.50 ms"], ["bob -> alice", "WAITING", "12.3 ms"]],
        indent="  ",
        right=(2,),
    )
    assert lines == [
        "  PEER          STATE          RTT",
        "  alice -> bob  CONNECTED  0.50 ms",
        "  bob -> alice  WAITING    12.3 ms",
    ]


def test_table_pads_short_rows_and_strips_trailing_space() -> None:
    lines = format_table(["A", "B"], [["x"], ["long cell", "y"]])
    assert lines == ["A          B", "x", "long cell  y"]


@pytest.mark.parametrize(
    ("bits", "text"),
    [
        (0, "0 bit/s"),
        (999, "999 bit/s"),
        (1_500, "1.50 kbit/s"),
        (95_300_000, "95.3 Mbit/s"),
        (412_000_000, "412 Mbit/s"),
        (999_960_000, "1.00 Gbit/s"),
        (1_234_000_000, "1.23 Gbit/s"),
        (12_500_000_000, "12.5 Gbit/s"),
    ],
)
def test_format_rate(bits: float, text: str) -> None:
    assert format_rate(bits) == text


def test_format_ms() -> None:
    assert [format_ms(v) for v in (0.123, 12.34, 123.4)] == ["0.12 ms", "12.3 ms", "123 ms"]


def test_format_seconds() -> None:
    assert [format_seconds(v) for v in (0.04, 0.25, 12.5)] == ["0.0 s", "0.2 s", "12.5 s"]


def test_table_rule_under_the_headers() -> None:
    lines = format_table(
        ["variant", "TCP"], [["raw", "941"], ["fast", "88"]], right=(1,), rule=True
    )
    assert lines == ["variant  TCP", "-------  ---", "raw      941", "fast      88"]
