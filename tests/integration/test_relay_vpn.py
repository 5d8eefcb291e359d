"""A relayed VPN end to end: real `p2pvpn server` and `p2pvpn run` processes in namespaces.

No STUN server is configured here, so every packet goes through the server
(issue 3); direct paths are tested in test_direct_vpn.py.
"""

from __future__ import annotations

import signal
import time
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from p2pvpn.netns import DHCP, WS_PORT, TestBed, VpnNetwork
from p2pvpn.server.tls import make_self_signed_certificate, write_certificate

pytestmark = pytest.mark.netns

UDP_RECEIVER = """
import socket, struct, sys
port, group, iface_ip = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
if group != "-":
    mreq = socket.inet_aton(group) + socket.inet_aton(iface_ip)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
print("ready", flush=True)
while True:
    data, source = s.recvfrom(2048)
    print("got", data.decode(), source[0], flush=True)
"""

UDP_SENDER = """
import socket, sys
destination, port, iface_ip, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = int(sys.argv[5]) if len(sys.argv) > 5 else 1
size = int(sys.argv[6]) if len(sys.argv) > 6 else 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface_ip))
s.bind((iface_ip, 0))
payload = text.encode().ljust(size, b".")
for _ in range(count):
    s.sendto(payload, (destination, port))
"""


@pytest.fixture
def vpn(testbed: TestBed, tmp_path: Path) -> VpnNetwork:
    return VpnNetwork(testbed, tmp_path)


PLAIN_WARNING = "is plain ws://: relayed packets, routes and address grants"


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_two_static_clients_ping_through_the_server(
    vpn: VpnNetwork, tmp_path: Path, scheme: str
) -> None:
    """Relayed over ws:// (with the client's warning) and over wss:// trusted through tls_ca."""
    if scheme == "wss":
        certificate = make_self_signed_certificate([str(vpn.server_ip)])
        vpn.serve_tls(*write_certificate(certificate, tmp_path))
    server = vpn.start_server()
    a = vpn.add_client("a", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    assert vpn.wait_for_tun(a) == IPv4Interface("10.77.0.11/24")
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, "10.77.0.12")
    vpn.wait_ping(b, "10.77.0.11")
    status = a.status()
    assert status["server"]["state"] == "connected"
    assert status["relay"]["packets_out"] > 0  # no STUN here: the pings went over the server
    assert f"listening on {scheme}://0.0.0.0:{WS_PORT}" in server.log_text()
    assert a.process is not None
    assert a.process.log_text().count(PLAIN_WARNING) == (1 if scheme == "ws" else 0)


def test_dynamic_addresses_are_distinct_and_sticky(vpn: VpnNetwork) -> None:
    vpn.start_server()
    clients = [vpn.add_client(name) for name in ("a", "b", "c")]
    addresses = [vpn.wait_for_tun(client) for client in clients]
    assert len({address.ip for address in addresses}) == 3
    for address in addresses:
        assert address.network == IPv4Network(DHCP)
    vpn.wait_ping(clients[0], addresses[1].ip)
    # Restarting a client (same state directory, so same vmac) gives its old address back.
    first = clients[0]
    assert first.process is not None
    assert first.process.terminate() == 0
    vpn.start_client(first)
    assert vpn.wait_for_tun(first) == addresses[0]
    vpn.wait_ping(first, addresses[2].ip)


