"""``--plot FILE.png``: a benchmark report drawn as a PNG.

One panel per unit for the series (throughput over time, one line each) and
one per unit for the bars (groups side by side, one bar per label), so that
figures of different units never share an axis. matplotlib is an optional
extra (``pip install 'p2pvpn[plot]'``), imported only here and only when a
plot is asked for; the figure is drawn with the Agg canvas, so no display is
needed and pyplot's global state is left alone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pvpn.bench.report import BenchError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_report"]

_PANEL_HEIGHT = 3.6  # inches
_WIDTH = 11.0
_DPI = 100
_BAR_AREA = 0.8  # of each group's slot on the x axis
_MAX_BAR_WIDTH = 0.3
_MAX_ANNOTATED = 16  # bars; more and the numbers overlap
_HEADROOM = 1.25  # above the highest bar, for the legend and the numbers


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Draw ``report`` (`Report.to_json`) into the PNG file ``path``, replaced atomically.

    Raises BenchError when matplotlib is missing, when the report has nothing
    to draw, or when ``path`` cannot be written.
    """
    series = [s for s in report.get("series") or [] if s.get("points")]
    bars = list(report.get("bars") or [])
    measured = [b for b in bars if b.get("value") is not None]
    if not series and not measured:
        raise BenchError(
            f"nothing to plot: the {report.get('command', 'bench')} report has no series "
            "over time and no measured bars"
        )
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'p2pvpn[plot]'") from exc
    # A label keeps its colour in every panel: "fast" is the same orange everywhere.
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: palette[i % len(palette)] for i, label in enumerate(_labels(bars))}
    series_units = _units(series)
    bar_units = _units(measured)  # a unit with nothing measured gets no empty panel
    panels = len(series_units) + len(bar_units)
    figure = Figure(figsize=(_WIDTH, 0.6 + _PANEL_HEIGHT * panels), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(_title(report))
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    for ax, unit in zip(axes, series_units, strict=False):
        _draw_series(ax, [s for s in series if s.get("unit") == unit], unit)
    for ax, unit in zip(axes[len(series_units) :], bar_units, strict=True):
        _draw_bars(ax, [b for b in bars if b.get("unit") == unit], unit, colors)
    _save(figure, path)


def _units(items: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(item.get("unit", "")) for item in items))


def _labels(bars: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(bar.get("label", "")) for bar in bars))


def _title(report: dict[str, Any]) -> str:
    machine = report.get("machine") or {}
    who = ", ".join(
        str(part) for part in (machine.get("hostname"), machine.get("cpu_model")) if part
    )
    when = report.get("timestamp", "")
    return (
        f"p2pvpn bench {report.get('command', '')}"
        + (f" - {who}" if who else "")
        + (f" - {when}" if when else "")
    )


def _draw_series(ax: Axes, series: list[dict[str, Any]], unit: str) -> None:
    for one in series:
        seconds = [float(point[0]) for point in one["points"]]
        values = [float(point[1]) for point in one["points"]]
        ax.plot(seconds, values, marker=".", label=str(one.get("label", "")))
    ax.set_xlabel("seconds")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.set_title("over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def _bar_value(value: float) -> str:
    """3880.5 -> "3,880", 16.45 -> "16.4", 0.123 -> "0.123": no exponents on a bar."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _draw_bars(ax: Axes, bars: list[dict[str, Any]], unit: str, colors: dict[str, str]) -> None:
    """Groups along x, one bar per label; a bar without a value (did not run) says "n/a"."""
    groups = list(dict.fromkeys(str(bar.get("group", "")) for bar in bars))
    labels = _labels(bars)
    width = min(_BAR_AREA / len(labels), _MAX_BAR_WIDTH)
    values = {(str(bar.get("group", "")), str(bar.get("label", ""))): bar["value"] for bar in bars}
    annotate = len(bars) <= _MAX_ANNOTATED
    for index, label in enumerate(labels):
        offset = (index - (len(labels) - 1) / 2) * width
        slots = [
            (g, values[group, label]) for g, group in enumerate(groups) if (group, label) in values
        ]
        drawn = [(g, float(value)) for g, value in slots if value is not None]
        container = ax.bar(
            [g + offset for g, _ in drawn],
            [value for _, value in drawn],
            width,
            label=label,
            color=colors[label],
        )
        if annotate:
            ax.bar_label(container, fmt=_bar_value, fontsize="x-small")
        for g, value in slots:
            if value is None:
                ax.text(g + offset, 0, "n/a", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(range(len(groups)), groups, fontsize="small")
    ax.set_xlim(-0.5, len(groups) - 0.5)  # the "n/a" of a missing last bar stays inside
    highest = max((float(v) for v in values.values() if v is not None), default=1.0)
    ax.set_ylim(0, highest * _HEADROOM)
    ax.set_ylabel(unit)
    ax.set_title("comparison")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(len(labels), 5), loc="upper left")


def _save(figure: Any, path: Path) -> None:
    """Through a temporary file and a rename: a reader never sees half a PNG."""
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".png", dir=path.parent
        )
        with os.fdopen(descriptor, "wb") as file:
            figure.savefig(file, format="png")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise BenchError(f"cannot write the plot {path}: {exc.strerror or exc}") from exc
