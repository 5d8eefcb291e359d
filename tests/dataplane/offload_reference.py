"""A test-side reference for the TUN offloads, independent of src/.

The compiled plane's segmentation and coalescing are checked against what is
written here: packets built field by field with struct, the Internet checksum
of RFC 1071 summed plainly over 16-bit words, validators for every IPv4, TCP
and UDP checksum, a segmenter that cuts a virtio GSO packet as the kernel
would, and a model of the coalescing rules of ISSUE13-API.md. Only the
virtio-net header codec is shared with src/ (p2pvpn.wire.virtio): it is a
struct layout, not logic under test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from p2pvpn.wire.virtio import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    HEADER_LENGTH,
    NEEDS_CSUM,
    VirtioNetHeader,
    decode_virtio_header,
    encode_virtio_header,
)

IPPROTO_TCP = 6
IPPROTO_UDP = 17

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
DONT_FRAGMENT = 0x4000
MORE_FRAGMENTS = 0x2000

TCP_CHECKSUM_OFFSET = 16
UDP_CHECKSUM_OFFSET = 6
ZERO_HEADER = bytes(HEADER_LENGTH)

# The plane's limits on one coalesced write (ISSUE13-API.md).
MAX_RUN_SEGMENTS = 64
MAX_IPV4_LENGTH = 65535


# -- the Internet checksum (RFC 1071) ---------------------------------------------------


def ones_complement_sum(data: bytes, initial: int = 0) -> int:
    """The 16-bit one's complement sum of `data` as big-endian words (an odd
    last byte padded with zero), carries folded back in; not inverted."""
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes) -> int:
    """The value for a checksum field that makes `data` sum to all ones."""
    return ~ones_complement_sum(data) & 0xFFFF


def pseudo_header(source: bytes, destination: bytes, protocol: int, length: int) -> bytes:
    return source + destination + struct.pack("!BBH", 0, protocol, length)


def pseudo_header_sum(packet: bytes) -> int:
    """What the kernel leaves in the TCP/UDP checksum field of a packet with a
    partial checksum: the folded pseudo-header sum for the whole transport
    length (of the whole super-packet for GSO), not inverted."""
    ihl = (packet[0] & 0x0F) * 4
    length = struct.unpack_from("!H", packet, 2)[0] - ihl
    return ones_complement_sum(pseudo_header(packet[12:16], packet[16:20], packet[9], length))


# -- building packets -------------------------------------------------------------------


@dataclass(frozen=True)
class Ipv4Fields:
    source: str = "10.9.0.1"
    destination: str = "10.9.0.2"
    ident: int = 0
    tos: int = 0
    ttl: int = 64
    fragment: int = DONT_FRAGMENT  # the flags + fragment offset field
    options: bytes = b""  # a multiple of 4 bytes, at most 40


@dataclass(frozen=True)
class TcpFields:
    source_port: int = 40000
    destination_port: int = 5201
    seq: int = 1000
    ack: int = 2000
    flags: int = ACK
    window: int = 502
    urgent: int = 0
    options: bytes = b""  # a multiple of 4 bytes, at most 40


def ipv4_header(ip: Ipv4Fields, protocol: int, payload_length: int) -> bytes:
    """The IPv4 header with a valid checksum."""
    ihl = 5 + len(ip.options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        ip.tos,
        ihl * 4 + payload_length,
        ip.ident,
        ip.fragment,
        ip.ttl,
        protocol,
        0,
        IPv4Address(ip.source).packed,
        IPv4Address(ip.destination).packed,
    )
    header += ip.options
    return header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]


def _with_checksum(packet: bytes, offset: int, *, partial: bool, udp: bool = False) -> bytes:
    """`packet` with its transport checksum (at `offset` past the IP header)
    computed in full, or as the kernel leaves a partial one."""
    ihl = (packet[0] & 0x0F) * 4
    at = ihl + offset
    packet = packet[:at] + b"\0\0" + packet[at + 2 :]
    if partial:
        value = pseudo_header_sum(packet)
    else:
        value = internet_checksum(_pseudo_header_of(packet) + packet[ihl:])
        if udp and value == 0:
            value = 0xFFFF  # RFC 768: zero means "no checksum"
    return packet[:at] + struct.pack("!H", value) + packet[at + 2 :]


def _pseudo_header_of(packet: bytes) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    length = struct.unpack_from("!H", packet, 2)[0] - ihl
    return pseudo_header(packet[12:16], packet[16:20], packet[9], length)


def tcp_packet(
    ip: Ipv4Fields, tcp: TcpFields, payload: bytes, *, partial_checksum: bool = False
) -> bytes:
    """A TCP/IPv4 packet, every checksum valid (or the TCP one partial)."""
    data_offset = 5 + len(tcp.options) // 4
    segment = (
        struct.pack(
            "!HHIIBBHHH",
            tcp.source_port,
            tcp.destination_port,
            tcp.seq % 2**32,
            tcp.ack % 2**32,
            data_offset << 4,
            tcp.flags,
            tcp.window,
            0,
            tcp.urgent,
        )
        + tcp.options
        + payload
    )
    packet = ipv4_header(ip, IPPROTO_TCP, len(segment)) + segment
    return _with_checksum(packet, TCP_CHECKSUM_OFFSET, partial=partial_checksum)


def udp_packet(
    ip: Ipv4Fields,
    payload: bytes,
    *,
    ports: tuple[int, int] = (40000, 5201),
    partial_checksum: bool = False,
) -> bytes:
    datagram = struct.pack("!HHHH", *ports, 8 + len(payload), 0) + payload
    packet = ipv4_header(ip, IPPROTO_UDP, len(datagram)) + datagram
    return _with_checksum(packet, UDP_CHECKSUM_OFFSET, partial=partial_checksum, udp=True)


def tcp_super_packet(ip: Ipv4Fields, tcp: TcpFields, payload: bytes, segment_size: int) -> bytes:
    """A TSO packet as the TUN hands it over: virtio header + IPv4/TCP with
    the partial checksum (pseudo-header sum over the whole TCP length)."""
    packet = tcp_packet(ip, tcp, payload, partial_checksum=True)
    ihl, thl = 20 + len(ip.options), 20 + len(tcp.options)
    header = VirtioNetHeader(
        NEEDS_CSUM, GSO_TCPV4, ihl + thl, segment_size, ihl, TCP_CHECKSUM_OFFSET
    )
    return encode_virtio_header(header) + packet


def udp_super_packet(ip: Ipv4Fields, payload: bytes, segment_size: int) -> bytes:
    """A USO packet as the TUN hands it over (UDP length = the whole datagram)."""
    packet = udp_packet(ip, payload, partial_checksum=True)
    ihl = 20 + len(ip.options)
    header = VirtioNetHeader(
        NEEDS_CSUM, GSO_UDP_L4, ihl + 8, segment_size, ihl, UDP_CHECKSUM_OFFSET
    )
    return encode_virtio_header(header) + packet


# -- reading and checking packets -------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """One IPv4 packet taken apart (TCP fields zero for UDP)."""

    ip: Ipv4Fields
    protocol: int
    tcp: TcpFields
    payload: bytes
    ip_checksum: int
    transport_checksum: int


def parse_packet(packet: bytes) -> Parsed:
    """Fields of a TCP or UDP IPv4 packet; ValueError if it is not one."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    tos, total, ident, fragment, ttl, protocol, ip_checksum = struct.unpack_from(
        "!xBHHHBBH", packet
    )
    if ihl < 20 or total != len(packet) or total < ihl:
        raise ValueError(f"IHL {ihl} / total length {total} for {len(packet)} bytes")
    ip = Ipv4Fields(
        str(IPv4Address(packet[12:16])),
        str(IPv4Address(packet[16:20])),
        ident,
        tos,
        ttl,
        fragment,
        packet[20:ihl],
    )
    if protocol == IPPROTO_UDP:
        if total < ihl + 8:
            raise ValueError("short UDP header")
        ports = struct.unpack_from("!HH", packet, ihl)
        checksum = struct.unpack_from("!H", packet, ihl + 6)[0]
        tcp = TcpFields(ports[0], ports[1], 0, 0, 0, 0, 0, b"")
        return Parsed(ip, protocol, tcp, packet[ihl + 8 :], ip_checksum, checksum)
    if protocol != IPPROTO_TCP or total < ihl + 20:
        raise ValueError("neither TCP nor UDP")
    sport, dport, seq, ack, offset, flags, window, checksum, urgent = struct.unpack_from(
        "!HHIIBBHHH", packet, ihl
    )
    thl = (offset >> 4) * 4
    if thl < 20 or ihl + thl > total:
        raise ValueError(f"TCP data offset {thl}")
    options = packet[ihl + 20 : ihl + thl]
    tcp = TcpFields(sport, dport, seq, ack, flags, window, urgent, options)
    return Parsed(ip, protocol, tcp, packet[ihl + thl :], ip_checksum, checksum)


