"""The soak of bench/soak/soak.py, one minute of it (issue 7 part 4; two until the
suite outgrew its 15 minutes: `bench/soak/soak.py --duration` runs longer ones).

Traffic through a network whose direct path is cut every 30 s must keep
flowing, and no p2pvpn process may grow (RSS, fds, threads) beyond the
soak's bounds after its warm-up.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from p2pvpn.netns import cleanup_run, list_namespaces, process_env, python_argv
from tests import REPO_ROOT
from tests.integration.conftest import require_tool

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.usefixtures("no_namespace_left_behind"),
]

SOAK = REPO_ROOT / "bench" / "soak" / "soak.py"
DURATION = 60
FLAP_INTERVAL = 30
MAX_RSS_MB, MAX_FDS, MAX_THREADS = 20, 20, 4


def test_one_minute_soak_with_flaps(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    record_property = request.node.user_properties.append
    require_tool("nft", "nftables")
    out = tmp_path / "soak.json"
    argv = python_argv(str(SOAK), "--duration", str(DURATION))
    argv += ["--flap-interval", str(FLAP_INTERVAL), "--json", str(out)]
    argv += ["--log-dir", str(tmp_path / "soak")]
    argv += ["--max-rss-mb", str(MAX_RSS_MB), "--max-fds", str(MAX_FDS)]
    argv += ["--max-threads", str(MAX_THREADS)]
    soak = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=process_env(),
    )
    prefix = f"p2t-{soak.pid:x}-"
    try:
        output, _ = soak.communicate(timeout=DURATION + 240)
    except subprocess.TimeoutExpired:
        soak.send_signal(signal.SIGTERM)
        output, _ = soak.communicate(timeout=60)
        pytest.fail(f"the soak did not finish in time:\n{output}")
    finally:
        left = list_namespaces(prefix)
        cleanup_run(prefix)
    print(output)
    assert not left, f"the soak left namespaces behind: {left}"
    assert soak.returncode == 0, output
    result = json.loads(out.read_text())

    processes = {p["role"]: p for p in result["processes"]}
    assert set(processes) == {"server", "a", "b"}, processes.keys()
    for role, process in processes.items():
        growth = process["growth"]
        record_property((f"{role}_growth", growth))
        record_property((f"{role}_max", process["max"]))
        assert growth["rss_mb"] <= MAX_RSS_MB, (role, growth)
        assert growth["fds"] <= MAX_FDS, (role, growth)
        assert growth["threads"] <= MAX_THREADS, (role, growth)

    ping, traffic, flaps = result["ping"], result["traffic"], result["flaps"]
    record_property(("ping", ping))
    record_property(("traffic", {k: traffic[k] for k in ("tool", "bytes", "mbit_s", "failures")}))
    record_property(("flaps", flaps))
    # A cut costs ~3 s of pings (until the ack window closes), then the relay carries them.
    assert ping["ratio"] >= 0.7, ping
    assert traffic["bytes"] >= 20_000_000, traffic
    assert len(flaps) >= DURATION // FLAP_INTERVAL - 1, flaps
    for flap in flaps:
        assert flap.get("reconnected_after_restore_s") is not None, flaps
    for name, row in result["final_peers"].items():
        assert row is not None and row.get("state") == "CONNECTED", (name, row)
