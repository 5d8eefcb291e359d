"""What a data plane refuses, run once per backend: the batch overflow of
coalesced receives, replayed datagrams, IPIP from the wrong sender, transit
without relaying, routing loops, and junk from the STUN server's address.

An attacker here is a plain UDP socket on loopback that holds the password
(a malicious member) or only replays what it captured (anyone on the path).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from p2pvpn.dataplane import create_data_plane
from p2pvpn.dataplane.base import DropReason
from p2pvpn.wire.crypto import DatagramCipher
from p2pvpn.wire.ipv4 import encapsulate_ipip
from p2pvpn.wire.peer import Heartbeat
from p2pvpn.wire.stun import encode_binding_response
from tests.dataplane.conftest import (
    Node,
    NodeFactory,
    Recorder,
    after_hops,
    eventually,
    ipv4_packet,
    plane_kind,
    settle,
)
from tests.udp_offload import enlarge_receive_buffer, send_run, take_runs_whole

A, B, C, D, X = "10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.99"
LAN_BEHIND_C = IPv4Network("172.30.0.0/16")
RUN = 64  # the most segments one UDP GSO message carries on older kernels


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(body)


def drops(node: Node, reason: DropReason) -> int:
    return node.plane.stats().drops.get(reason, 0)


class Attacker:
    """A UDP socket on loopback that seals with the receiver's key."""

    def __init__(self, receiver: Node) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.receiver = receiver
        self.cipher = DatagramCipher(receiver.key)

    def seal(self, plaintext: bytes) -> bytes:
        return self.cipher.seal(plaintext)

    def send(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.sock.sendto(datagram, self.receiver.address)

    def send_run(self, datagrams: list[bytes]) -> None:
        send_run(self.sock, datagrams, self.receiver.address)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def attackers() -> Any:
    made: list[Attacker] = []

    def make(receiver: Node) -> Attacker:
        attacker = Attacker(receiver)
        made.append(attacker)
        return attacker

    yield make
    for attacker in made:
        attacker.close()


def started_target(make_node: NodeFactory, make_attacker: Any) -> tuple[Node, Attacker]:
    """A started node B and an attacker sending to it."""
    b = make_node(B)
    b.plane.start()
    return b, make_attacker(b)


def make_room(node: Node, backend: str) -> None:
    """Queues that hold thousands of datagrams, and (fast) coalesced receives
    from the first datagram on: the plane only sets UDP_GRO when it starts,
    and these tests queue everything before that, so one recvmmsg sees it all."""
    node._tun.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 23)
    node.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    enlarge_receive_buffer(node.udp)
    if backend != "pure":
        take_runs_whole(node.udp)


def forward(source: str, destination: str, ident: int, size: int = 200, ttl: int = 64) -> bytes:
    return b"\x01" + ipv4_packet(source, destination, bytes(size), ident=ident, ttl=ttl)


async def collect(node: Node, count: int, timeout: float = 20.0) -> list[bytes]:
    received: list[bytes] = []

    def arrived() -> bool:
        received.extend(node.delivered())
        return len(received) >= count

    await eventually(arrived, timeout=timeout)
    return received


# -- the batch overflow --------------------------------------------------------


def test_a_run_of_64_relayed_then_single_datagrams_in_one_batch(
    make_node: NodeFactory, backend: str, attackers: Any
) -> None:
    async def body() -> None:
        b, c = make_node(B, relaying=True), make_node(C)
        make_room(b, backend)
        make_room(c, backend)
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        sender = attackers(b)
        packets = [forward(A, C, n) for n in range(RUN)]
        singles = [forward(A, C, RUN + n, size=90) for n in range(3)]
        sender.send_run([sender.seal(packet) for packet in packets])
        sender.send(*(sender.seal(packet) for packet in singles))
        c.plane.start()
        b.plane.start()
        received = await collect(c, len(packets) + len(singles))
        assert sorted(received) == sorted(after_hops(p[1:]) for p in packets + singles)
        assert b.plane.stats().drops == {}

    run(body())


