"""TCP bursts through pairs of compiled planes with TUN offloads on one or both
sides (fake TUN devices, real UDP on loopback): super-packets read at the
sender arrive at the receiver as the same segments, coalesced again where the
receiver has offloads, and as single IPv4 packets of at most the MTU where it
has none (the wire of a Candy peer).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from p2pvpn.dataplane.base import DropReason
from p2pvpn.wire.crypto import DatagramCipher, peer_key
from p2pvpn.wire.ipv4 import decapsulate_ipip
from p2pvpn.wire.virtio import (
    GSO_TCPV4,
    GSO_UDP_L4,
    HEADER_LENGTH,
    NEEDS_CSUM,
    VirtioNetHeader,
    encode_virtio_header,
)
from tests.dataplane.conftest import PASSWORD, TUN_OFFLOADS, Node, eventually
from tests.dataplane.offload_reference import (
    ACK,
    PSH,
    TCP_CHECKSUM_OFFSET,
    Ipv4Fields,
    TcpFields,
    check_packet,
    parse_packet,
    pseudo_header_sum,
    same_packets,
    segment_frame,
    split_frame,
    tcp_packet,
    tcp_super_packet,
    udp_super_packet,
)
from tests.sockets import drain
from tests.udp_offload import enlarge_receive_buffer, take_runs_whole

pytestmark = pytest.mark.fastpath


def payload_of(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + n * 7) % 256 for n in range(length))


A, B = "10.9.0.1", "10.9.0.2"
MTU = 1500
MSS = MTU - 52  # IPv4 and TCP headers with timestamps
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>


def make_room(node: Node) -> None:
    """Queues that hold a whole burst: the plane's coalesced writes are up to
    64 KB each, and a unix socket's writer gets EAGAIN where a TUN would not."""
    for sock in (node._tun, node.kernel):
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 1 << 24)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 24)
    enlarge_receive_buffer(node.udp)


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(backend: str, tun_ip: str, tun_offloads: tuple[str, ...] | None = None) -> Node:
        node = Node(backend, tun_ip, tun_offloads=tun_offloads)
        make_room(node)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def test_the_plane_names_the_offloads_it_was_given(
    make_node: Callable[..., Node],
) -> None:
    assert make_node("fast-offload", A).plane.tun_offloads == TUN_OFFLOADS  # type: ignore[attr-defined]
    assert make_node("fast", B).plane.tun_offloads == ()  # type: ignore[attr-defined]


def burst(flows: int, super_packets: int, length: int) -> tuple[list[bytes], list[list[bytes]]]:
    """TSO reads A -> B, the flows' super-packets interleaved, and the segments
    of each flow in order (PSH ends each super-packet, as a sender's would)."""
    frames: list[bytes] = []
    segments: list[list[bytes]] = [[] for _ in range(flows)]
    for round_ in range(super_packets):
        for flow in range(flows):
            ip = Ipv4Fields(A, B, ident=(65500 + round_ * 64) % 65536)
            options = b"\x01\x01\x08\x0a" + (round_ + 1).to_bytes(4, "big") + bytes(4)
            tcp = TcpFields(
                source_port=40000 + flow,
                seq=2**32 - 30000 + round_ * length,
                flags=ACK | PSH,
                options=options,
            )
            payload = bytes((flow * 7 + round_ + n) % 251 for n in range(length))
            frame = tcp_super_packet(ip, tcp, payload, MSS)
            frames.append(frame)
            segments[flow] += segment_frame(frame)
    return frames, segments


def per_flow(packets: list[bytes], flows: int) -> list[list[bytes]]:
    return [
        [p for p in packets if parse_packet(p).tcp.source_port == 40000 + f] for f in range(flows)
    ]


def check_writes_carry(writes: list[bytes], segments: list[list[bytes]], flows: int) -> list[bytes]:
    """Every TUN write valid, and cut apart they carry each flow's segments
    whole and in order; returns the packets cut out of them."""
    for write in writes:
        check_write(write)
    received = [packet for write in writes for packet in segment_frame(write)]
    for got, sent in zip(per_flow(received, flows), segments, strict=True):
        assert same_packets(got, sent)
    return received


