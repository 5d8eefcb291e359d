"""The report every `p2pvpn bench` command writes: JSON that another machine's can sit beside."""

import json
from pathlib import Path

import pytest

from p2pvpn.bench.report import REPORT_FORMAT, Bar, BenchError, Report, Series


def _report() -> Report:
    report = Report("crypto", {"cpu_model": "Test CPU", "cpus": 2}, {"quick": True})
    report.results["seal"] = {"1400": {"bits_per_second": 1e9}}
    report.series.append(Series("fast TCP", "Mbit/s", [(0.5, 100.0), (1.0, 120.0)]))
    report.bars.append(Bar("TCP Mbit/s", "fast", 120.0, "Mbit/s"))
    report.bars.append(Bar("TCP Mbit/s", "relay", None, "Mbit/s"))
    return report


def test_json_carries_machine_options_results_series_and_bars() -> None:
    report = _report().finish("table", ok=False)
    data = report.to_json()
    assert data["p2pvpn_bench"] == REPORT_FORMAT
    assert data["command"] == "crypto"
    assert data["ok"] is False
    assert data["machine"]["cpu_model"] == "Test CPU"
    assert data["options"] == {"quick": True}
    assert data["results"]["seal"]["1400"]["bits_per_second"] == 1e9
    assert data["series"] == [
        {"label": "fast TCP", "unit": "Mbit/s", "points": [(0.5, 100.0), (1.0, 120.0)]}
    ]
    assert [bar["value"] for bar in data["bars"]] == [120.0, None]
    assert data["timestamp"].endswith("Z")
    assert data["elapsed_seconds"] >= 0


def test_write_json_round_trips_and_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "router-a.json"
    report = _report().finish("table")
    report.write_json(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["bars"][0]["label"] == "fast"
    assert data["series"][0]["points"] == [[0.5, 100.0], [1.0, 120.0]]
    assert path.stat().st_mode & 0o777 == 0o644  # results are meant to be shared


def test_write_json_to_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "out.json"
    with pytest.raises(BenchError, match=str(path)):
        _report().write_json(path)