def test_wrong_password_exits_with_a_clear_error(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a = vpn.add_client("a", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    vpn.wait_ping(a, "10.77.0.12")
    intruder = vpn.add_client("x", tun="10.77.0.13/24", password="not the password")
    assert intruder.process is not None
    started = time.monotonic()
    returncode = intruder.process.wait(timeout=30)
    assert returncode != 0
    assert time.monotonic() - started < 20
    assert "wrong password" in intruder.process.log_text()
    assert not intruder.has_tun()
    vpn.wait_ping(b, "10.77.0.11")


def test_clients_reconnect_after_a_server_restart(vpn: VpnNetwork) -> None:
    server = vpn.start_server()
    a = vpn.add_client("a", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    vpn.wait_ping(a, "10.77.0.12")
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=10)
    vpn.bed.wait_until(
        lambda: a.status()["server"]["state"] != "connected",
        timeout=60,
        message="client a never noticed the server was gone",
    )
    vpn.restart_server()
    vpn.wait_ping(a, "10.77.0.12", timeout=90)
    vpn.wait_ping(b, "10.77.0.11", timeout=30)
    assert a.status()["server"]["reconnects"] >= 1
    assert a.has_tun()


def test_duplicate_static_address_kicks_the_older_client(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a = vpn.add_client("a", tun="10.77.0.11/24")
    old = vpn.add_client("old", tun="10.77.0.12/24")
    vpn.wait_ping(a, "10.77.0.12")
    new = vpn.add_client("new", tun="10.77.0.12/24")
    assert old.process is not None
    # The two fight with kicks until the one kicked first has been kicked three times.
    assert old.process.wait(timeout=60) != 0
    assert "another client logged in with the same address" in old.process.log_text()
    vpn.wait_for_tun(new)
    vpn.wait_ping(a, "10.77.0.12")
    assert new.process is not None and new.process.alive()


def test_broadcast_and_multicast_reach_every_other_client(vpn: VpnNetwork) -> None:
    vpn.start_server()
    names = {"a": "10.77.0.11", "b": "10.77.0.12", "c": "10.77.0.13"}
    clients = {name: vpn.add_client(name, tun=f"{ip}/24") for name, ip in names.items()}
    for client in clients.values():
        vpn.wait_for_tun(client)
    vpn.wait_ping(clients["a"], "10.77.0.13")
    # 224.0.0.0/4 and the limited broadcast need a route via the TUN device.
    a = clients["a"]
    a.ns.ip("route", "add", "224.0.0.0/4", "dev", a.interface)
    a.ns.ip("route", "add", "255.255.255.255/32", "dev", a.interface)
    receivers = {
        name: vpn.bed.start(
            clients[name].ns,
            ["python3", "-c", UDP_RECEIVER, "5000", "239.1.2.3", names[name]],
            f"receiver-{name}",
        )
        for name in ("b", "c")
    }
    for receiver in receivers.values():
        receiver.wait_for_log("ready")
    for destination, text in (
        ("10.77.0.255", "directed"),
        ("255.255.255.255", "limited"),
        ("239.1.2.3", "multicast"),
    ):
        a.ns.run(["python3", "-c", UDP_SENDER, destination, "5000", names["a"], text])
        for receiver in receivers.values():
            receiver.wait_for_log(f"got {text} 10.77.0.11", timeout=15)


def test_sdwan_route_reaches_a_lan_behind_another_client(testbed: TestBed, vpn: VpnNetwork) -> None:
    vpn.start_server("--sdwan", "10.77.0.0/24,172.30.0.0/16,10.77.0.12")
    a = vpn.add_client("a", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    lan_host = testbed.namespace("lanhost")
    lan = testbed.link(b.ns, lan_host, "172.30.0.1/24", "172.30.0.2/24")
    assert lan is not None
    lan_host.default_route("172.30.0.1")
    b.ns.enable_forwarding()
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.bed.wait_until(
        lambda: any(r.get("dst") == "172.30.0.0/16" for r in a.ns.routes()),
        timeout=30,
        message="client a never got the sdwan route",
    )
    vpn.wait_ping(a, "172.30.0.2")
    assert a.status()["sysroutes"] == [{"network": "172.30.0.0/16", "nexthop": "10.77.0.12"}]


def test_status_counts_the_relayed_bytes(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a = vpn.add_client("a", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    vpn.wait_ping(a, "10.77.0.12")
    vpn.wait_ping(b, "10.77.0.11")
    receiver = vpn.bed.start(
        b.ns, ["python3", "-c", UDP_RECEIVER, "6000", "-", "10.77.0.12"], "receiver"
    )
    receiver.wait_for_log("ready")
    before_a, before_b = a.status(), b.status()
    # 10 datagrams of 100 bytes: 10 IP packets of 128 bytes each way counted once.
    a.ns.run(["python3", "-c", UDP_SENDER, "10.77.0.12", "6000", "10.77.0.11", "n", "10", "100"])
    vpn.bed.wait_until(
        lambda: b.status()["relay"]["packets_in"] - before_b["relay"]["packets_in"] >= 10,
        timeout=15,
        message="b never received the 10 packets",
    )
    after_a, after_b = a.status(), b.status()
    assert after_a["relay"]["packets_out"] - before_a["relay"]["packets_out"] == 10
    assert after_a["relay"]["bytes_out"] - before_a["relay"]["bytes_out"] == 1280
    assert after_b["relay"]["packets_in"] - before_b["relay"]["packets_in"] == 10
    assert after_b["relay"]["bytes_in"] - before_b["relay"]["bytes_in"] == 1280
    peer = next(row for row in after_a["peers"] if row["tun_ip"] == "10.77.0.12")
    assert peer["path"] == "relay server"
    assert "password" not in str(after_a)


def test_sigterm_removes_the_tun_device_and_routes(vpn: VpnNetwork) -> None:
    vpn.start_server("--sdwan", "10.77.0.0/24,172.31.0.0/16,10.77.0.12")
    a = vpn.add_client("a", tun="10.77.0.11/24")
    vpn.wait_for_tun(a)
    vpn.bed.wait_until(
        lambda: any(r.get("dst") == "172.31.0.0/16" for r in a.ns.routes()),
        timeout=30,
        message="client a never got the sdwan route",
    )
    assert a.process is not None
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(timeout=15) == 0
    assert not a.has_tun()
    assert not any(r.get("dst") == "172.31.0.0/16" for r in a.ns.routes())
    assert not any("p2pvpn" in str(r.get("dev")) for r in a.ns.routes())


SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode())
"""


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        sample_name, _, rest = sample.partition("{")
        sample_labels = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample_name == name and sample_labels == wanted:
            return float(value)
    raise AssertionError(f"no sample {name}{{{wanted}}} in metrics")


def test_metrics_endpoint_counts_the_relayed_traffic(vpn: VpnNetwork) -> None:
    vpn.start_server()
    a = vpn.add_client("a", "--metrics", "127.0.0.1:9310", tun="10.77.0.11/24")
    b = vpn.add_client("b", tun="10.77.0.12/24")
    vpn.wait_ping(a, "10.77.0.12")
    receiver = vpn.bed.start(
        b.ns, ["python3", "-c", UDP_RECEIVER, "6000", "-", "10.77.0.12"], "receiver"
    )
    receiver.wait_for_log("ready")

    def scrape() -> str:
        return a.ns.run(["python3", "-c", SCRAPE, "127.0.0.1:9310"]).stdout

    before = scrape()
    a.ns.run(["python3", "-c", UDP_SENDER, "10.77.0.12", "6000", "10.77.0.11", "m", "25", "200"])
    receiver.wait_for_log("got m", timeout=15)
    vpn.bed.wait_until(
        lambda: b.status()["relay"]["packets_in"] >= 25, timeout=15, message="b missed packets"
    )
    after = scrape()
    sent = metric(after, "p2pvpn_packets_total", path="relay", direction="out")
    sent -= metric(before, "p2pvpn_packets_total", path="relay", direction="out")
    sent_bytes = metric(after, "p2pvpn_bytes_total", path="relay", direction="out")
    sent_bytes -= metric(before, "p2pvpn_bytes_total", path="relay", direction="out")
    assert (sent, sent_bytes) == (25, 25 * 228)
    assert metric(after, "p2pvpn_server_connected") == 1
    status = a.status()
    assert (
        metric(after, "p2pvpn_bytes_total", path="relay", direction="out")
        <= status["relay"]["bytes_out"]
    )
    assert "integration-password" not in after
