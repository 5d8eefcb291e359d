"""``--plot FILE.png``: a PNG that opens, for reports with series, bars, both; clear errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from p2pvpn.bench.plot import plot_report
from p2pvpn.bench.report import Bar, BenchError, Report, Series
from p2pvpn.cli import main

MIN_WIDTH, MIN_HEIGHT = 400, 300


def _report(*, series: bool = True, bars: bool = True) -> dict[str, Any]:
    report = Report("local", {"hostname": "router", "cpu_model": "Test CPU"}, {})
    if series:
        report.series = [
            Series("raw TCP", "Mbit/s", [(0.5, 900.0), (1.0, 950.0), (1.5, 940.0)]),
            Series("fast TCP", "Mbit/s", [(0.5, 400.0), (1.0, 420.0)]),
        ]
    if bars:
        report.bars = [
            Bar("TCP", "raw", 940.0, "Mbit/s"),
            Bar("TCP", "fast", 410.0, "Mbit/s"),
            Bar("UDP", "raw", 800.0, "Mbit/s"),
            Bar("UDP", "fast", None, "Mbit/s"),  # did not run: drawn as "n/a"
            Bar("CPU", "fast", 3.5, "CPU s/GB"),
        ]
    return report.finish("table").to_json()


def _assert_png(path: Path) -> None:
    image = imread(str(path))
    height, width = image.shape[:2]
    assert width > MIN_WIDTH and height > MIN_HEIGHT


@pytest.mark.parametrize(
    ("series", "bars"), [(True, True), (True, False), (False, True)], ids=["both", "series", "bars"]
)
def test_plot_writes_a_png(series: bool, bars: bool, tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    plot_report(_report(series=series, bars=bars), path)
    _assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left


def test_cli_plot_of_bench_crypto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "crypto.png"
    assert main(["bench", "crypto", "--quick", "--sizes", "64,1400", "--plot", str(path)]) == 0
    _assert_png(path)
    assert f"plot: {path}" in capsys.readouterr().out


def test_an_existing_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    plot_report(_report(series=False), path)
    _assert_png(path)


def test_nothing_to_plot(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="nothing to plot"):
        plot_report(_report(series=False, bars=False), tmp_path / "plot.png")
    only_missing = _report(series=False, bars=False)
    only_missing["bars"] = [{"group": "TCP", "label": "fast", "value": None, "unit": "Mbit/s"}]
    with pytest.raises(BenchError, match="nothing to plot"):
        plot_report(only_missing, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_without_matplotlib_the_error_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(BenchError) as raised:
        plot_report(_report(), tmp_path / "plot.png")
    assert str(raised.value) == "--plot needs matplotlib: pip install 'p2pvpn[plot]'"


def test_an_unwritable_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no-such-directory" / "plot.png"
    with pytest.raises(BenchError, match=re.escape(str(path))):
        plot_report(_report(), path)