def test_64_single_control_messages_after_a_run_of_64(
    make_node: NodeFactory, backend: str, attackers: Any
) -> None:
    async def body() -> None:
        b = make_node(B)
        make_room(b, backend)
        sender = attackers(b)
        run_of_heartbeats = [Heartbeat(IPv4Address(A), IPv4Address(B), n, True) for n in range(RUN)]
        # Another size: a DELAY-sized message, so the singles never join the run.
        singles = [b"\x02" + bytes(15) + bytes([n]) for n in range(RUN)]
        sender.send_run([sender.seal(heartbeat.encode()) for heartbeat in run_of_heartbeats])
        sender.send(*(sender.seal(single) for single in singles))
        b.plane.start()
        await eventually(lambda: len(b.events.control) == 2 * RUN, timeout=20)
        assert [data for data, _ in b.events.control] == [
            *(heartbeat.encode() for heartbeat in run_of_heartbeats),
            *singles,
        ]
        assert b.plane.stats().drops == {}

    run(body())


def test_the_most_entries_one_receive_returns_all_relayed(
    make_node: NodeFactory, backend: str, attackers: Any
) -> None:
    """64 recvmmsg entries, each a coalesced run of 64: 4096 packets to relay
    from one receive."""

    async def body() -> None:
        b, c = make_node(B, relaying=True), make_node(C)
        make_room(b, backend)
        make_room(c, backend)
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        sender = attackers(b)
        expected = []
        for entry in range(RUN):
            packets = [forward(A, C, entry * RUN + n, size=40) for n in range(RUN)]
            sender.send_run([sender.seal(packet) for packet in packets])
            expected += [after_hops(packet[1:]) for packet in packets]
        c.plane.start()
        b.plane.start()
        received = await collect(c, len(expected), timeout=30)
        assert sorted(received) == sorted(expected)
        assert b.plane.stats().drops == {}
        assert b.plane.stats().peers[c.tun_ip].packets_out == len(expected)

    run(body())


# -- replays -----------------------------------------------------------------


def test_a_replayed_forward_is_delivered_once_and_counted(
    make_node: NodeFactory, attackers: Any
) -> None:
    async def body() -> None:
        b, attacker = started_target(make_node, attackers)
        captured = attacker.seal(forward(A, B, 1))
        attacker.send(*[captured] * 6)
        await eventually(lambda: drops(b, DropReason.REPLAY) == 5)
        assert b.delivered() == [forward(A, B, 1)[1:]]
        assert b.plane.stats().tun_packets_out == 1

    run(body())


