"""Direct connections through NAT (issue 4): real processes, real nftables NAT routers.

The "internet" is 198.51.100.0/24, a documentation range that exists only
inside these namespaces; using a non-RFC 1918 range keeps public and LAN
addresses apart as they are on a real network.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from p2pvpn.netns import (
    Namespace,
    TestBed,
    VpnNetwork,
    block_udp_between,
    make_nat_router,
    nat_client,
    peer_state,
    unblock,
    wait_state,
)
from tests.integration.faults_support import WAN, bulk_transfer

pytestmark = pytest.mark.netns

A_IP, B_IP, C_IP = "10.77.0.11", "10.77.0.12", "10.77.0.13"


@pytest.fixture
def vpn(testbed: TestBed, tmp_path: Path) -> VpnNetwork:
    return VpnNetwork(testbed, tmp_path, wan=WAN)


class Pinger:
    """Pings continuously from a namespace until stopped (keeps hints and traffic flowing)."""

    def __init__(self, ns: Namespace, address: str) -> None:
        self._ns, self._address = ns, address
        self._stop = threading.Event()
        self.replies = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._ns.ping(self._address, count=1, timeout=1.0):
                self.replies += 1
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_two_clients_behind_nats_connect_directly(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a, _ = nat_client(vpn, "a", A_IP)
    b, site_b = nat_client(vpn, "b", B_IP)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, B_IP)
    # CONNECTED within 15 s of the first packet (the ping above).
    row = wait_state(vpn, a, B_IP, {"CONNECTED"}, timeout=15)
    assert row["path"].startswith(f"direct {site_b.public_ip}:"), row
    wait_state(vpn, b, A_IP, {"CONNECTED"}, timeout=15)
    # From now on the server carries nothing between a and b.
    relay_before = a.status()["relay"]["packets_out"], b.status()["relay"]["packets_out"]
    for _ in range(5):
        assert a.ns.ping(B_IP, count=1, timeout=2.0)
    bulk_transfer(vpn, a, b, B_IP, 20_000_000)
    relay_after = a.status()["relay"]["packets_out"], b.status()["relay"]["packets_out"]
    assert relay_after == relay_before
    assert a.peer(B_IP)["bytes_out"] >= 20_000_000  # type: ignore[index]
    status = a.status()
    assert status["direct"]["bytes_out"] >= 20_000_000
    if status["dataplane"] == "fast":
        # The bulk transfer went through both NATs with the offloads on: UDP's,
        # and the TUN's (offload = auto), with USO on Linux 6.2 and later.
        assert status["udp_offloads"] == ["gso", "gro"], status
        assert status["tun_offloads"] in (["csum", "tso4", "uso4"], ["csum", "tso4"]), status


def test_two_clients_on_one_lan_connect_over_the_lan(vpn: VpnNetwork) -> None:
    vpn.start_server()
    router = vpn.bed.namespace("r-nat")
    vpn.wan.attach(router)
    hosts = [vpn.bed.namespace(name) for name in ("a", "b")]
    lan = vpn.bed.segment("lan", "192.168.50.0/24", [router, *hosts])
    for host in hosts:
        host.default_route(lan.ip(router))
    make_nat_router(router, vpn.wan.ifname(router))
    a = vpn.add_client("a", tun=f"{A_IP}/24", ns=hosts[0], stun=True)
    b = vpn.add_client("b", tun=f"{B_IP}/24", ns=hosts[1], stun=True)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, B_IP)
    row = wait_state(vpn, a, B_IP, {"CONNECTED"}, timeout=20)
    vpn.bed.wait_until(
        lambda: a.peer(B_IP)["path"].startswith("lan 192.168.50."),  # type: ignore[index]
        timeout=10,
        message=f"a never used the LAN path: {row}",
    )
    assert a.ns.ping(B_IP, count=3, timeout=2.0)


@pytest.mark.slow
def test_randomising_nat_falls_back_to_the_relay_and_retries(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a, _ = nat_client(vpn, "a", A_IP, "random")
    b, _ = nat_client(vpn, "b", B_IP)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    pinger = Pinger(a.ns, B_IP)
    try:
        wait_state(vpn, a, B_IP, {"WAITING", "FAILED"}, timeout=40)
        row = a.peer(B_IP)
        assert row is not None and row["path"] == "relay server"
        replies = pinger.replies
        vpn.bed.wait_until(
            lambda: pinger.replies > replies + 3,
            timeout=20,
            message="traffic stopped when the direct path failed",
        )
        # The back-off ends (30 s) and the peer tries again: INIT, then PREPARING.
        assert a.process is not None
        vpn.bed.wait_until(
            lambda: "WAITING -> INIT" in a.process.log_text(),  # type: ignore[union-attr]
            timeout=60,
            message="the WAITING retry never happened",
        )
        vpn.bed.wait_until(
            lambda: a.process.log_text().count("INIT -> PREPARING") >= 2,  # type: ignore[union-attr]
            timeout=30,
            message="no second attempt after the retry",
        )
    finally:
        pinger.stop()


@pytest.mark.slow
def test_cut_udp_path_falls_back_and_reconnects(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a, site_a = nat_client(vpn, "a", A_IP)
    b, site_b = nat_client(vpn, "b", B_IP)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, B_IP)
    wait_state(vpn, a, B_IP, {"CONNECTED"}, timeout=15)
    pinger = Pinger(a.ns, B_IP)
    try:
        block_udp_between(site_a.router, str(site_b.public_ip))
        cut = time.monotonic()
        vpn.bed.wait_until(
            lambda: peer_state(a, B_IP) != "CONNECTED",
            timeout=10,
            message="a stayed CONNECTED over a cut path",
        )
        assert time.monotonic() - cut < 5 + 1  # 3 s ack window plus a tick of slack
        replies = pinger.replies
        vpn.bed.wait_until(
            lambda: pinger.replies > replies + 3,
            timeout=20,
            message="traffic did not continue via the server",
        )
        unblock(site_a.router)
        wait_state(vpn, a, B_IP, {"CONNECTED"}, timeout=120)
        wait_state(vpn, b, A_IP, {"CONNECTED"}, timeout=30)
    finally:
        pinger.stop()


@pytest.mark.slow
def test_client_relaying_routes_around_a_blocked_pair(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a, site_a = nat_client(vpn, "a", A_IP, "port-preserving", "--route", "5")
    b, _ = nat_client(vpn, "b", B_IP, "port-preserving", "--route", "5")
    c, site_c = nat_client(vpn, "c", C_IP, "port-preserving", "--route", "5")
    block_udp_between(site_a.router, str(site_c.public_ip))
    for client in (a, b, c):
        vpn.wait_for_tun(client)
    vpn.wait_ping(a, B_IP)
    vpn.wait_ping(b, C_IP)
    wait_state(vpn, a, B_IP, {"CONNECTED"}, timeout=20)
    wait_state(vpn, b, C_IP, {"CONNECTED"}, timeout=20)
    pinger = Pinger(a.ns, C_IP)
    try:
        row = vpn.bed.wait_until(
            lambda: (r := a.peer(C_IP)) is not None and r["path"] == f"via {B_IP}" and r,
            timeout=90,
            message="a never routed c via b",
        )
        assert row
        relay_before = a.status()["relay"]["packets_out"]
        for _ in range(5):
            assert a.ns.ping(C_IP, count=1, timeout=2.0)
        # Pings to c still go via b: the server saw none of them.
        assert a.status()["relay"]["packets_out"] == relay_before
    finally:
        pinger.stop()


def test_without_stun_peers_fail_and_the_relay_carries_traffic(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, B_IP)
    row = wait_state(vpn, a, B_IP, {"FAILED"}, timeout=30)
    assert row["path"] == "relay server"
    assert a.ns.ping(B_IP, count=3, timeout=2.0)
