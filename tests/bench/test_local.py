"""``p2pvpn bench local``: one ``--quick`` run of every variant with the own traffic generator
(shared by the tests of this module), a short ``--tool iperf3`` run, the clear error without
the privileges; and the options, ratios, series and bars without namespaces."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.bench import local
from p2pvpn.bench.local_iperf3 import _client_argv
from p2pvpn.bench.local_report import compute_ratios, result_bars, result_series
from p2pvpn.bench.report import BenchError
from p2pvpn.netns import PREFIX, list_namespaces, process_env
from tests.integration.conftest import require_netns, require_tool

VARIANTS = ("raw", "pure", "fast-no-offload", "fast", "relay")
SHORT_RUNS = ("--duration", "1", "--udp-seconds", "0.5")
RUN_TIMEOUT = 420  # the quick run takes about 90 s; generous for a busy machine


def _fast_plane_built() -> bool:
    try:
        import p2pvpn._fastpath  # noqa: F401
    except ImportError:
        return False
    return True


def bench_local(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = [*prefix, sys.executable, "-m", "p2pvpn", "bench", "local", *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, env=process_env()
    )


def _measured(tmp_path_factory: pytest.TempPathFactory, *args: str) -> tuple[str, dict[str, Any]]:
    """The table and the JSON of one run that must succeed."""
    out = tmp_path_factory.mktemp("bench-local") / "results.json"
    result = bench_local(*args, "--json", str(out))
    # Exit 0 also when the fast variants are "unavailable" (no compiled data plane).
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout, json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    require_netns()
    require_tool("ping", "iputils-ping")
    # Shorter runs than --quick's own: the test checks the shape of the report, not speed.
    return _measured(tmp_path_factory, "--quick", *SHORT_RUNS)


# -- the quick run of every variant (own tool) -----------------------------------------


@pytest.mark.slow
@pytest.mark.netns
def test_quick_run_has_every_variant(quick_run: tuple[str, dict[str, Any]]) -> None:
    table, report = quick_run
    assert report["command"] == "local" and report["ok"] is True
    assert report["options"]["tool"] == "own"
    assert "tool: own traffic generator" in table
    results = report["results"]
    for variant in VARIANTS:
        status = results[variant]["status"]
        if status == "unavailable":  # only without the compiled plane (always built in CI)
            assert not _fast_plane_built() and variant.startswith("fast"), results[variant]
        else:
            assert status == "ok", results[variant]
        assert variant in table
    assert report["machine"]["cpus"] >= 1


@pytest.mark.slow
@pytest.mark.netns
def test_quick_run_measures_raw_pure_and_relay(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, report = quick_run
    results = report["results"]
    for variant in ("raw", "pure", "relay"):
        row = results[variant]
        assert row["tcp"]["bits_per_second"] > 0, row
        assert row["rtt_idle"]["received"] > 0, row
        assert row["rtt_loaded"]["p99_ms"] is not None, row
        assert row["udp"]["trials"], row
    pure, relay = results["pure"], results["relay"]
    assert pure["dataplane"] == "pure"
    assert pure["path"].startswith("direct ") and pure["path_after"].startswith("direct ")
    assert relay["path"] == relay["path_after"] == "relay server"
    assert pure["tcp"]["cpu_seconds_per_gb"] > 0
    assert report["results"]["ratios"]["pure"]["tcp"] > 0
    # The plot's data: a TCP series per variant that ran, a TCP and a UDP bar per variant.
    series = {s["label"]: s for s in report["series"]}
    assert series["raw TCP"]["points"] and series["pure TCP"]["points"]
    bars = {(b["group"], b["label"]): b["value"] for b in report["bars"]}
    assert bars[("TCP Mbit/s", "raw")] > 0 and bars[("TCP Mbit/s", "pure")] > 0


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.fastpath
def test_quick_run_measures_fast_with_and_without_tun_offloads(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    table, report = quick_run
    results = report["results"]
    for variant in ("fast-no-offload", "fast"):
        row = results[variant]
        assert row["status"] == "ok", row
        assert row["dataplane"] == "fast", row
        assert row["path"].startswith("direct "), row
        assert row["tcp"]["bits_per_second"] > 0
        assert row["tcp"]["cpu_seconds_per_gb"] > 0
    # The status check before measuring saw each variant's configuration.
    for client in ("c1", "c2"):
        assert results["fast-no-offload"]["tun_offloads"][client] == []
        assert {"csum", "tso4"} <= set(results["fast"]["tun_offloads"][client])
    # Every target is computed (met or not: a quick run on a busy machine judges nothing).
    targets = {target["key"]: target for target in results["ratios"]["targets"]}
    assert len(targets) == 4
    for target in targets.values():
        assert target["ratio"] is not None and target["ratio"] > 0, target
        assert target["met"] in (True, False), target
    assert "targets of issue 13" in table


# -- iperf3, and no privileges ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.fastpath
def test_iperf3_tool_measures_raw_and_fast(tmp_path_factory: pytest.TempPathFactory) -> None:
    require_tool("iperf3")
    require_tool("ping", "iputils-ping")
    table, report = _measured(
        tmp_path_factory, "--tool", "iperf3", "--quick", "--only", "raw,fast", *SHORT_RUNS
    )
    assert report["options"]["tool"] == "iperf3"
    assert "tool: iperf 3" in table
    for variant in ("raw", "fast"):
        row = report["results"][variant]
        assert row["status"] == "ok", row
        assert row["tcp"]["bits_per_second"] > 0 and row["rtt_idle"]["received"] > 0
    assert set(report["results"]) == {"raw", "fast", "ratios"}


@pytest.mark.netns
def test_without_privileges_it_says_what_is_missing() -> None:
    """Root without capabilities cannot make namespaces: one clear line, exit 1, no traceback."""
    require_netns()
    require_tool("setpriv", "util-linux")  # fails, not skips, under CI=true
    drop = ("setpriv", "--bounding-set", "-all", "--inh-caps", "-all")
    result = bench_local("--quick", prefix=drop)
    assert result.returncode == 1, result
    assert result.stderr.startswith("p2pvpn bench local: error: "), result.stderr
    assert "network namespaces" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.netns
def test_sigterm_removes_the_namespaces() -> None:
    """Stopped in the middle of a measurement: exit 130, nothing of the run left behind."""
    require_netns()
    argv = [sys.executable, "-m", "p2pvpn", "bench", "local", "--quick", "--only", "raw"]
    bench = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=process_env()
    )
    prefix = f"{PREFIX}{bench.pid:x}-"
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # the progress lines: measuring means the namespaces exist
            if "raw: TCP" in line:
                break
        assert list_namespaces(prefix), "the run made no namespaces"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert list_namespaces(prefix) == []


# -- without namespaces ----------------------------------------------------------------


def test_the_error_names_root_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "missing_requirements", lambda: ["root (run the tests as root)"])
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "iperf3" else name)
    error = local.requirements_error("iperf3")
    assert isinstance(error, BenchError)
    assert "root" in str(error) and "apt-get install iperf3" in str(error)
    monkeypatch.setattr(local, "missing_requirements", lambda: [])
    assert local.requirements_error("own") is None


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    local.configure_parser(parser)
    return parser.parse_args(argv)


def test_quick_options_plan_about_ninety_seconds() -> None:
    options = local.options_from(_args("--quick"))
    assert options.variants == VARIANTS and options.tool == "own"
    assert (options.runs, options.udp_steps) == (1, 2)
    # Measuring time only; start-up and path checks add about 5 s per variant.
    assert options.planned_seconds() * len(options.variants) <= 60
    full = local.options_from(_args("--only", "fast,raw", "--tool", "iperf3"))
    assert full.variants == ("raw", "fast") and full.runs == 3 and full.tool == "iperf3"


@pytest.mark.parametrize(
    "argv, flag",
    [(("--only", "raw,turbo"), "--only"), (("--duration", "0.1"), "--duration")],
)
def test_bad_options_name_the_flag(argv: tuple[str, ...], flag: str) -> None:
    with pytest.raises(BenchError, match=flag):
        local.options_from(_args(*argv))


def _row(tcp_bps: float, intervals: list[dict[str, float]] | None = None) -> dict[str, Any]:
    run = {"bits_per_second": tcp_bps, "bytes": 1, "intervals": intervals or []}
    return {"status": "ok", "tcp": {"bits_per_second": tcp_bps, "runs": [run]}}


def test_ratios_targets_series_and_bars() -> None:
    intervals = [
        {"start": 0.0, "end": 0.5, "bytes": 62_500_000},
        {"start": 0.5, "end": 0.51, "bytes": 9_000_000},  # the sliver at the end: left out
    ]
    results = {
        "raw": _row(10e9, intervals),
        "fast-no-offload": _row(1e9),
        "fast": _row(3e9),
        "pure": {"status": "failed", "error": "boom"},
    }
    ratios = compute_ratios(results)
    assert ratios["fast"]["tcp"] == pytest.approx(0.3)
    assert "pure" not in ratios and ratios["fast_vs_pure_tcp"] is None
    targets = {t["key"]: t for t in ratios["targets"]}
    assert targets["fast_vs_no_offload_tcp"]["met"] is True
    assert targets["fast_vs_raw_tcp"]["met"] is True
    assert targets["fast_vs_no_offload_cpu_per_gb"]["met"] is None  # not measured
    series = {s.label: s for s in result_series(results)}
    assert series["raw TCP"].points == [(0.5, 1000.0)]
    bars = {(b.group, b.label): b.value for b in result_bars(results)}
    assert bars[("TCP Mbit/s", "fast")] == pytest.approx(3000.0)
    assert bars[("TCP Mbit/s", "pure")] is None and bars[("UDP Mbit/s", "raw")] is None


def test_the_module_runs_from_a_checkout_wrapper() -> None:
    """bench/e2e/run.py hands its flags to `p2pvpn bench local` (here only --help)."""
    script = Path(__file__).resolve().parents[2] / "bench" / "e2e" / "run.py"
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=process_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "--tool" in result.stdout and "--quick" in result.stdout


@pytest.mark.parametrize(("seconds", "whole"), [(0.5, "1"), (1.0, "1"), (2.5, "3"), (10, "10")])
def test_iperf3_is_given_whole_seconds(seconds: float, whole: str) -> None:
    # iperf3 reads -t as an integer: "0.5" meant 0, "run for ever", and the bench hung.
    argv = _client_argv("10.77.0.2", seconds)
    assert argv[argv.index("-t") + 1] == whole
