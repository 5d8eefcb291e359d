"""What a client leaves behind (issue 7 part 5), and what it cleans up of its own.

* SIGKILL: the kernel deletes the non-persistent TUN device with the last
  fd, and the device's address and routes with it; only the control socket
  file stays (nothing can remove it), and the next start removes it.
* A client starting with the name of a dead one removes the stale state of
  that name (a persistent TUN device ``p2pvpn-NAME`` with an address and a
  route on it, a control socket nobody listens on) and runs normally.
* SIGTERM: the client removes everything itself and exits 0.
* This module leaves no ``p2t-`` namespace of this run behind.

The server pushes a system route (``--sdwan``) so that every client has a
route of its own on the TUN device, besides the connected one.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from p2pvpn.netns import Client, TestBed, VpnNetwork, list_namespaces, p2pvpn_argv
from tests.integration.faults_support import (
    A_IP,
    B_IP,
    make_stale_socket,
    routes_via,
    tun_links,
)

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("no_namespace_left_behind")]

SDWAN_NET = "10.99.0.0/24"
SDWAN = f"10.77.0.0/24,{SDWAN_NET},{B_IP}"


@pytest.fixture
def vpn(testbed: TestBed, tmp_path: Path) -> VpnNetwork:
    network = VpnNetwork(testbed, tmp_path)
    network.start_server("--sdwan", SDWAN)
    return network


def control_socket(client: Client) -> Path:
    return client.state_root / client.name / "control.sock"


def wait_running(vpn: VpnNetwork, client: Client, peer: str) -> None:
    """TUN up with its address, the system route installed, status answers, peer reachable."""
    vpn.wait_for_tun(client)
    vpn.bed.wait_until(
        lambda: any(r.get("dst") == SDWAN_NET for r in routes_via(client.ns, client.interface)),
        timeout=30,
        message=f"{client.name}: system route {SDWAN_NET} never installed",
    )
    assert client.process is not None
    status = client.status()
    assert status["pid"] == client.process.pid
    assert status["interface"] == client.interface
    vpn.wait_ping(client, peer)


def assert_nothing_left(client: Client) -> None:
    """No TUN device, no address, no route of the client's in its namespace."""
    __tracebackhide__ = True
    assert client.interface not in client.ns.interfaces()
    assert tun_links(client.ns) == []
    assert routes_via(client.ns, client.interface) == []
    assert not [r for r in client.ns.routes() if r.get("dst") == SDWAN_NET]
    assert A_IP not in {str(iface.ip) for iface in client.ns.addresses()}


def assert_sigterm_cleans_up(client: Client) -> None:
    """SIGTERM: the client exits 0 and leaves nothing behind, its control socket included."""
    __tracebackhide__ = True
    assert client.process is not None
    client.process.send_signal(signal.SIGTERM)
    assert client.process.wait(15) == 0, client.process.tail(20)
    assert_nothing_left(client)
    assert not control_socket(client).exists()


