"""Client failover end to end: two plain servers, two clients given both URLs, one server killed.

Real `p2pvpn server` and `p2pvpn run` processes in namespaces. The servers
share the password and the dhcp range but nothing else (no cluster): what is
tested is the client side, i.e. that a client moves to the other URL at once
and keeps its TUN device, its address (asked back with EXPTTUN) and its
direct path to the other client through the switch.
"""

from __future__ import annotations

import signal
import time

import pytest

from p2pvpn.netns import DHCP, WS_PORT, Client, VpnNetwork, p2pvpn_argv, wait_connected
from tests.integration.faults_support import Record

pytestmark = pytest.mark.netns

SECOND_PORT = WS_PORT + 1


def ifindex(client: Client) -> int:
    info = client.ns.link_info(client.interface)
    assert info is not None, f"{client.name} has no TUN device"
    return int(info["ifindex"])


def on_second(client: Client) -> bool:
    server = client.status()["server"]
    return bool(server["state"] == "connected" and server["url"].endswith(f":{SECOND_PORT}/"))


def test_clients_move_to_the_second_server_and_keep_tun_address_and_peer(
    vpn: VpnNetwork, measured: Record
) -> None:
    vpn.start_server()
    second_url = f"ws://{vpn.server_ip}:{SECOND_PORT}/"
    second_argv = ["server", "-w", f"ws://0.0.0.0:{SECOND_PORT}/", "-p", vpn.password]
    second_argv += ["--stun-port", "0", "--dhcp", DHCP]
    vpn.bed.start(vpn.server_ns, p2pvpn_argv(*second_argv), "server-2")
    vpn.bed.wait_until(
        lambda: vpn.server_ns.listening("tcp", SECOND_PORT),
        timeout=30,
        message="the second server never listened",
    )
    a = vpn.add_client("a", "-w", second_url, stun=True)
    b = vpn.add_client("b", "-w", second_url, stun=True)
    a_address, b_address = vpn.wait_for_tun(a), vpn.wait_for_tun(b)
    wait_connected(vpn, a, b)
    before = {client.name: ifindex(client) for client in (a, b)}
    assert a.status()["server"]["servers"] == 2

    assert vpn.server_process is not None
    killed_at = time.monotonic()
    vpn.server_process.send_signal(signal.SIGKILL)
    for client in (a, b):
        vpn.bed.wait_until(
            lambda client=client: on_second(client),  # type: ignore[misc]
            timeout=30,
            interval=0.05,
            message=f"{client.name} never logged in on the second server",
        )
    switched_after = time.monotonic() - killed_at
    measured("failover_seconds", switched_after)

    # Same device (not re-created), same address, and the peers never lost each other.
    assert {client.name: ifindex(client) for client in (a, b)} == before
    assert (a.tun_address(), b.tun_address()) == (a_address, b_address)
    for client, other in ((a, b), (b, a)):
        row = client.peer(other.tun_ip())
        assert row is not None and row["state"] == "CONNECTED", row
    server = a.status()["server"]
    assert (server["index"], server["servers"]) == (2, 2)
    assert server["switches"] >= 1
    assert a.ns.ping(b.tun_ip(), count=3, timeout=2.0)
    assert a.process is not None
    assert "lost, trying ws://" in a.process.log_text()
