"""Helpers for the fault, replay and cleanup tests (issue 7).

The p2pvpn network, its NAT clients, `PingLog` and the peer state changes
of client logs are in `p2pvpn.netns` (the soak benchmark uses them too);
here is what only the tests need:

* `flaps`, `flap_episodes`: when a client left CONNECTED, grouped by cause;
* `rebind_udp`: make a NAT router hand out a new public UDP port (a NAT
  mapping change, "rebinding") by re-mapping UDP and flushing its conntrack;
* `add_udp_loss`: random loss with nftables ``numgen`` (``tc netem`` is not
  available everywhere, and not on the machine these tests were written on);
* `delayed_nat_site`: a NAT site whose WAN cable is a userspace L2 delay line
  (two AF_PACKET sockets in a namespace of their own), for latency without
  ``netem``;
Everything runs inside namespaces the test bed creates.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from p2pvpn.netns import (
    BULK_PORT,
    BULK_RECEIVER,
    BULK_SENDER,
    NAT_TABLE,
    SEGMENT_BRIDGE,
    Client,
    Namespace,
    NatMode,
    NatSite,
    Process,
    Segment,
    TestBed,
    Transition,
    VpnNetwork,
    nat_client,
    nat_site,
    state_changes,
    wait_connected,
)

# What the `measured` fixture (conftest.py) gives a test: measured(key, value).
Record = Callable[[str, object], None]

WAN = "198.51.100.0/24"
"""The "internet": a documentation range that exists only inside the namespaces."""
A_IP, B_IP, C_IP = "10.77.0.11", "10.77.0.12", "10.77.0.13"


# --------------------------------------------------------------------------
# clients behind NATs


def connected_pair(vpn: VpnNetwork) -> tuple[Client, NatSite, Client, NatSite]:
    """Server plus clients a and b behind their own NATs, CONNECTED to each other."""
    vpn.start_server()
    a, site_a = nat_client(vpn, "a", A_IP)
    b, site_b = nat_client(vpn, "b", B_IP)
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    wait_connected(vpn, a, b)
    return a, site_a, b, site_b


def direct_endpoint(row: dict[str, Any] | None) -> tuple[str, int] | None:
    """``("198.51.100.3", 40000)`` from a status row whose path is ``direct ip:port``."""
    if row is None:
        return None
    match = re.fullmatch(r"(?:direct|lan) ([\d.]+):(\d+)", str(row.get("path", "")))
    return (match.group(1), int(match.group(2))) if match else None


# --------------------------------------------------------------------------
# what the clients logged


def flaps(process: Process | None, peer: str, *, after: float = 0.0) -> list[Transition]:
    """Every time the client left CONNECTED for ``peer`` after ``after``."""
    return [c for c in state_changes(process, peer) if c.old == "CONNECTED" and c.when >= after]


# A peer that leaves CONNECTED stops sending heartbeats (PROTOCOL 4), so the other
# side loses its acks and follows within the 3 s window plus a tick or two.
CASCADE_WINDOW_S = 6.0


def flap_episodes(transitions: list[Transition]) -> list[list[Transition]]:
    """Group flaps into episodes: one root flap and those it caused on the other side."""
    episodes: list[list[Transition]] = []
    for flap in sorted(transitions, key=lambda t: t.when):
        if episodes and flap.when - episodes[-1][0].when <= CASCADE_WINDOW_S:
            episodes[-1].append(flap)
        else:
            episodes.append([flap])
    return episodes


# --------------------------------------------------------------------------
# bulk transfers


class BulkTransfer:
    """A TCP transfer of ``size`` bytes through the tunnel, running in the background."""

    def __init__(
        self, vpn: VpnNetwork, sender: Client, receiver: Client, address: str, size: int
    ) -> None:
        self.size = size
        self.receiver = vpn.bed.start(
            receiver.ns, ["python3", "-c", BULK_RECEIVER, str(BULK_PORT)], "bulk-rx"
        )
        self.receiver.wait_for_log("ready")
        self.started = time.time()
        self.sender = vpn.bed.start(
            sender.ns, ["python3", "-c", BULK_SENDER, address, str(BULK_PORT), str(size)], "bulk-tx"
        )

    def done(self) -> bool:
        return f"received {self.size}" in self.receiver.log_text()

    def wait(self, vpn: VpnNetwork, timeout: float = 120) -> float:
        """Wait for the receiver to count every byte; returns the elapsed seconds."""
        vpn.bed.wait_until(
            self.done, timeout=timeout, interval=0.2, message=f"bulk transfer of {self.size} B"
        )
        rc = self.sender.wait(30)
        assert rc == 0, f"bulk sender failed ({rc}):\n{self.sender.tail(20)}"
        return time.time() - self.started


def bulk_transfer(
    vpn: VpnNetwork, sender: Client, receiver: Client, address: str, size: int
) -> float:
    """A complete bulk transfer; returns the elapsed seconds."""
    return BulkTransfer(vpn, sender, receiver, address, size).wait(vpn)


# --------------------------------------------------------------------------
# NAT rebinding, loss and delay

_FLUSH_UDP_CONNTRACK = """
import socket
from pyroute2.conntrack import Conntrack, NFCTAttrTuple
with Conntrack() as ct:
    entries = list(ct.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_UDP)))
    for entry in entries:
        ct.delete(entry)
