"""Smoke test of the end-to-end benchmark (bench/e2e/run.py --quick, raw and pure only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pvpn.netns import process_env
from tests import REPO_ROOT
from tests.integration.conftest import require_netns, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.netns]

SCRIPT = REPO_ROOT / "bench" / "e2e" / "run.py"


def test_quick_run_measures_raw_and_pure(tmp_path: Path) -> None:
    require_netns()
    require_tool("iperf3")
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "raw,pure", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO_ROOT,
        env=process_env(),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text(encoding="utf-8"))
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
    assert "raw" in result.stdout and "pure" in result.stdout