def check_write(write: bytes) -> None:
    """A write of a plane with offloads: a valid coalesced TCP packet, or a
    packet alone behind an all-zero header."""
    header, packet = split_frame(write)
    if header.gso_type == GSO_TCPV4:
        assert header.flags == NEEDS_CSUM
        ihl = (packet[0] & 0x0F) * 4
        assert header.checksum_start == ihl
        assert header.checksum_offset == TCP_CHECKSUM_OFFSET
        parsed = parse_packet(packet)
        assert header.header_length == len(packet) - len(parsed.payload)
        assert 0 < header.segment_size <= len(parsed.payload)
        assert int.from_bytes(packet[ihl + 16 : ihl + 18], "big") == pseudo_header_sum(packet)
    else:
        assert write[:HEADER_LENGTH] == bytes(HEADER_LENGTH)


async def collect_writes(node: Node, segments: int) -> list[bytes]:
    """The node's TUN writes until they stand for `segments` packets."""
    writes: list[bytes] = []

    def arrived() -> bool:
        writes.extend(node.writes())
        return sum(len(segment_frame(write)) for write in writes) >= segments

    await eventually(arrived, timeout=30)
    return writes


async def send_queued(sender: Node, receiver: Node, frames: list[bytes], count: int) -> None:
    """The sender seals and sends the burst before the receiver starts, so
    that the receiver's first reads hold it whole (UDP GRO runs)."""
    take_runs_whole(receiver.udp)
    sender.plane.set_peer(receiver.tun_ip, receiver.address, receiver.key)
    sender.plane.start()
    sender.inject_frames(*frames)

    def sent() -> bool:
        counters = sender.plane.stats().peers.get(receiver.tun_ip)
        return counters is not None and counters.packets_out >= count

    await eventually(sent, timeout=30)
    receiver.plane.start()


@pytest.mark.parametrize(("flows", "rounds", "length"), [(1, 4, 60000), (3, 3, 20000)])
def test_super_packets_arrive_coalesced_at_a_peer_with_offloads(
    make_node: Callable[..., Node], flows: int, rounds: int, length: int
) -> None:
    frames, segments = burst(flows, rounds, length)
    count = sum(map(len, segments))

    async def body() -> None:
        a, b = make_node("fast-offload", A), make_node("fast-offload", B)
        await send_queued(a, b, frames, count)
        writes = await collect_writes(b, count)
        received = check_writes_carry(writes, segments, flows)
        assert len(received) == count
        # One FORWARD per segment on the wire, a few writes into the TUN.
        assert a.plane.stats().peers[b.tun_ip].packets_out == count
        assert any(split_frame(write)[0].gso_type == GSO_TCPV4 for write in writes)
        assert len(writes) < count / 4

    asyncio.run(body())


@pytest.mark.parametrize("receiver", ["fast", "pure"])
def test_a_peer_without_offloads_gets_single_packets_of_at_most_the_mtu(
    make_node: Callable[..., Node], receiver: str
) -> None:
    flows = 2
    frames, segments = burst(flows, 3, 30000)
    count = sum(map(len, segments))

    async def body() -> None:
        a, b = make_node("fast-offload", A), make_node(receiver, B)
        b.plane.start()
        a.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        a.inject_frames(*frames)
        received: list[bytes] = []

        def arrived() -> bool:
            received.extend(b.writes())
            return len(received) >= count

        await eventually(arrived, timeout=30)
        for packet in received:
            assert len(packet) <= MTU
            check_packet(packet)  # a plain IPv4 packet: no virtio header in front
        for got, sent in zip(per_flow(received, flows), segments, strict=True):
            assert same_packets(got, sent)
        assert len(received) == count

    asyncio.run(body())


def test_single_packets_from_a_peer_without_offloads_are_coalesced(
    make_node: Callable[..., Node],
) -> None:
    flows = 2
    _, segments = burst(flows, 3, 30000)
    # As a Candy peer (or our plane without offloads) sends them: one by one.
    packets = [packet for side_by_side in zip(*segments, strict=True) for packet in side_by_side]
    count = len(packets)

    async def body() -> None:
        a, b = make_node("fast", A), make_node("fast-offload", B)
        await send_queued(a, b, [a.frame(packet) for packet in packets], count)
        writes = await collect_writes(b, count)
        check_writes_carry(writes, segments, flows)
        assert len(writes) < count / 4

    asyncio.run(body())