print(len(entries))
"""


def flush_udp_conntrack(router: Namespace) -> int:
    """Delete the router's UDP conntrack entries (and so its UDP NAT mappings)."""
    return int(router.python(_FLUSH_UDP_CONNTRACK).stdout.strip() or 0)


def rebind_udp(site: NatSite, new_port: int) -> int:
    """Make ``site``'s NAT map UDP to ``new_port`` from now on, and forget old mappings.

    A masquerade limited to one port keeps the mapping endpoint-independent
    (every destination sees ``public_ip:new_port``, as with plain
    port-preserving masquerade), so STUN and hole punching keep working; what
    changes is the port the peers see. Returns how many UDP mappings were dropped.
    """
    wan = site.wan_ifname
    site.router.run(
        [
            "nft",
            "insert",
            "rule",
            "ip",
            NAT_TABLE,
            "postrouting",
            "oifname",
            wan,
            "meta",
            "l4proto",
            "udp",
            "masquerade",
            "to",
            f":{new_port}",
        ]
    )
    return flush_udp_conntrack(site.router)


def add_udp_loss(router: Namespace, other_public_ip: str, percent: int) -> None:
    """Drop ``percent`` % of the UDP between this site and ``other_public_ip``, each way."""
    router.nft(f"""
table ip p2t_loss {{
    chain forward {{
        type filter hook forward priority -10; policy accept;
        ip daddr {other_public_ip} meta l4proto udp numgen random mod 100 < {percent} drop
        ip saddr {other_public_ip} meta l4proto udp numgen random mod 100 < {percent} drop
    }}
}}
""")


def clear_udp_loss(router: Namespace) -> None:
    router.run(["nft", "delete", "table", "ip", "p2t_loss"])


DELAY_WIRE = r"""
import collections, select, socket, sys, time
ETH_P_ALL = 3
SOL_PACKET = 263
PACKET_VNET_HDR = 15         # GSO frames travel whole, with their virtio header
PACKET_IGNORE_OUTGOING = 23  # do not read back what we send
left, right, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000.0

def open_port(ifname):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock

ports = [open_port(left), open_port(right)]
queues = [collections.deque(), collections.deque()]  # queues[i]: frames to send on ports[i]
errors = 0
print("delay wire", left, "<->", right, "one way", delay * 1000, "ms", flush=True)
while True:
    due = [queue[0][0] for queue in queues if queue]
    timeout = max(0.0, min(due) - time.monotonic()) if due else 1.0
    readable, _, _ = select.select(ports, [], [], timeout)
    now = time.monotonic()
    for index, sock in enumerate(ports):
        if sock in readable:
            out = queues[1 - index]
            for _ in range(512):
                try:
                    frame = sock.recv(262144)
                except BlockingIOError:
                    break
                out.append((now + delay, frame))
    for index, queue in enumerate(queues):
        while queue and queue[0][0] <= now:
            try:
                ports[index].send(queue.popleft()[1])
            except OSError as exc:
                errors += 1
                if errors <= 10:
                    print("send failed:", exc, flush=True)
"""
"""A two-port L2 "cable" that delays every frame by argv[3] ms in each direction."""


def delayed_nat_site(
    bed: TestBed,
    name: str,
    wan: Segment,
    lan_cidr: str,
    *,
    one_way_ms: float,
    wan_address: str,
    mode: NatMode = "port-preserving",
) -> tuple[NatSite, Process]:
    """Like `TestBed.nat_site`, but the router's WAN cable delays each frame ``one_way_ms``.

    ``wan -- <name>-dly (delay wire, no address) -- <name>-nat (NAT) -- <name>``.
    ``tc netem`` would be the usual tool; this works on kernels without
    CONFIG_NET_SCH_NETEM. Returns the site and the wire's process.
    """
    router = bed.namespace(f"{name}-nat")
    host = bed.namespace(name)
    wire = bed.namespace(f"{name}-dly")
    wire_wan = wire.next_ifname()
    hub_port = f"w-{name}"[:15]
    wan.hub.add_veth(hub_port, wire, wire_wan, master=SEGMENT_BRIDGE)
    cable = bed.link(router, wire, f"{wan_address}/{wan.network.prefixlen}")
    wire_nat = cable.ifname(wire)
    for ifname in (wire_wan, wire_nat):
        wire.ip("link", "set", "dev", ifname, "promisc", "on")
    process = bed.start_python(
        wire, ["-c", DELAY_WIRE, wire_wan, wire_nat, str(one_way_ms)], f"{name}-delay-wire"
    )
    process.wait_for_log("delay wire")
    site = nat_site(router, host, cable.ifname(router), cable.address(router), lan_cidr, mode=mode)
    return site, process


# --------------------------------------------------------------------------
# processes and leftovers


def tun_links(ns: Namespace) -> list[str]:
    """Names of the TUN devices in ``ns``."""
    return [
        link["ifname"]
        for link in ns.ip_json("-d", "link", "show")
        if link.get("linkinfo", {}).get("info_kind") == "tun"
    ]


def routes_via(ns: Namespace, ifname: str) -> list[dict[str, Any]]:
    return [route for route in ns.routes() if route.get("dev") == ifname]


def make_stale_socket(path: Path) -> None:
    """A unix socket file nobody listens on, as a SIGKILLed client leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
    finally:
        sock.close()


def other_port(port: int, choices: Iterable[int] = (40000, 40001)) -> int:
    """A port in ``choices`` that is not ``port``."""
    return next(p for p in choices if p != port)