def test_a_replayed_heartbeat_goes_up_once(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        b, attacker = started_target(make_node, attackers)
        heartbeat = Heartbeat(IPv4Address(A), IPv4Address(B), 1, True).encode()
        captured = attacker.seal(heartbeat)
        attacker.send(captured, captured, captured, attacker.seal(heartbeat))
        await eventually(lambda: drops(b, DropReason.REPLAY) == 2)
        await eventually(lambda: len(b.events.control) == 2)
        assert [data for data, _ in b.events.control] == [heartbeat, heartbeat]

    run(body())


def test_tampered_copies_do_not_enter_the_record(make_node: NodeFactory, attackers: Any) -> None:
    """Only authenticated datagrams are recorded: a forged datagram that
    reuses a real IV must not get the real one refused later."""

    async def body() -> None:
        b, attacker = started_target(make_node, attackers)
        genuine = attacker.seal(forward(A, B, 7))
        forged = genuine[:12] + bytes(len(genuine) - 12)
        attacker.send(forged, genuine)
        await eventually(lambda: len(b.delivered()) == 1)
        assert drops(b, DropReason.AUTHENTICATION) == 1
        assert drops(b, DropReason.REPLAY) == 0

    run(body())


def test_the_record_covers_its_window_only(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        b = make_node(B, replay_window=0.2)
        b.plane.start()
        attacker = attackers(b)
        captured = attacker.seal(forward(A, B, 1))
        attacker.send(captured)
        await eventually(lambda: b.plane.stats().tun_packets_out == 1)
        # Buckets of half a window, three kept: gone after 1.5 windows.
        await asyncio.sleep(0.5)
        attacker.send(captured)
        await eventually(lambda: b.plane.stats().tun_packets_out == 2)
        assert drops(b, DropReason.REPLAY) == 0

    run(body())


# -- IPIP ----------------------------------------------------------------------


def test_ipip_is_unwrapped_only_from_the_next_hop_of_its_inner_source(
    make_node: NodeFactory, attackers: Any
) -> None:
    async def body() -> None:
        b = make_node(B)
        b.plane.set_sysroutes([(LAN_BEHIND_C, IPv4Address(C))])
        b.plane.start()
        attacker = attackers(b)
        from_lan = ipv4_packet("172.30.1.5", B, b"from the LAN behind C")
        own = ipv4_packet(A, "192.168.7.7", b"A's own packet to B's LAN")

        def wrapped(inner: bytes, outer_source: str) -> bytes:
            return attacker.seal(
                b"\x01" + encapsulate_ipip(inner, IPv4Address(outer_source), b.tun_ip)
            )

        attacker.send(
            wrapped(from_lan, D),  # D claims C's LAN: refused
            wrapped(ipv4_packet("10.1.2.3", B), A),  # from nowhere we route: refused
            wrapped(from_lan, C),  # the gateway itself
            wrapped(own, A),  # a client wrapping its own packet
        )
        await eventually(lambda: drops(b, DropReason.IPIP_SOURCE) == 2)
        received = await collect(b, 2)
        assert sorted(received) == sorted([from_lan, own])

    run(body())


def test_ipip_from_the_server_is_always_unwrapped(make_node: NodeFactory) -> None:
    async def body() -> None:
        b = make_node(B)
        b.plane.start()
        inner = ipv4_packet("172.30.1.5", B)
        b.plane.write_tun(encapsulate_ipip(inner, IPv4Address(D), b.tun_ip))
        await eventually(lambda: b.delivered() == [inner])

    run(body())


# -- transit and loops ---------------------------------------------------------


def test_without_relaying_nothing_passes_through(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        b, c = make_node(B), make_node(C)
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        b.plane.start()
        c.plane.start()
        attacker = attackers(b)
        attacker.send(attacker.seal(forward(A, C, 1)), attacker.seal(forward(A, X, 2)))
        await eventually(lambda: drops(b, DropReason.TRANSIT) == 2)
        await settle()
        assert c.delivered() == []
        assert b.events.relay == []
        assert b.plane.stats().peers.get(c.tun_ip) is None or (
            b.plane.stats().peers[c.tun_ip].packets_out == 0
        )

    run(body())


def test_a_packet_whose_ttl_runs_out_is_not_relayed(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        b, c = make_node(B, relaying=True), make_node(C)
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        b.plane.start()
        c.plane.start()
        attacker = attackers(b)
        attacker.send(
            attacker.seal(forward(A, C, 1, ttl=1)),
            attacker.seal(forward(A, C, 2, ttl=0)),
            attacker.seal(forward(A, C, 3, ttl=2)),
        )
        received = await collect(c, 1)
        assert received == [after_hops(forward(A, C, 3, ttl=2)[1:])]
        assert received[0][8] == 1
        assert drops(b, DropReason.TTL_EXPIRED) == 2

    run(body())


def test_a_two_node_loop_ends_at_once(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        b, c = make_node(B, relaying=True), make_node(C, relaying=True)
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        c.plane.set_peer(b.tun_ip, b.address, b.key)
        b.plane.set_route(IPv4Address(X), c.tun_ip)
        c.plane.set_route(IPv4Address(X), b.tun_ip)
        b.plane.start()
        c.plane.start()
        attacker = attackers(b)
        attacker.send(attacker.seal(forward(A, X, 1)))
        await eventually(lambda: drops(c, DropReason.LOOP) == 1)
        await settle()
        # Counted by the packet's destination, not by the next hop.
        assert b.plane.stats().peers[IPv4Address(X)].packets_out == 1
        assert drops(b, DropReason.LOOP) == 0

    run(body())


def test_a_three_node_loop_dies_out_by_ttl(make_node: NodeFactory, attackers: Any) -> None:
    async def body() -> None:
        nodes = [make_node(ip, relaying=True) for ip in (B, C, D)]
        for here, there in zip(nodes, nodes[1:] + nodes[:1], strict=True):
            here.plane.set_peer(there.tun_ip, there.address, there.key)
            here.plane.set_route(IPv4Address(X), there.tun_ip)
            here.plane.start()
        attacker = attackers(nodes[0])
        attacker.send(attacker.seal(forward(A, X, 1, ttl=30)))

        def hops() -> int:
            return sum(
                counters.packets_out
                for node in nodes
                for counters in node.plane.stats().peers.values()
            )

        await eventually(lambda: sum(drops(n, DropReason.TTL_EXPIRED) for n in nodes) == 1)
        await settle()
        # TTL 30 leaves the first node as 29 and is dropped where it would reach 0.
        assert hops() == 29

    run(body())


# -- the STUN server's address -------------------------------------------------


def test_only_binding_responses_from_the_stun_address_go_up_as_stun(
    make_node: NodeFactory, attackers: Any
) -> None:
    async def body() -> None:
        b, stun = started_target(make_node, attackers)
        b.plane.set_stun_server(stun.address)
        answer = encode_binding_response(bytes(12), (IPv4Address("192.0.2.1"), 32853))
        heartbeat = Heartbeat(IPv4Address(A), IPv4Address(B), 1, True).encode()
        stun.send(b"junk from the STUN address, long enough to open", answer, stun.seal(heartbeat))
        await eventually(lambda: len(b.events.stun) == 1 and len(b.events.control) == 1)
        assert b.events.stun == [(answer, stun.address)]
        assert drops(b, DropReason.AUTHENTICATION) == 1
        # No request outstanding: the same answer is just a datagram that
        # does not authenticate.
        b.plane.set_stun_server(None)
        stun.send(answer)
        await eventually(lambda: drops(b, DropReason.AUTHENTICATION) == 2)
        assert len(b.events.stun) == 1

    run(body())


# -- construction --------------------------------------------------------------


@pytest.mark.parametrize("relaying", [False, True])
def test_create_data_plane_passes_relaying_on(backend: str, relaying: bool) -> None:
    async def body() -> None:
        kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = Node(backend, B)  # only for its key and offloads
        offloads = {"tun_offloads": b.tun_offloads} if b.tun_offloads else {}
        try:
            plane = create_data_plane(
                plane_kind(backend),
                tun_fd=tun.fileno(),
                udp_socket=udp,
                tun_ip=b.tun_ip,
                key=b.key,
                events=Recorder(),
                relaying=relaying,
                **offloads,
            )
            assert plane.implementation == plane_kind(backend)
            assert plane.tun_offloads == b.tun_offloads
            plane.start()
            try:
                sender.sendto(DatagramCipher(b.key).seal(forward(A, X, 1)), udp.getsockname())
                reason = DropReason.TRANSIT if not relaying else None
                await eventually(
                    lambda: plane.stats().relay_packets_out + sum(plane.stats().drops.values()) == 1
                )
                assert plane.stats().drops == ({reason: 1} if reason else {})
            finally:
                plane.close()
        finally:
            b.close()
            for sock in (kernel, tun, udp, sender):
                sock.close()

    run(body())
