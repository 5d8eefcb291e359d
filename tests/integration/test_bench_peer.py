"""`p2pvpn bench peer` between two real clients in namespaces (issue 14).

The direct path and, with UDP cut between the two NAT sites, the server's
relay; a peer that did not agree to answer; and the two ways of agreeing:
`p2pvpn bench serve` beside the client, or ``--bench-server`` in it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.bench.traffic import DEFAULT_PORT
from p2pvpn.netns import (
    Client,
    TestBed,
    VpnNetwork,
    block_udp_between,
    nat_client,
    p2pvpn_argv,
    wait_connected,
)
from tests.integration.faults_support import WAN

pytestmark = [pytest.mark.netns, pytest.mark.slow]

A_IP, B_IP = "10.77.0.11", "10.77.0.12"
# Six tests of a second, an idle RTT and the connections: far less than this.
BENCH_TIMEOUT = 60.0


@pytest.fixture
def vpn(testbed: TestBed, tmp_path: Path) -> VpnNetwork:
    return VpnNetwork(testbed, tmp_path, wan=WAN)


def bench_peer(
    client: Client, target: str, json_file: Path | None = None, seconds: str = "1"
) -> subprocess.CompletedProcess[str]:
    argv = ["bench", "peer", target, "--state-dir", str(client.state_root), "-n", client.name]
    argv += ["--seconds", seconds]
    if json_file is not None:
        argv += ["--json", str(json_file)]
    return client.ns.run(p2pvpn_argv(*argv), check=False, timeout=BENCH_TIMEOUT)


def measured(client: Client, target: str, json_file: Path, seconds: str = "1") -> dict[str, Any]:
    """The JSON results of a bench run that must succeed."""
    result = bench_peer(client, target, json_file, seconds)
    print(result.stdout)  # the table, in the report of a failing test
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_file.read_text())
    assert report["command"] == "peer" and report["ok"], report
    assert report["machine"]["hostname"]
    results: dict[str, Any] = report["results"]
    for direction in ("upload", "download"):
        assert results[direction]["tcp"]["bits_per_second"] > 0, results[direction]
        assert results[direction]["udp"]["received_packets"] > 0, results[direction]
        assert results[direction]["loaded"]["rtt"]["received"] > 0, results[direction]
    assert results["rtt_idle"]["received"] > 0
    return results


def test_bench_serve_direct_then_relayed_and_a_refusal(vpn: VpnNetwork, tmp_path: Path) -> None:
    vpn.start_server()
    a, site_a = nat_client(vpn, "a", A_IP)
    b, site_b = nat_client(vpn, "b", B_IP)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    wait_connected(vpn, a, b)

    refused = bench_peer(a, B_IP)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        f"p2pvpn bench peer: error: {B_IP} does not answer benchmarks on port {DEFAULT_PORT}: "
        "run `p2pvpn bench serve` there (or set bench_server = true in its config)"
    ) in refused.stderr

    serve_argv = ["bench", "serve", "--state-dir", str(b.state_root), "-n", "b"]
    serve = vpn.bed.start_p2pvpn(b.ns, serve_argv, "bench-serve")
    serve.wait_for_log(rf"answering `p2pvpn bench peer` on {B_IP}:{DEFAULT_PORT}")
    # On the VPN address alone: nothing listens on b's LAN or on 0.0.0.0.
    assert f"{B_IP}:{DEFAULT_PORT}" in b.ns.run(["ss", "-ltnH"]).stdout
    assert f"0.0.0.0:{DEFAULT_PORT}" not in b.ns.run(["ss", "-lntuH"]).stdout

    direct = measured(a, B_IP, tmp_path / "direct.json")
    assert direct["path"]["kind_before"] == "direct", direct["path"]
    assert direct["path"]["before"].startswith(f"direct {site_b.public_ip}:")
    assert "bench: 10.77.0.11 asked for" in serve.log_text()

    block_udp_between(site_a.router, str(site_b.public_ip))
    for client, peer_ip in ((a, B_IP), (b, A_IP)):
        vpn.bed.wait_until(
            lambda client=client, peer_ip=peer_ip: (
                (client.peer(peer_ip) or {}).get("path") == "relay server"
            ),
            timeout=30,
            interval=0.5,
            message=f"{client.name} kept the direct path to {peer_ip} over a cut path",
        )
    relayed = measured(a, B_IP, tmp_path / "relayed.json")
    assert relayed["path"]["kind_before"] == "relay server", relayed["path"]

    assert serve.terminate() == 0
    assert "bench server stopped" in serve.log_text()


def test_a_client_with_bench_server_answers_itself(vpn: VpnNetwork, tmp_path: Path) -> None:
    vpn.start_server()
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", "--bench-server", tun=f"{B_IP}/24")
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.bed.wait_until(
        lambda: b.status().get("bench_server") == f"{B_IP}:{DEFAULT_PORT}",
        timeout=30,
        message="b never started its bench server",
    )
    shown = b.ns.run(p2pvpn_argv("status", "--state-dir", str(b.state_root), "-n", "b"))
    assert f"bench server: on {B_IP}:{DEFAULT_PORT}" in shown.stdout
    assert a.status().get("bench_server") is None
    vpn.wait_ping(a, B_IP)

    results = measured(a, B_IP, tmp_path / "peer.json", seconds="0.5")
    assert results["path"]["kind_before"] == "relay server"  # no STUN here: the server relays
    assert results["cpu"]["seconds"] is not None and results["cpu"]["seconds"] > 0
    assert b.process is not None
    assert b.process.terminate() == 0