def ipv4_checksum_valid(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return ones_complement_sum(packet[:ihl]) == 0xFFFF


def transport_checksum_valid(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return ones_complement_sum(_pseudo_header_of(packet) + packet[ihl:]) == 0xFFFF


def check_packet(packet: bytes) -> Parsed:
    """`packet` parsed, after asserting that it is a complete TCP or UDP IPv4
    packet with valid IP and transport checksums (and a set UDP checksum)."""
    parsed = parse_packet(packet)
    assert ipv4_checksum_valid(packet), f"bad IPv4 header checksum in {packet[:40].hex()}"
    assert transport_checksum_valid(packet), f"bad transport checksum in {packet[:60].hex()}"
    if parsed.protocol == IPPROTO_UDP:
        ihl = len(packet) - len(parsed.payload) - 8
        assert struct.unpack_from("!H", packet, ihl + 4)[0] == len(packet) - ihl, "UDP length"
        assert parsed.transport_checksum != 0, "UDP checksum 0 means none: must be 0xffff"
    return parsed


def _zero_as_zero(packet: bytes) -> bytes:
    """`packet` with an IPv4 header or TCP checksum of 0xffff written as 0x0000."""
    if len(packet) < 20:
        return packet
    fields = [10]
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] == IPPROTO_TCP and len(packet) >= ihl + 18:
        fields.append(ihl + TCP_CHECKSUM_OFFSET)
    for at in fields:
        if packet[at : at + 2] == b"\xff\xff":
            packet = packet[:at] + b"\0\0" + packet[at + 2 :]
    return packet


def same_packet(actual: bytes, expected: bytes) -> bool:
    """Equal, but for an IPv4 header or TCP checksum written as 0x0000 or
    0xffff: one's complement has two zeros, both verify, and the plane (as
    the kernel's skb_checksum_help) writes 0xffff where the sum comes out 0."""
    return actual == expected or _zero_as_zero(actual) == _zero_as_zero(expected)


def same_write(actual: bytes, expected: bytes) -> bool:
    """The same virtio header, and the same packet as same_packet sees it."""
    head = HEADER_LENGTH
    return actual[:head] == expected[:head] and same_packet(actual[head:], expected[head:])


def same_packets(actual: list[bytes], expected: list[bytes]) -> bool:
    return len(actual) == len(expected) and all(map(same_packet, actual, expected))


# -- the reference segmenter ------------------------------------------------------------


def split_frame(frame: bytes) -> tuple[VirtioNetHeader, bytes]:
    return decode_virtio_header(frame), frame[HEADER_LENGTH:]


def complete_checksum(packet: bytes, start: int, offset: int) -> bytes:
    """A NEEDS_CSUM packet finished as the kernel does (skb_checksum_help):
    the one's complement sum from `start` to the end (the field holds the
    pseudo-header sum) inverted into the field at start + offset, 0 as 0xffff."""
    at = start + offset
    if at + 2 > len(packet):
        raise ValueError("checksum field beyond the packet")
    value = internet_checksum(packet[start:]) or 0xFFFF
    return packet[:at] + struct.pack("!H", value) + packet[at + 2 :]


def segment_frame(frame: bytes) -> list[bytes]:
    """The IPv4 packets a virtio frame (header + packet) stands for."""
    header, packet = split_frame(frame)
    kind = header.gso_type
    if kind == GSO_NONE:
        if header.flags & NEEDS_CSUM:
            packet = complete_checksum(packet, header.checksum_start, header.checksum_offset)
        return [packet]
    if header.segment_size == 0:
        raise ValueError("GSO with segment_size 0")
    parsed = parse_packet(packet)
    if kind == GSO_TCPV4 and parsed.protocol == IPPROTO_TCP:
        return _segment_tcp(parsed, header.segment_size)
    if kind == GSO_UDP_L4 and parsed.protocol == IPPROTO_UDP:
        return _segment_udp(parsed, header.segment_size)
    raise ValueError(f"gso_type {kind} for protocol {parsed.protocol}")


def chunks(payload: bytes, size: int) -> list[bytes]:
    return [payload[at : at + size] for at in range(0, len(payload), size)] or [b""]


def _segment_tcp(parsed: Parsed, size: int) -> list[bytes]:
    pieces = chunks(parsed.payload, size)
    segments = []
    for index, piece in enumerate(pieces):
        flags = parsed.tcp.flags
        if index != len(pieces) - 1:
            flags &= ~(FIN | PSH)
        if index != 0:
            flags &= ~CWR
        ip = replace(parsed.ip, ident=(parsed.ip.ident + index) % 65536)
        tcp = replace(parsed.tcp, seq=(parsed.tcp.seq + index * size) % 2**32, flags=flags)
        segments.append(tcp_packet(ip, tcp, piece))
    return segments


def _segment_udp(parsed: Parsed, size: int) -> list[bytes]:
    ports = (parsed.tcp.source_port, parsed.tcp.destination_port)
    return [
        udp_packet(replace(parsed.ip, ident=(parsed.ip.ident + index) % 65536), piece, ports=ports)
        for index, piece in enumerate(chunks(parsed.payload, size))
    ]


# -- a model of the coalescing rules -----------------------------------------------------


def coalescable(packet: bytes) -> Parsed | None:
    """`packet` parsed if it may be part of a coalesced write, else None."""
    try:
        parsed = parse_packet(packet)
    except ValueError:
        return None
    ok = (
        parsed.protocol == IPPROTO_TCP
        and not parsed.ip.options
        and parsed.ip.fragment & ~DONT_FRAGMENT == 0
        and parsed.tcp.flags in (ACK, ACK | PSH)
        and len(parsed.payload) >= 1
        and ipv4_checksum_valid(packet)
        and transport_checksum_valid(packet)
    )
    return parsed if ok else None


@dataclass
class _Run:
    first: Parsed
    packets: list[bytes]
    payload: int
    length: int  # IPv4 total length of the coalesced packet
    closed: bool = False

    def takes(self, parsed: Parsed, packet: bytes) -> bool:
        first, count = self.first, len(self.packets)
        return (
            not self.closed
            and replace(parsed.ip, ident=first.ip.ident) == first.ip
            and parsed.ip.ident == (first.ip.ident + count) % 65536
            and self._same_tcp_header(parsed.tcp)
            and parsed.tcp.seq == (first.tcp.seq + self.payload) % 2**32
            and len(parsed.payload) <= len(first.payload)
            and count < MAX_RUN_SEGMENTS
            and self.length + len(parsed.payload) <= MAX_IPV4_LENGTH
        )

    def _same_tcp_header(self, tcp: TcpFields) -> bool:
        # Not compared: seq and flags (checked apart), the window and the
        # urgent pointer (the API's rules leave them out; the first one's stay).
        first = self.first.tcp
        return (
            replace(tcp, seq=first.seq, flags=first.flags, window=first.window, urgent=first.urgent)
            == first
        )

    def add(self, parsed: Parsed, packet: bytes) -> None:
        self.packets.append(packet)
        self.payload += len(parsed.payload)
        self.length += len(parsed.payload)
        self.closed = len(parsed.payload) < len(self.first.payload) or bool(parsed.tcp.flags & PSH)


def tcp_flow(packet: bytes) -> tuple[str, str, int, int] | None:
    """Addresses and ports of a well-formed TCP/IPv4 packet, else None."""
    try:
        parsed = parse_packet(packet)
    except ValueError:
        return None
    if parsed.protocol != IPPROTO_TCP:
        return None
    return (
        parsed.ip.source,
        parsed.ip.destination,
        parsed.tcp.source_port,
        parsed.tcp.destination_port,
    )


def model_coalesce(packets: list[bytes]) -> list[list[bytes]]:
    """The groups of packets that make up each write, in the order written:
    each run where its first packet stood (see ISSUE13-API.md's rules).

    The window is not a condition (the kernel's GRO keeps the first one), so
    callers that check byte equality keep it the same within a flow."""
    groups: list[list[bytes]] = []
    open_runs: dict[tuple[str, str, int, int], _Run] = {}
    for packet in packets:
        parsed = coalescable(packet)
        if parsed is None:
            # A TCP packet that cannot join ends its flow's run: nothing of
            # the flow after it may be written before it.
            open_runs.pop(tcp_flow(packet), None)
            groups.append([packet])
            continue
        ip, tcp = parsed.ip, parsed.tcp
        flow = (ip.source, ip.destination, tcp.source_port, tcp.destination_port)
        run = open_runs.get(flow)
        if run is not None and run.takes(parsed, packet):
            run.add(parsed, packet)
            continue
        run = _Run(parsed, [], 0, len(packet) - len(parsed.payload))
        run.add(parsed, packet)
        open_runs[flow] = run
        groups.append(run.packets)
    return groups


def expected_write(group: list[bytes]) -> bytes:
    """The write (virtio header + packet) that carries a coalesced `group` of
    two or more segments: the first one's headers with the IPv4 length and
    checksum rewritten, PSH as the last one had it, the TCP checksum partial."""
    first, last = parse_packet(group[0]), parse_packet(group[-1])
    flags = first.tcp.flags | (last.tcp.flags & PSH)
    payload = b"".join(parse_packet(packet).payload for packet in group)
    packet = tcp_packet(first.ip, replace(first.tcp, flags=flags), payload, partial_checksum=True)
    thl = 20 + len(first.tcp.options)
    header = VirtioNetHeader(
        NEEDS_CSUM, GSO_TCPV4, 20 + thl, len(first.payload), 20, TCP_CHECKSUM_OFFSET
    )
    return encode_virtio_header(header) + packet
