"""Numbers and tables for people: sizes, durations, rates and aligned columns.

One copy for `p2pvpn status`, the demo and the benchmark reports, so that they
show the same quantity the same way.
"""

from collections.abc import Collection, Sequence

__all__ = [
    "format_duration",
    "format_ms",
    "format_rate",
    "format_seconds",
    "format_size",
    "format_table",
]

_COLUMN_GAP = "  "


def format_size(size: float) -> str:
    """Bytes in binary units: ``840 B``, ``1.5 KiB``, ``12.0 MiB``."""
    if size < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Compare the rounded value, so 1023.99 KiB shows as 1.0 MiB, not 1024.0 KiB.
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A span in its two most significant units: ``45s``, ``5m12s``, ``1h02m``, ``2d03h``."""
    # Negative spans come from clock steps between two machines: show 0.
    total = max(0, int(seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_seconds(seconds: float) -> str:
    """A short timing to a tenth of a second: ``0.3 s``, ``12.5 s``."""
    return f"{seconds:.1f} s"


def format_ms(milliseconds: float) -> str:
    """Milliseconds with three significant digits at most: ``0.12 ms``, ``12.3 ms``, ``123 ms``."""
    if milliseconds < 10:
        return f"{milliseconds:.2f} ms"
    if milliseconds < 100:
        return f"{milliseconds:.1f} ms"
    return f"{milliseconds:.0f} ms"


def format_rate(bits_per_second: float) -> str:
    """Decimal units with three significant digits: ``95.3 Mbit/s``, ``1.23 Gbit/s``."""
    value = float(bits_per_second)
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if round(value, 1) < 1000 or unit == "Gbit/s":
            if value >= 100 or unit == "bit/s":
                return f"{value:.0f} {unit}"
            if value >= 10:
                return f"{value:.1f} {unit}"
            return f"{value:.2f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    indent: str = "",
    right: Collection[int] = (),
    rule: bool = False,
) -> list[str]:
    """Aligned columns as wide as their content, two spaces apart, without trailing spaces.

    ``right``: indexes of the columns to right-align (numbers). ``rule``: a line
    of dashes under the headers. Short rows are padded with empty cells.
    """
    columns = max([len(headers), *(len(row) for row in rows)])
    table = [list(headers) + [""] * (columns - len(headers))]
    table += [list(row) + [""] * (columns - len(row)) for row in rows]
    widths = [max(len(row[index]) for row in table) for index in range(columns)]
    lines = []
    for row in table:
        cells = [
            cell.rjust(widths[index]) if index in right else cell.ljust(widths[index])
            for index, cell in enumerate(row)
        ]
        lines.append((indent + _COLUMN_GAP.join(cells)).rstrip())
    if rule:
        lines.insert(1, indent + _COLUMN_GAP.join("-" * width for width in widths))
    return lines
