"""Behaviour every data plane must share, run once per backend."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from p2pvpn.dataplane.base import MAX_PEER_COUNTERS, DropReason
from p2pvpn.wire.crypto import DatagramCipher, peer_key
from p2pvpn.wire.ipv4 import decapsulate_ipip, encapsulate_ipip, parse_ipv4_header
from p2pvpn.wire.peer import Heartbeat
from p2pvpn.wire.stun import encode_binding_request, encode_binding_response
from tests.dataplane.conftest import (
    PASSWORD,
    Node,
    NodeFactory,
    after_hops,
    connected_pair,
    eventually,
    ipv4_packet,
    settle,
)

A, B, C = "10.9.0.1", "10.9.0.2", "10.9.0.3"
TRANSACTION_ID = bytes(range(12))


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(body)


def connect(sender: Node, receiver: Node) -> None:
    sender.plane.set_peer(receiver.tun_ip, receiver.address, receiver.key)


def test_packets_reach_the_peer_byte_for_byte(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = connected_pair(make_node, A, B)
        packets = [ipv4_packet(A, B, bytes([n]) * (20 + n), ident=n) for n in range(10)]
        a.inject(*packets)
        received: list[bytes] = []
        await eventually(lambda: bool(received.extend(b.delivered())) or len(received) >= 10)
        assert received == packets
        assert a.events.relay == []
        stats = a.plane.stats()
        assert stats.peers[b.tun_ip].packets_out == 10
        assert b.plane.stats().tun_packets_out == 10

    run(body())


@pytest.mark.parametrize("count", [1, 63, 64, 65, 200])
def test_batch_boundaries(make_node: NodeFactory, count: int) -> None:
    async def body() -> None:
        a, b = connected_pair(make_node, A, B)
        packets = [ipv4_packet(A, B, count.to_bytes(2, "big") * 10, ident=n) for n in range(count)]
        a.inject(*packets)
        received: list[bytes] = []
        await eventually(lambda: bool(received.extend(b.delivered())) or len(received) >= count)
        assert received == packets

    run(body())


def test_udp_offloads_names_only_what_the_plane_uses(make_node: NodeFactory) -> None:
    node = make_node("10.0.0.1")
    offloads = node.plane.udp_offloads
    assert set(offloads) <= {"gso", "gro"}
    if node.plane.implementation == "pure":
        assert offloads == ()  # one datagram per system call


def test_packet_without_direct_path_goes_up_for_the_relay(make_node: NodeFactory) -> None:
    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        packet = ipv4_packet(A, B)
        a.inject(packet)
        await eventually(lambda: a.events.relay == [packet])
        assert a.plane.stats().relay_packets_out == 1

    run(body())


def test_write_tun_delivers_and_unwraps_ipip(make_node: NodeFactory) -> None:
    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        inner = ipv4_packet("172.30.0.5", A)
        a.plane.write_tun(ipv4_packet(B, A))
        a.plane.write_tun(encapsulate_ipip(inner, IPv4Address(B), IPv4Address(A)))
        received: list[bytes] = []
        await eventually(lambda: bool(received.extend(a.delivered())) or len(received) >= 2)
        assert received == [ipv4_packet(B, A), inner]

    run(body())


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), DropReason.AUTHENTICATION),
        (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], DropReason.AUTHENTICATION),
        (lambda d: bytes([d[0] ^ 1]) + d[1:], DropReason.AUTHENTICATION),
        (lambda d: d[:20], DropReason.TOO_SHORT),
        (lambda d: b"", DropReason.TOO_SHORT),
    ],
    ids=["ciphertext", "tag", "iv", "truncated", "empty"],
)
def test_bad_datagrams_are_dropped_and_counted(
    make_node: NodeFactory, mangle: Callable[[bytes], bytes], reason: DropReason
) -> None:
    async def body() -> None:
        b = make_node(B)
        b.plane.start()
        datagram = DatagramCipher(b.key).seal(b"\x01" + ipv4_packet(A, B))
        sender = make_node(A)
        sender.udp.sendto(mangle(datagram), b.address)
        await eventually(lambda: b.plane.stats().drops.get(reason, 0) == 1)
        await settle()
        assert b.delivered() == []
        assert b.events.control == [] and b.events.relay == []

    run(body())


def test_forged_inner_sources_cannot_grow_the_counters_without_end(
    make_node: NodeFactory,
) -> None:
    """A peer with the password can put any inner source address in its
    FORWARDs; packets are still delivered, but past MAX_PEER_COUNTERS new
    addresses get no counters of their own."""
    count = MAX_PEER_COUNTERS + 300

    async def body() -> None:
        b = make_node(B)
        b.plane.start()
        b.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        cipher = DatagramCipher(b.key)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        delivered: list[bytes] = []

        def delivered_at_least(wanted: int) -> Callable[[], bool]:
            def check() -> bool:
                delivered.extend(b.delivered())
                return len(delivered) >= wanted

            return check

        try:
            for n in range(count):
                source = str(IPv4Address("172.16.0.0") + n)
                sender.sendto(cipher.seal(b"\x01" + ipv4_packet(source, B)), b.address)
                if n % 256 == 255:  # let B catch up: a full socket buffer drops
                    await eventually(delivered_at_least(n + 1))
            await eventually(delivered_at_least(count), timeout=30)
        finally:
            sender.close()
        stats = b.plane.stats()
        assert stats.tun_packets_out == count
        assert len(stats.peers) == MAX_PEER_COUNTERS

    run(body())


def test_wrong_key_is_dropped(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = make_node(A), make_node(B)
        b.plane.start()
        a.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, peer_key("other password", b.tun_ip))
        a.inject(ipv4_packet(A, B))
        await eventually(lambda: b.plane.stats().drops.get(DropReason.AUTHENTICATION, 0) == 1)
        assert b.delivered() == []

    run(body())


def test_control_messages_go_up_with_their_source(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = make_node(A), make_node(B)
        a.plane.start()
        b.plane.start()
        heartbeat = Heartbeat(a.tun_ip, IPv4Address("127.0.0.1"), b.address[1], True).encode()
        a.plane.send_control(b.address, b.key, heartbeat)
        await eventually(lambda: len(b.events.control) == 1)
        assert b.events.control == [(heartbeat, a.address)]

    run(body())


def test_stun_server_datagrams_go_up_unopened(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, stun = make_node(A), make_node(C)
        a.plane.start()
        a.plane.set_stun_server(stun.address)
        request = encode_binding_request(TRANSACTION_ID)
        a.plane.send_stun(stun.address, request)
        assert stun.udp.recvfrom(100) == (request, a.address)
        answer = encode_binding_response(TRANSACTION_ID, (IPv4Address("192.0.2.1"), 32853))
        stun.udp.sendto(answer, a.address)
        await eventually(lambda: a.events.stun == [(answer, stun.address)])

    run(body())


def test_forward_for_another_peer_is_relayed(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b, c = make_node(A), make_node(B, relaying=True), make_node(C)
        for node in (a, b, c):
            node.plane.start()
        connect(a, b)
        connect(b, c)
        a.plane.set_route(c.tun_ip, b.tun_ip)
        packet = ipv4_packet(A, C)
        a.inject(packet)
        await eventually(lambda: c.delivered() == [after_hops(packet)])
        assert b.delivered() == []
        assert b.events.relay == []

    run(body())


def test_forward_for_another_peer_without_path_goes_to_the_server(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = make_node(A), make_node(B, relaying=True)
        a.plane.start()
        b.plane.start()
        connect(a, b)
        a.plane.set_route(IPv4Address(C), b.tun_ip)
        packet = ipv4_packet(A, C)
        a.inject(packet)
        await eventually(lambda: b.events.relay == [after_hops(packet)])

    run(body())


def test_sysroutes_wrap_packets_in_ipip_toward_the_nexthop(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = connected_pair(make_node, A, B)
        a.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), b.tun_ip)])
        inner = ipv4_packet(A, "172.30.4.5")
        a.inject(inner)
        await eventually(lambda: b.delivered() == [inner])
        # Without a direct path the wrapped packet goes up for the server.
        a.plane.drop_peer(b.tun_ip)
        a.inject(inner)
        await eventually(lambda: len(a.events.relay) == 1)
        wrapped = a.events.relay[0]
        header = parse_ipv4_header(wrapped)
        assert (header.protocol, header.source, header.destination) == (4, a.tun_ip, b.tun_ip)
        assert decapsulate_ipip(wrapped) == inner

    run(body())


def test_no_packet_reaches_a_dropped_peer(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = connected_pair(make_node, A, B)
        for round_ in range(20):
            a.inject(*(ipv4_packet(A, B, ident=n) for n in range(50)))
            if round_ == 10:
                a.plane.drop_peer(b.tun_ip)
                sent_before = a.plane.stats().peers[b.tun_ip].packets_out
            # Let the plane drain this round before the next: the fake TUN
            # socket holds only a few hundred packets.
            await eventually(lambda r=round_: a.plane.stats().tun_packets_in >= 50 * (r + 1))
        await eventually(lambda: a.plane.stats().tun_packets_in == 1000)
        assert a.plane.stats().peers[b.tun_ip].packets_out == sent_before
        assert a.plane.stats().relay_packets_out == 1000 - sent_before

    run(body())


def test_non_ipv4_from_tun_is_dropped(make_node: NodeFactory) -> None:
    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        a.inject(b"\x60" + bytes(39), b"\x45\x00")
        await eventually(lambda: a.plane.stats().drops.get(DropReason.NOT_IPV4, 0) == 2)
        assert a.events.relay == []

    run(body())


def test_close_is_idempotent_and_stops_traffic(make_node: NodeFactory) -> None:
    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        a.plane.close()
        a.plane.close()
        a.inject(ipv4_packet(A, B))
        await settle()
        assert a.events.relay == []

    run(body())


def test_keys_are_per_tun_ip() -> None:
    assert peer_key(PASSWORD, IPv4Address(A)) != peer_key(PASSWORD, IPv4Address(B))


def test_ipip_wrapping_matches_the_reference_byte_for_byte(make_node: NodeFactory) -> None:
    from p2pvpn.wire.ipv4 import ipv4_checksum

    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        a.plane.set_sysroutes(
            [
                (IPv4Network("172.30.0.0/16"), IPv4Address(B)),
                (IPv4Network("172.30.4.0/24"), IPv4Address(C)),  # shadowed: first match wins
                (IPv4Network("172.31.0.0/16"), IPv4Address(C)),
            ]
        )
        inners = [ipv4_packet(A, "172.30.4.5", b"p" * n, ident=n) for n in (0, 1, 333, 1400)]
        inners.append(ipv4_packet(A, "172.31.0.1"))
        a.inject(*inners)
        await eventually(lambda: len(a.events.relay) == len(inners))
        nexthops = [B, B, B, B, C]
        assert a.events.relay == [
            encapsulate_ipip(inner, a.tun_ip, IPv4Address(nexthop))
            for inner, nexthop in zip(inners, nexthops, strict=True)
        ]
        assert all(ipv4_checksum(wrapped[:20]) == 0 for wrapped in a.events.relay)

    run(body())


def test_packet_too_large_to_wrap_in_ipip_is_dropped(make_node: NodeFactory) -> None:
    async def body() -> None:
        a = make_node(A)
        a.plane.start()
        a.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), IPv4Address(B))])
        a.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        # A maximal packet leaves no room for the 20-byte outer header.
        a.inject(ipv4_packet(A, "172.30.0.9", b"z" * (65535 - 28)), ipv4_packet(A, B))
        await eventually(lambda: a.plane.stats().drops.get(DropReason.MALFORMED, 0) == 1)
        await eventually(lambda: len(a.events.relay) == 1)

    run(body())
