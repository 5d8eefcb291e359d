"""UDP offloads in the compiled data plane.

The fast plane sends a run of same-size datagrams to one peer as one UDP GSO
message; the kernel cuts it back into those datagrams, so a receiver (a
Candy peer, a pure plane, a plain socket here) must see exactly the
datagrams it would have seen without. When the kernel refuses segmentation
(here: a path MTU below the datagram size) the plane turns it off and sends
the same datagrams one by one, losing none.

Its socket also takes such runs in coalesced (UDP_GRO; on loopback a GSO
send arrives whole), and the plane must take them apart into the same
datagrams, also when a run makes more packets to relay than one batch holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

from p2pvpn.wire.crypto import DatagramCipher, peer_key
from tests.dataplane.conftest import (
    PASSWORD,
    Node,
    Recorder,
    after_hops,
    eventually,
    ipv4_packet,
)
from tests.udp_offload import UDP_GRO

pytestmark = pytest.mark.fastpath

A, B, C = "10.9.0.1", "10.9.0.2", "10.9.0.3"


def _packets_that_coalesce_in_every_way() -> list[tuple[str, bytes]]:
    """(destination, packet) in TUN order, all read in the plane's first batches."""
    full = 1400 - 28  # an IPv4/UDP packet of 1400 bytes
    plan: list[tuple[str, int]] = []
    plan += [(B, full)] * 40  # one run
    plan += [(B, 300)]  # a shorter datagram ends it
    plan += [(B, full)] * 10  # a new run
    plan += [(B, 60), (C, 60), (B, 60), (C, 60)]  # peers alternate: no runs
    plan += [(C, 1000)] * 70  # over 64 segments and over 64 KiB: split
    plan += [(C, 1000), (C, 1001)]  # a longer datagram starts a new run
    return [
        (destination, ipv4_packet(A, destination, bytes([n % 251]) * size, ident=n))
        for n, (destination, size) in enumerate(plan)
    ]


def _receive(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    datagrams: list[bytes] = []
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while len(datagrams) < count and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            datagrams.append(sock.recv(70000))
    return datagrams


def send_through_a_fast_plane(udp_offload: bool) -> dict[str, Any]:
    """Send the packets above from a fast plane to two plain UDP sockets
    (peers B and C); return whether each received exactly its packets, in
    order and one datagram each, and whether segmentation is still on."""
    from p2pvpn._fastpath import FastDataPlane

    packets = _packets_that_coalesce_in_every_way()
    kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receivers = {peer: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for peer in (B, C)}
    try:
        kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        udp.bind(("127.0.0.1", 0))
        for receiver in receivers.values():
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            receiver.bind(("127.0.0.1", 0))
        plane = FastDataPlane(
            tun.fileno(),
            udp,
            IPv4Address(A),
            peer_key(PASSWORD, IPv4Address(A)),
            Recorder(),
            udp_offload=udp_offload,
        )
        for peer, receiver in receivers.items():
            plane.set_peer(
                IPv4Address(peer), receiver.getsockname(), peer_key(PASSWORD, IPv4Address(peer))
            )
        # Queued before the workers start, so their first reads are full batches.
        for _, packet in packets:
            kernel.send(packet)

        async def run() -> dict[str, Any]:
            plane.start()
            try:
                result: dict[str, Any] = {}
                for peer, receiver in receivers.items():
                    expected = [packet for destination, packet in packets if destination == peer]
                    datagrams = await asyncio.to_thread(_receive, receiver, len(expected))
                    cipher = DatagramCipher(peer_key(PASSWORD, IPv4Address(peer)))
                    opened = [cipher.open(datagram) for datagram in datagrams]
                    result[peer] = {
                        "expected": len(expected),
                        "received": len(opened),
                        "exact": opened == [b"\x01" + packet for packet in expected],
                    }
                result["segmentation"] = plane.udp_segmentation
                result["send_failed"] = plane.stats().drops.get("send_failed", 0)
                return result
            finally:
                plane.close()

        return asyncio.run(run())
    finally:
        for sock in (kernel, tun, udp, *receivers.values()):
            sock.close()


def assert_every_packet_arrived_alone(result: dict[str, Any]) -> None:
    for peer in (B, C):
        assert result[peer]["received"] == result[peer]["expected"], (peer, result)
        assert result[peer]["exact"], (peer, result)
    assert result["send_failed"] == 0


def test_runs_leave_segmented_and_arrive_as_the_same_datagrams() -> None:
    result = send_through_a_fast_plane(udp_offload=True)
    assert_every_packet_arrived_alone(result)
    assert result["segmentation"] is True  # Linux >= 4.18 on loopback


def test_without_segmentation_the_same_datagrams_arrive() -> None:
    result = send_through_a_fast_plane(udp_offload=False)
    assert_every_packet_arrived_alone(result)
    assert result["segmentation"] is False


def _make_room(node: Node) -> None:
    """Room for a few hundred full-size packets in each of a node's queues.

    The fake TUN is a unix socket, whose sender (the plane) gets EAGAIN when
    the unread packets fill its send buffer; a real TUN device never does."""
    node._tun.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    node.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    node.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)


