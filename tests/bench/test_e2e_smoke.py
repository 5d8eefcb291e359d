"""Smoke test of the end-to-end benchmark: one ``bench/e2e/run.py --quick`` run of
raw, pure, fast-no-offload and fast, checked by two tests (the fast ones need the
compiled data plane)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from p2pvpn.netns import process_env
from tests import REPO_ROOT
from tests.integration.conftest import require_netns, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.netns]

SCRIPT = REPO_ROOT / "bench" / "e2e" / "run.py"
VARIANTS = ("raw", "pure", "fast-no-offload", "fast")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The table the run printed and its JSON report."""
    require_netns()
    require_tool("iperf3")
    out = tmp_path_factory.mktemp("e2e") / "results.json"
    argv = [sys.executable, str(SCRIPT), "--quick", "--only", ",".join(VARIANTS)]
    result = subprocess.run(
        [*argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO_ROOT,
        env=process_env(),
    )
    # Exit 0 also when the fast variants are "unavailable" (no compiled data plane).
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout, json.loads(out.read_text(encoding="utf-8"))


def test_quick_run_measures_raw_and_pure(quick_run: tuple[str, dict[str, Any]]) -> None:
    table, report = quick_run
    for variant in ("raw", "pure"):
        row = report["results"][variant]
        assert row["status"] == "ok", row
        assert row["tcp"]["bits_per_second"] > 0
        assert row["ping_idle"]["received"] > 0
    pure = report["results"]["pure"]
    assert pure["dataplane"] == "pure"
    assert pure["path"].startswith("direct ")
    assert pure["tcp"]["cpu_seconds_per_gb"] > 0
    assert report["ratios"]["pure"]["tcp"] > 0
    assert "raw" in table and "pure" in table


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
        assert row["tcp"]["bits_per_second"] > 0
        assert row["tcp"]["cpu_seconds_per_gb"] > 0
        assert row["ping_loaded"]["p99_ms"] is not None
    # The status check before measuring saw each variant's configuration.
    for client in ("c1", "c2"):
        assert results["fast-no-offload"]["tun_offloads"][client] == []
        assert {"csum", "tso4"} <= set(results["fast"]["tun_offloads"][client])
    # Every target is computed (met or not: a quick run on a busy machine judges nothing).
    targets = {target["key"]: target for target in report["ratios"]["targets"]}
    assert set(targets) == {
        "fast_vs_no_offload_tcp",
        "fast_vs_no_offload_cpu_per_gb",
        "fast_vs_no_offload_loaded_rtt_p99",
        "fast_vs_raw_tcp",
    }
    for target in targets.values():
        assert target["ratio"] is not None and target["ratio"] > 0, target
        assert target["met"] in (True, False), target
    assert "targets of issue 13" in table and "fast-no-offload" in table