def test_a_write_with_a_header_goes_to_the_tun_with_one(
    make_node: Callable[..., Node],
) -> None:
    """Packets from the server's relay (write_tun) need the virtio header, too."""

    async def body() -> None:
        b = make_node("fast-offload", B)
        b.plane.start()
        ip, tcp = Ipv4Fields(A, B), TcpFields(flags=ACK)
        [packet] = segment_frame(tcp_super_packet(ip, tcp, b"relayed", MSS))
        b.plane.write_tun(packet)
        writes: list[bytes] = []
        await eventually(lambda: bool(writes.extend(b.writes())) or bool(writes))
        assert writes == [bytes(HEADER_LENGTH) + packet]

    asyncio.run(body())


def test_a_super_packet_to_a_sysroute_goes_out_as_wrapped_segments(
    make_node: Callable[..., Node],
) -> None:
    """Each segment is wrapped in IPIP in the room the segmenter leaves before
    it, toward the nexthop, and the nexthop takes the inner segments out."""
    frame = tcp_super_packet(Ipv4Fields(A, "172.30.4.5"), TcpFields(), payload_of(21, 9000), MSS)
    segments = segment_frame(frame)

    async def body() -> None:
        a, b = make_node("fast-offload", A), make_node("fast", B)
        a.plane.start()
        b.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        a.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), b.tun_ip)])
        a.inject_frames(frame)
        received: list[bytes] = []
        await eventually(lambda: bool(received.extend(b.delivered())) or len(received) >= 7)
        assert same_packets(received, segments)
        # Without the direct path: the wrapped segments go up for the server.
        a.plane.drop_peer(b.tun_ip)
        a.inject_frames(frame)
        await eventually(lambda: len(a.events.relay) == len(segments))
        assert same_packets([decapsulate_ipip(p) for p in a.events.relay], segments)

    asyncio.run(body())


def test_a_super_packet_without_a_path_goes_up_for_the_relay_as_segments(
    make_node: Callable[..., Node],
) -> None:
    frame = tcp_super_packet(Ipv4Fields(A, B), TcpFields(), payload_of(22, 5000), MSS)

    async def body() -> None:
        a = make_node("fast-offload", A)
        a.plane.start()
        a.inject_frames(frame)
        await eventually(lambda: len(a.events.relay) == 4)
        assert same_packets(a.events.relay, segment_frame(frame))
        assert all(len(packet) <= MTU for packet in a.events.relay)

    asyncio.run(body())


def test_malformed_reads_are_dropped_and_counted_and_the_next_one_passes(
    make_node: Callable[..., Node],
) -> None:
    frame = tcp_super_packet(Ipv4Fields(A, B), TcpFields(), payload_of(23, 3000), MSS)
    header, packet = split_frame(frame)
    malformed = [
        frame[:-1],  # the IPv4 total length says one byte more
        encode_virtio_header(replace(header, segment_size=0)) + packet,
        encode_virtio_header(replace(header, gso_type=4)) + packet,  # TCPV6
        encode_virtio_header(replace(header, gso_type=GSO_UDP_L4)) + packet,
    ]
    partial = tcp_packet(Ipv4Fields(A, B), TcpFields(), b"partial", partial_checksum=True)
    csum_only = encode_virtio_header(VirtioNetHeader(NEEDS_CSUM, 0, 0, 0, 20, 16)) + partial

    async def body() -> None:
        a, b = make_node("fast-offload", A), make_node("fast", B)
        a.plane.start()
        b.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        a.inject_frames(*malformed, csum_only, frame)
        received: list[bytes] = []
        await eventually(lambda: bool(received.extend(b.delivered())) or len(received) >= 4)
        expected = [tcp_packet(Ipv4Fields(A, B), TcpFields(), b"partial"), *segment_frame(frame)]
        assert same_packets(received, expected)
        assert a.plane.stats().drops == {DropReason.MALFORMED: len(malformed)}

    asyncio.run(body())