def _collector(node: Node, count: int) -> tuple[list[bytes], Callable[[], bool]]:
    """The packets `node` writes to TUN, and a predicate: have `count` arrived?"""
    received: list[bytes] = []

    def done() -> bool:
        received.extend(node.delivered())
        return len(received) >= count

    return received, done


def test_coalesced_runs_are_taken_apart_into_the_same_packets() -> None:
    packets = [packet for _, packet in _packets_that_coalesce_in_every_way()]
    packets = [ipv4_packet(A, B, packet[28:], ident=n) for n, packet in enumerate(packets)]

    async def body() -> None:
        a, b = Node("fast", A), Node("fast", B)
        try:
            _make_room(a)
            _make_room(b)
            a.plane.set_peer(b.tun_ip, b.address, b.key)
            a.inject(*packets)
            b.plane.start()
            a.plane.start()
            assert b.plane.udp_receive_offload  # type: ignore[attr-defined]
            assert "gro" in b.plane.udp_offloads
            received, all_arrived = _collector(b, len(packets))
            await eventually(all_arrived, timeout=10)
            assert received == packets
            assert b.plane.stats().drops == {}
        finally:
            a.close()
            b.close()

    asyncio.run(body())


def test_a_coalesced_run_to_relay_larger_than_a_batch_is_relayed_whole() -> None:
    """A sends to C through B: B's socket takes runs of up to 64 in, each a
    packet to re-seal, so one receive batch overflows its send batch."""
    count = 300
    packets = [ipv4_packet(A, C, bytes([n % 251]) * 1300, ident=n) for n in range(count)]

    async def body() -> None:
        a, b, c = Node("fast", A), Node("fast", B, relaying=True), Node("fast", C)
        try:
            for node in (a, b, c):
                _make_room(node)
            a.plane.set_peer(b.tun_ip, b.address, b.key)
            a.plane.set_route(c.tun_ip, b.tun_ip)
            b.plane.set_peer(c.tun_ip, c.address, c.key)
            a.inject(*packets)
            c.plane.start()
            b.plane.start()
            a.plane.start()
            received, all_arrived = _collector(c, count)
            await eventually(all_arrived, timeout=10)
            assert received == [after_hops(packet) for packet in packets]
            assert b.plane.stats().drops == {}
            assert b.plane.stats().peers[c.tun_ip].packets_out == count
        finally:
            for node in (a, b, c):
                node.close()

    asyncio.run(body())


def test_close_gives_the_socket_back_without_receive_offload() -> None:
    async def body() -> None:
        node = Node("fast", A)
        try:
            node.plane.start()
            assert node.udp.getsockopt(socket.SOL_UDP, UDP_GRO) == 1
            node.plane.close()
            assert node.udp.getsockopt(socket.SOL_UDP, UDP_GRO) == 0
        finally:
            node.close()

    asyncio.run(body())