def status_error(client: Client) -> str:
    result = client.ns.run(
        p2pvpn_argv("status", "--state-dir", str(client.state_root), "-n", client.name),
        check=False,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_sigkill_leaves_only_a_stale_socket_that_the_next_start_removes(
    vpn: VpnNetwork,
) -> None:
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.wait_for_tun(b)
    wait_running(vpn, a, B_IP)
    namespaces = set(list_namespaces())

    assert a.process is not None
    a.process.send_signal(signal.SIGKILL)
    assert a.process.wait(10) == -signal.SIGKILL
    vpn.bed.wait_until(lambda: a.interface not in a.ns.interfaces(), timeout=10)
    assert_nothing_left(a)
    assert set(list_namespaces()) == namespaces, "a client must not create namespaces"
    # The one thing a SIGKILL leaves: the control socket file, recognised as stale.
    assert control_socket(a).is_socket()
    assert "stale control socket" in status_error(a)

    vpn.start_client(a)
    wait_running(vpn, a, B_IP)
    assert control_socket(a).is_socket()

    assert_sigterm_cleans_up(a)
    assert "no control socket" in status_error(a)
    assert f"stopped; {a.interface} removed" in a.process.log_text()


def test_start_removes_a_stale_persistent_tun_device_and_socket(vpn: VpnNetwork) -> None:
    ns = vpn.client_namespace("a")
    interface = "p2pvpn-a"
    # What a crashed client of an older version (or `ip tuntap add`) leaves behind:
    # a persistent device, configured and up, with a route through it.
    ns.ip("tuntap", "add", interface, "mode", "tun")
    ns.ip("addr", "add", f"{A_IP}/24", "dev", interface)
    ns.ip("link", "set", interface, "up")
    ns.ip("route", "add", SDWAN_NET, "dev", interface)
    a = vpn.add_client("a", tun=f"{A_IP}/24", ns=ns, start=False)
    make_stale_socket(control_socket(a))
    info = ns.link_info(interface)
    assert info is not None and info["linkinfo"]["info_data"]["persist"] is True

    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.start_client(a)
    vpn.wait_for_tun(b)
    assert a.process is not None
    a.process.wait_for_log(f"deleting stale TUN device {interface}")
    wait_running(vpn, a, B_IP)
    info = ns.link_info(interface)
    assert info is not None
    assert info["linkinfo"]["info_data"]["persist"] is False, "the stale device was reused"

    assert_sigterm_cleans_up(a)


def test_sigterm_removes_everything(vpn: VpnNetwork) -> None:
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.wait_for_tun(b)
    wait_running(vpn, a, B_IP)
    assert_sigterm_cleans_up(a)
    # b noticed nothing bad: it still runs and keeps its own device.
    assert b.process is not None and b.process.alive()
    assert b.has_tun()


def test_sigterm_while_the_server_is_gone_removes_everything(vpn: VpnNetwork) -> None:
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.wait_for_tun(b)
    wait_running(vpn, a, B_IP)
    assert vpn.server_process is not None
    vpn.server_process.send_signal(signal.SIGKILL)
    vpn.server_process.wait(10)
    vpn.bed.wait_until(
        lambda: a.status()["server"]["state"] != "connected",
        timeout=15,
        message="a never noticed the server was gone",
    )
    assert_sigterm_cleans_up(a)


def test_server_sigterm_does_not_wait_for_an_unreachable_client(vpn: VpnNetwork) -> None:
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    vpn.wait_for_tun(a)
    # a's host stops answering (cable pulled): nothing from or to the server gets through.
    a.ns.nft(
        """
table ip p2t_unplug {
    chain input {
        type filter hook input priority -10; policy accept;
        tcp sport 8080 drop
    }
    chain output {
        type filter hook output priority -10; policy accept;
        tcp dport 8080 drop
    }
}
"""
    )
    server = vpn.server_process
    assert server is not None
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(5)
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGKILL)  # spares the teardown its own 5 s grace
        pytest.fail("the server was still running 5 s after SIGTERM")
    print(f"MEASURED server_sigterm_exit_s={time.monotonic() - started:.2f}")
    assert rc == 0, server.tail(20)


def test_second_instance_leaves_the_running_client_alone(vpn: VpnNetwork) -> None:
    a = vpn.add_client("a", tun=f"{A_IP}/24")
    b = vpn.add_client("b", tun=f"{B_IP}/24")
    vpn.wait_for_tun(b)
    wait_running(vpn, a, B_IP)
    second = vpn.bed.start(a.ns, p2pvpn_argv(*a.argv), "a-second")
    try:
        rc = second.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("the second instance kept running next to the first")
    assert rc != 0
    assert "already running" in second.log_text()
    # The running client must be untouched: its device, its routes, its traffic.
    assert a.process is not None and a.process.alive()
    assert a.has_tun(), "the second instance deleted the running client's TUN device"
    assert routes_via(a.ns, a.interface)
    assert a.ns.ping(B_IP, count=2, timeout=2.0)