def long_flow(super_packets: int, length: int) -> tuple[list[bytes], list[bytes]]:
    """One flow's TSO reads and all their segments, in order."""
    frames: list[bytes] = []
    for n in range(super_packets):
        ip = Ipv4Fields(A, "172.30.4.5", ident=(n * 50) % 65536)
        tcp = TcpFields(seq=n * length, flags=ACK | PSH)
        frames.append(tcp_super_packet(ip, tcp, payload_of(n, length), MSS))
    return frames, [segment for frame in frames for segment in segment_frame(frame)]


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_bursts_larger_than_the_segment_arena_arrive_whole(
    make_node: Callable[..., Node], path: str
) -> None:
    """Megabytes of segments: the arena they are cut into is sent (or handed
    up for the relay) and reused many times over, and no segment is lost or
    overwritten on the way."""
    frames, segments = long_flow(96 if path == "direct" else 40, 60000)

    async def body() -> None:
        a, b = make_node("fast-offload", A), make_node("fast", B)
        b.plane.start()
        a.plane.start()
        if path == "direct":
            a.plane.set_peer(b.tun_ip, b.address, b.key)
        a.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), b.tun_ip)])
        a.inject_frames(*frames)
        received: list[bytes] = []

        def arrived() -> bool:
            if path == "direct":
                received.extend(b.delivered())
            else:
                received[:] = [decapsulate_ipip(packet) for packet in a.events.relay]
            return len(received) >= len(segments)

        await eventually(arrived, timeout=60)
        assert same_packets(received, segments)
        assert a.plane.stats().drops == {}

    asyncio.run(body())


def test_the_wire_carries_one_ipv4_packet_of_at_most_the_mtu_per_forward(
    make_node: Callable[..., Node],
) -> None:
    """What a Candy peer sees of a sender with offloads: each datagram opens
    to a FORWARD of one complete IPv4 packet, no larger than the MTU."""
    frames, segments = burst(2, 3, 30000)
    flat = [packet for flow in segments for packet in flow]

    async def body() -> None:
        a = make_node("fast-offload", A)
        candy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            candy.bind(("127.0.0.1", 0))
            enlarge_receive_buffer(candy)
            candy.setblocking(False)
            key = peer_key(PASSWORD, IPv4Address(B))
            a.plane.start()
            a.plane.set_peer(IPv4Address(B), candy.getsockname(), key)
            a.inject_frames(*frames)
            datagrams: list[bytes] = []
            await eventually(
                lambda: bool(datagrams.extend(drain(candy))) or len(datagrams) >= len(flat)
            )
        finally:
            candy.close()
        cipher = DatagramCipher(key)
        opened = [cipher.open(datagram) for datagram in datagrams]
        assert all(plaintext[:1] == b"\x01" for plaintext in opened)
        packets = [plaintext[1:] for plaintext in opened]
        for packet in packets:
            assert len(packet) <= MTU
            check_packet(packet)
        for got, sent in zip(per_flow(packets, 2), segments, strict=True):
            assert same_packets(got, sent)
        assert len(packets) == len(flat)

    asyncio.run(body())


def test_a_udp_super_packet_arrives_as_single_datagrams(make_node: Callable[..., Node]) -> None:
    """USO: cut at the sender, and written one by one at a receiver with
    offloads (only TCP is coalesced)."""
    ip = Ipv4Fields(A, B, ident=65530)
    frame = udp_super_packet(ip, payload_of(31, 20000), MSS + 24)
    datagrams = segment_frame(frame)

    async def body() -> None:
        a = make_node("fast-offload", A, (*TUN_OFFLOADS, "uso4"))
        b = make_node("fast-offload", B)
        a.plane.start()
        b.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        a.inject_frames(frame)
        writes = await collect_writes(b, len(datagrams))
        assert all(write[:HEADER_LENGTH] == bytes(HEADER_LENGTH) for write in writes)
        received = [write[HEADER_LENGTH:] for write in writes]
        assert same_packets(received, datagrams)
        assert all(len(datagram) <= MTU for datagram in received)

    asyncio.run(body())
