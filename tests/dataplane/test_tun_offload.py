"""The TUN offloads' pure functions, without a TUN device: the compiled plane's
segment_tun_packet (a TUN read: virtio header + super-packet -> the IPv4
packets it seals) and coalesce_tun_packets (the packets one received batch
opened -> what it writes to the TUN), checked against
tests/dataplane/offload_reference.py, which shares no code with src/ but the
virtio header's struct layout.

Properties draw everything through hypothesis (payloads come from a drawn
seed); their example counts scale with P2PVPN_FUZZ_EXAMPLES like the fuzzers'.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.virtio import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    HEADER_LENGTH,
    NEEDS_CSUM,
    VirtioNetHeader,
    decode_virtio_header,
    encode_virtio_header,
)
from tests.dataplane.offload_reference import (
    ACK,
    CWR,
    DONT_FRAGMENT,
    ECE,
    FIN,
    IPPROTO_TCP,
    MAX_IPV4_LENGTH,
    MORE_FRAGMENTS,
    PSH,
    RST,
    SYN,
    TCP_CHECKSUM_OFFSET,
    UDP_CHECKSUM_OFFSET,
    URG,
    ZERO_HEADER,
    Ipv4Fields,
    Parsed,
    TcpFields,
    check_packet,
    chunks,
    expected_write,
    internet_checksum,
    model_coalesce,
    parse_packet,
    pseudo_header_sum,
    same_packets,
    same_write,
    segment_frame,
    split_frame,
    tcp_packet,
    tcp_super_packet,
    udp_packet,
    udp_super_packet,
)
from tests.fuzz import examples, fuzz_settings, mutated

pytestmark = pytest.mark.fastpath

# The most segments one super-packet may be cut into that these properties
# draw: 64 KB at the smallest MSS a Linux peer sends (536), rounded up.
MAX_GSO_SEGMENTS = 128
SEGMENT_EXAMPLES = examples(300)
COALESCE_EXAMPLES = examples(300)
MALFORMED_EXAMPLES = examples(500)


def segment_tun_packet(frame: bytes) -> list[bytes]:
    from p2pvpn._fastpath import segment_tun_packet as segment

    result: list[bytes] = segment(frame)
    return result


def coalesce_tun_packets(packets: Sequence[bytes]) -> list[bytes]:
    from p2pvpn._fastpath import coalesce_tun_packets as coalesce

    result: list[bytes] = coalesce(packets)
    return result


def payload_of(seed: int, length: int) -> bytes:
    """`length` bytes that differ from seed to seed: hypothesis draws the seed,
    not the bytes (a 64 KB draw would exceed its buffer)."""
    return hashlib.shake_128(seed.to_bytes(8, "big")).digest(length)


def properties(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return fuzz_settings(max_examples)


# -- strategies ----------------------------------------------------------------------

_addresses = st.one_of(
    st.sampled_from(["10.9.0.1", "10.9.0.2", "192.168.202.9"]),
    st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n))),
)
_idents = st.one_of(st.integers(0, 65535), st.integers(65400, 65535))
_seqs = st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 70000, 2**32 - 1))
_ip_options = st.one_of(
    st.just(b""),
    st.just(b""),
    st.just(b""),
    st.sampled_from([b"\x94\x04\x00\x00", b"\x01\x01\x01\x00", b"\x01" * 40]),
)


def timestamps(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + struct.pack("!II", tsval, tsecr)


_tcp_options = st.one_of(
    st.just(b""),
    st.builds(timestamps, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.integers(1, 10).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words)),
)


@st.composite
def ipv4_fields(draw: st.DrawFn, *, options: st.SearchStrategy[bytes] = _ip_options) -> Ipv4Fields:
    return Ipv4Fields(
        source=draw(_addresses, label="source"),
        destination=draw(_addresses, label="destination"),
        ident=draw(_idents, label="ident"),
        tos=draw(st.integers(0, 255), label="tos"),
        ttl=draw(st.integers(1, 255), label="ttl"),
        fragment=draw(st.sampled_from([DONT_FRAGMENT, 0]), label="df"),
        options=draw(options, label="ip options"),
    )


@st.composite
def tcp_fields(draw: st.DrawFn, *, flags: st.SearchStrategy[int]) -> TcpFields:
    return TcpFields(
        source_port=draw(st.integers(0, 65535), label="sport"),
        destination_port=draw(st.integers(0, 65535), label="dport"),
        seq=draw(_seqs, label="seq"),
        ack=draw(st.integers(0, 2**32 - 1), label="ack"),
        flags=draw(flags, label="flags"),
        window=draw(st.integers(0, 65535), label="window"),
        options=draw(_tcp_options, label="tcp options"),
    )


# A sender's TSO packet: ACK, and any of the flags the kernel copies or splits.
_super_flags = st.sets(st.sampled_from([PSH, FIN, CWR, ECE])).map(lambda fs: ACK | sum(fs))
_segment_sizes = st.one_of(st.integers(1, 1460), st.sampled_from([536, 1220, 1380, 1448, 1460]))


@st.composite
def sizes(draw: st.DrawFn, headers: int) -> tuple[int, int]:
    """(segment_size, payload length) within one IPv4 packet and the segment cap."""
    size = draw(_segment_sizes, label="segment size")
    most = min(MAX_IPV4_LENGTH - headers, size * MAX_GSO_SEGMENTS)
    length = draw(
        st.one_of(st.integers(1, most), st.integers(max(1, most - size), most)), label="length"
    )
    return size, length


@st.composite
def tcp_super_packets(
    draw: st.DrawFn, *, flags: st.SearchStrategy[int] = _super_flags
) -> tuple[bytes, Ipv4Fields, TcpFields, bytes, int]:
    """(frame, ip, tcp, payload, segment_size) of a TSO read from the TUN."""
    ip = draw(ipv4_fields())
    tcp = draw(tcp_fields(flags=flags))
    size, length = draw(sizes(40 + len(ip.options) + len(tcp.options)))
    payload = payload_of(draw(st.integers(0, 2**64 - 1), label="seed"), length)
    return tcp_super_packet(ip, tcp, payload, size), ip, tcp, payload, size


# -- segmentation ----------------------------------------------------------------------


def check_tcp_segments(
    segments: list[bytes], ip: Ipv4Fields, tcp: TcpFields, payload: bytes, size: int
) -> None:
    """Every segment of a cut super-packet as RFC 793/791 and the API say."""
    pieces = chunks(payload, size)
    assert len(segments) == len(pieces)
    parsed = [check_packet(segment) for segment in segments]
    assert b"".join(p.payload for p in parsed) == payload
    last = len(segments) - 1
    for index, (piece, segment) in enumerate(zip(pieces, parsed, strict=True)):
        assert segment.payload == piece
        assert segment.ip == replace(ip, ident=(ip.ident + index) % 65536), index
        assert segment.tcp.seq == (tcp.seq + index * size) % 2**32, index
        flags = tcp.flags
        if index != last:
            flags &= ~(FIN | PSH)
        if index != 0:
            flags &= ~CWR
        assert segment.tcp.flags == flags, (index, hex(segment.tcp.flags))
        assert replace(segment.tcp, seq=tcp.seq, flags=tcp.flags) == tcp, index


@properties(SEGMENT_EXAMPLES)
@given(tcp_super_packets())
def test_a_tcp_super_packet_is_cut_into_valid_segments(
    drawn: tuple[bytes, Ipv4Fields, TcpFields, bytes, int],
) -> None:
    frame, ip, tcp, payload, size = drawn
    segments = segment_tun_packet(frame)
    check_tcp_segments(segments, ip, tcp, payload, size)
    assert same_packets(segments, segment_frame(frame))


@properties(SEGMENT_EXAMPLES)
@given(ipv4_fields(), st.data())
def test_a_udp_super_packet_is_cut_into_valid_datagrams(ip: Ipv4Fields, data: Any) -> None:
    size, length = data.draw(sizes(28 + len(ip.options)))
    payload = payload_of(data.draw(st.integers(0, 2**64 - 1), label="seed"), length)
    frame = udp_super_packet(ip, payload, size)
    datagrams = segment_tun_packet(frame)
    pieces = chunks(payload, size)
    assert len(datagrams) == len(pieces)
    for index, (piece, datagram) in enumerate(zip(pieces, datagrams, strict=True)):
        parsed = check_packet(datagram)
        assert parsed.payload == piece
        assert parsed.ip == replace(ip, ident=(ip.ident + index) % 65536), index
        assert (parsed.tcp.source_port, parsed.tcp.destination_port) == (40000, 5201)
    assert same_packets(datagrams, segment_frame(frame))


@properties(SEGMENT_EXAMPLES)
@given(ipv4_fields(), st.data())
def test_a_single_packet_with_a_partial_checksum_gets_it_completed(
    ip: Ipv4Fields, data: Any
) -> None:
    length = data.draw(st.integers(0, 1500), label="length")
    payload = payload_of(data.draw(st.integers(0, 2**64 - 1), label="seed"), length)
    ihl = 20 + len(ip.options)
    if data.draw(st.booleans(), label="tcp"):
        tcp = data.draw(tcp_fields(flags=st.integers(0, 255)))
        partial = tcp_packet(ip, tcp, payload, partial_checksum=True)
        offset = TCP_CHECKSUM_OFFSET
    else:
        partial = udp_packet(ip, payload, partial_checksum=True)
        offset = UDP_CHECKSUM_OFFSET
    header = VirtioNetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, ihl, offset)
    frame = encode_virtio_header(header) + partial
    completed = segment_tun_packet(frame)
    assert len(completed) == 1
    check_packet(completed[0])
    assert same_packets(completed, segment_frame(frame))


@properties(SEGMENT_EXAMPLES)
@given(st.binary(max_size=1600))
def test_a_single_packet_without_flags_comes_back_as_it_is(packet: bytes) -> None:
    ip = Ipv4Fields()
    for candidate in (udp_packet(ip, packet), tcp_packet(ip, TcpFields(), packet)):
        assert segment_tun_packet(ZERO_HEADER + candidate) == [candidate]
    # Not even IPv4: the plane's later checks drop it, if this one does not.
    with contextlib.suppress(ValueError):
        assert segment_tun_packet(ZERO_HEADER + packet) == [packet]


def test_a_super_packet_marked_ecn_is_cut_like_any_other() -> None:
    """GSO_ECN (the sender's CWR must reach one segment only) is a flag on
    GSO_TCPV4, not a type of its own."""
    ip, tcp = Ipv4Fields(ident=65535), TcpFields(flags=ACK | CWR | ECE | PSH)
    frame = tcp_super_packet(ip, tcp, payload_of(17, 4000), 1448)
    header, packet = split_frame(frame)
    marked = encode_virtio_header(replace(header, gso_type=GSO_TCPV4 | GSO_ECN)) + packet
    segments = segment_tun_packet(marked)
    check_tcp_segments(segments, ip, tcp, payload_of(17, 4000), 1448)
    assert same_packets(segments, segment_frame(frame))


def zero_checksum_payload(make: Callable[[bytes], bytes], offset: int) -> bytes:
    """A payload whose last two bytes make the packet's transport checksum 0."""
    packet = make(b"zero-sum" + b"\0\0")
    ihl = (packet[0] & 0x0F) * 4
    field = struct.unpack_from("!H", packet, ihl + offset)[0]
    # The checksum is ~sum; raising the sum by `field` (one's complement) makes it 0xffff.
    return b"zero-sum" + struct.pack("!H", field)


def test_a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() -> None:
    ip = Ipv4Fields(ident=7)
    payload = zero_checksum_payload(lambda p: udp_packet(ip, p), UDP_CHECKSUM_OFFSET)
    # Three equal segments: each with the payload that sums to zero.
    frame = udp_super_packet(ip, payload * 3, len(payload))
    for datagram in segment_tun_packet(frame):
        parsed = check_packet(datagram)
        assert parsed.transport_checksum == 0xFFFF


def test_a_tcp_checksum_that_comes_out_zero_is_valid() -> None:
    ip, tcp = Ipv4Fields(), TcpFields()
    payload = zero_checksum_payload(lambda p: tcp_packet(ip, tcp, p), TCP_CHECKSUM_OFFSET)
    [segment] = segment_tun_packet(tcp_super_packet(ip, tcp, payload, 1400))
    # As tcp_gso_segment writes it: 0, not the 0xffff a UDP checksum needs.
    assert parse_packet(segment).transport_checksum == 0
    check_packet(segment)


def test_an_ipv4_header_checksum_that_comes_out_zero_is_valid() -> None:
    """IP ID 0x2658 makes this header sum to all ones: the checksum is 0, as
    the kernel writes it (0xffff would verify too, but not be the same bytes)."""
    frame = tcp_super_packet(Ipv4Fields(ident=0x2658), TcpFields(), bytes(100), 1000)
    [segment] = segment_tun_packet(frame)
    assert segment[10:12] == b"\0\0"
    check_packet(segment)
    assert same_packets([segment], segment_frame(frame))


@pytest.mark.parametrize("how", ["whole packet", "first segment", "past the headers"])
def test_the_kernels_header_length_is_not_trusted(how: str) -> None:
    """On the forward path the kernel puts the linear part's length into
    hdr_len (virtio_net_hdr_from_skb: skb_headlen), which may run past the
    headers; wireguard-go parses the headers instead, and so must the plane."""
    ip, tcp = Ipv4Fields(ident=65534), TcpFields(options=timestamps(1, 2))
    payload = payload_of(13, 5000)
    frame = tcp_super_packet(ip, tcp, payload, 1448)
    header, packet = split_frame(frame)
    header_length = {
        "whole packet": len(packet),
        "first segment": 52 + 1448,
        "past the headers": 60,
    }[how]
    frame = encode_virtio_header(replace(header, header_length=header_length)) + packet
    check_tcp_segments(segment_tun_packet(frame), ip, tcp, payload, 1448)


# -- coalescing ------------------------------------------------------------------------


def check_writes(packets: list[bytes], writes: list[bytes]) -> None:
    """The plane's writes for `packets` are exactly what the model says: a
    coalesced group as one GSO write (header and bytes as the API fixes
    them), anything else alone, as it came."""
    groups = model_coalesce(packets)
    assert len(writes) == len(groups), ([len(g) for g in groups], len(writes))
    for index, (group, write) in enumerate(zip(groups, writes, strict=True)):
        if len(group) > 1:
            assert same_write(write, expected_write(group)), (index, len(group))
            packet = split_frame(write)[1]
            assert struct.unpack_from("!H", packet, 36)[0] == pseudo_header_sum(packet)
            assert internet_checksum(packet[:20]) == 0
        elif write != ZERO_HEADER + group[0]:
            # A run of one may also go as a GSO write of one segment.
            assert same_write(write, expected_write(group)), (index, "a lone packet changed")
        assert same_packets(segment_frame(write), group), index


@st.composite
def flow_segments(
    draw: st.DrawFn, *, source_port: int | None = None, max_segments: int = 80
) -> list[bytes]:
    """The segments a TCP flow's super-packet is cut into, as they arrive:
    ACK (PSH on the last one, sometimes), the window the same on all."""
    ip = draw(ipv4_fields(options=st.just(b"")))
    ports = {} if source_port is None else {"source_port": source_port}
    tcp = replace(draw(tcp_fields(flags=st.sampled_from([ACK, ACK | PSH]))), **ports)
    size = draw(_segment_sizes, label="segment size")
    count = draw(st.integers(1, max_segments), label="segments")
    most = min(MAX_IPV4_LENGTH - 40 - len(tcp.options), size * count)
    length = draw(st.integers(max(1, most - size + 1), most), label="length")
    payload = payload_of(draw(st.integers(0, 2**64 - 1), label="seed"), length)
    return segment_frame(tcp_super_packet(ip, tcp, payload, size))


@properties(COALESCE_EXAMPLES)
@given(tcp_super_packets())
def test_coalescing_the_segments_and_cutting_again_gives_the_same_packets(
    drawn: tuple[bytes, Ipv4Fields, TcpFields, bytes, int],
) -> None:
    frame, _, tcp, _, _ = drawn
    segments = segment_tun_packet(frame)
    writes = coalesce_tun_packets(segments)
    check_writes(segments, writes)
    again = [packet for write in writes for packet in segment_tun_packet(write)]
    assert same_packets(again, segments)
    whole = tcp.flags in (ACK, ACK | PSH) and 1 < len(segments) <= 64
    if whole and not parse_packet(segments[0]).ip.options:
        # The kernel's own super-packet, byte for byte (but for a checksum's zero).
        assert len(writes) == 1
        assert same_write(writes[0], frame)


def interleave(data: Any, flows: list[list[bytes]]) -> list[bytes]:
    """The packets of all `flows`, each flow in its order, mixed as drawn."""
    positions = [0] * len(flows)
    mixed = []
    while True:
        pending = [n for n, flow in enumerate(flows) if positions[n] < len(flow)]
        if not pending:
            return mixed
        chosen = data.draw(st.sampled_from(pending), label="next flow")
        mixed.append(flows[chosen][positions[chosen]])
        positions[chosen] += 1


@properties(COALESCE_EXAMPLES)
@given(st.integers(1, 4), st.data())
def test_interleaved_flows_coalesce_per_flow_in_order(flow_count: int, data: Any) -> None:
    flows = [
        data.draw(flow_segments(source_port=1000 + n, max_segments=40)) for n in range(flow_count)
    ]
    if data.draw(st.booleans(), label="with other traffic"):
        noise = [udp_packet(Ipv4Fields(ident=n), bytes(n)) for n in range(5)]
        flows.append(noise)
    packets = interleave(data, flows)
    writes = coalesce_tun_packets(packets)
    check_writes(packets, writes)
    for flow in flows:
        ports = {parse_packet(flow[0]).tcp.source_port}
        mine = [
            packet
            for write in writes
            for packet in segment_frame(write)
            if {parse_packet(packet).tcp.source_port} == ports
            and parse_packet(packet).protocol == parse_packet(flow[0]).protocol
        ]
        assert same_packets(mine, flow)


def test_more_flows_than_the_plane_tracks_still_come_out_whole_and_in_order() -> None:
    """Past the plane's table of open runs (16 flows), a flow's run may be
    written early; each flow's packets still come out valid and in order."""
    flows = [
        segment_frame(
            tcp_super_packet(
                Ipv4Fields(ident=n * 1000), TcpFields(source_port=n), payload_of(n, 4000), 500
            )
        )
        for n in range(40)
    ]
    packets = [packet for side_by_side in zip(*flows, strict=True) for packet in side_by_side]
    writes = coalesce_tun_packets(packets)
    received = [packet for write in writes for packet in segment_tun_packet(write)]
    for n, flow in enumerate(flows):
        mine = [packet for packet in received if parse_packet(packet).tcp.source_port == n]
        assert same_packets(mine, flow), n
    assert len(received) == len(packets)


def _set_ip(packet: bytes, **changes: Any) -> bytes:
    """`packet` with IPv4 fields changed, every checksum valid again."""
    parsed = parse_packet(packet)
    return tcp_packet(replace(parsed.ip, **changes), parsed.tcp, parsed.payload)


def _set_tcp(packet: bytes, **changes: Any) -> bytes:
    parsed = parse_packet(packet)
    return tcp_packet(parsed.ip, replace(parsed.tcp, **changes), parsed.payload)


def _flip(packet: bytes, at: int) -> bytes:
    return packet[:at] + bytes([packet[at] ^ 0x01]) + packet[at + 1 :]


def _as_udp(packet: bytes) -> bytes:
    parsed = parse_packet(packet)
    return udp_packet(parsed.ip, parsed.payload)


def _without_payload(packet: bytes) -> bytes:
    parsed = parse_packet(packet)
    return tcp_packet(parsed.ip, parsed.tcp, b"")


def _longer(packet: bytes) -> bytes:
    parsed = parse_packet(packet)
    return tcp_packet(parsed.ip, parsed.tcp, parsed.payload + b"+")


def _shorter(packet: bytes) -> bytes:
    parsed = parse_packet(packet)
    return tcp_packet(parsed.ip, parsed.tcp, parsed.payload[:-1])


# Each turns the segment that would join the run into one that must not.
BREAKERS: dict[str, Callable[[bytes], bytes]] = {
    "SYN": lambda p: _set_tcp(p, flags=ACK | SYN),
    "FIN": lambda p: _set_tcp(p, flags=ACK | FIN),
    "RST": lambda p: _set_tcp(p, flags=ACK | RST),
    "URG": lambda p: _set_tcp(p, flags=ACK | URG, urgent=1),
    "ECE": lambda p: _set_tcp(p, flags=ACK | ECE),
    "CWR": lambda p: _set_tcp(p, flags=ACK | CWR),
    "no ACK": lambda p: _set_tcp(p, flags=PSH),
    "other options": lambda p: _set_tcp(p, options=timestamps(99, 98)),
    "more options": lambda p: _set_tcp(
        p, options=parse_packet(p).tcp.options + b"\x01\x01\x01\x01"
    ),
    "IP options": lambda p: _set_ip(p, options=b"\x94\x04\x00\x00"),
    "seq gap": lambda p: _set_tcp(p, seq=parse_packet(p).tcp.seq + 1),
    "seq overlap": lambda p: _set_tcp(p, seq=parse_packet(p).tcp.seq - 1),
    "another ACK number": lambda p: _set_tcp(p, ack=parse_packet(p).tcp.ack + 1),
    "another port": lambda p: _set_tcp(
        p, destination_port=parse_packet(p).tcp.destination_port ^ 1
    ),
    "another source": lambda p: _set_ip(p, source="10.200.0.1"),
    "TOS": lambda p: _set_ip(p, tos=parse_packet(p).ip.tos ^ 0x04),
    "ECN bits": lambda p: _set_ip(p, tos=parse_packet(p).ip.tos ^ 0x03),
    "TTL": lambda p: _set_ip(p, ttl=parse_packet(p).ip.ttl % 255 + 1),
    "DF": lambda p: _set_ip(p, fragment=parse_packet(p).ip.fragment ^ DONT_FRAGMENT),
    "IP ID gap": lambda p: _set_ip(p, ident=(parse_packet(p).ip.ident + 1) % 65536),
    "more fragments": lambda p: _set_ip(p, fragment=DONT_FRAGMENT | MORE_FRAGMENTS),
    "fragment offset": lambda p: _set_ip(p, fragment=185),
    "bad IP checksum": lambda p: _flip(p, 11),
    "bad TCP checksum": lambda p: _flip(p, 37),
    "bad payload": lambda p: _flip(p, len(p) - 1),
    "UDP": _as_udp,
    "no payload": _without_payload,
    "longer": _longer,
}


def _three_segments(options: bytes = b"") -> list[bytes]:
    ip, tcp = Ipv4Fields(ident=65534), TcpFields(seq=2**32 - 1000, options=options)
    return segment_frame(tcp_super_packet(ip, tcp, payload_of(3, 3000), 1000))


@pytest.mark.parametrize("breaker", BREAKERS)
@pytest.mark.parametrize("options", [b"", timestamps(5, 6)], ids=["plain", "timestamps"])
def test_a_segment_that_must_not_join_stays_apart(breaker: str, options: bytes) -> None:
    first, second, third = _three_segments(options)
    odd = BREAKERS[breaker](third)
    writes = coalesce_tun_packets([first, second, odd])
    check_writes([first, second, odd], writes)
    assert len(writes) == 2, breaker
    assert segment_frame(writes[1]) == [odd]
    # And as the second packet: the first stays alone, too.
    writes = coalesce_tun_packets([first, BREAKERS[breaker](second)])
    assert len(writes) == 2, breaker
    check_writes([first, BREAKERS[breaker](second)], writes)


def test_a_tcp_packet_that_cannot_join_ends_its_flows_run() -> None:
    """[s0, RST, s1] is written in that order, as the kernel's GRO would
    deliver it: s1 may not jump over the RST into s0's run."""
    first, second, _ = _three_segments()
    reset = _without_payload(_set_tcp(second, flags=ACK | RST))
    packets = [first, reset, second]
    writes = coalesce_tun_packets(packets)
    check_writes(packets, writes)
    assert [segment_frame(write) for write in writes] == [[first], [reset], [second]]


def test_another_flows_odd_packet_leaves_the_run_open() -> None:
    first, second, third = _three_segments()
    other = _without_payload(_set_tcp(second, flags=ACK | RST, source_port=9))
    packets = [first, other, second, third]
    writes = coalesce_tun_packets(packets)
    check_writes(packets, writes)
    assert [len(segment_frame(write)) for write in writes] == [3, 1]


def test_a_short_segment_ends_the_run() -> None:
    ip, tcp = Ipv4Fields(), TcpFields()
    short = segment_frame(tcp_super_packet(ip, tcp, payload_of(4, 2500), 1000))  # 1000 1000 500
    after = _set_ip(_set_tcp(short[0], seq=tcp.seq + 2500), ident=3)
    packets = [*short, after]
    writes = coalesce_tun_packets(packets)
    check_writes(packets, writes)
    assert [len(segment_frame(write)) for write in writes] == [3, 1]


def test_psh_ends_the_run_and_is_kept() -> None:
    ip, tcp = Ipv4Fields(), TcpFields(flags=ACK | PSH)
    run = segment_frame(tcp_super_packet(ip, tcp, payload_of(5, 3000), 1000))
    after = _set_ip(_set_tcp(run[0], seq=tcp.seq + 3000, flags=ACK), ident=3)
    writes = coalesce_tun_packets([*run, after])
    check_writes([*run, after], writes)
    assert len(writes) == 2
    assert parse_packet(split_frame(writes[0])[1]).tcp.flags == ACK | PSH


def test_a_run_stops_at_64_segments_and_at_64_kb() -> None:
    ip, tcp = Ipv4Fields(ident=65500), TcpFields()
    many = segment_frame(tcp_super_packet(ip, tcp, payload_of(6, 100 * 64 + 50), 100))
    writes = coalesce_tun_packets(many)
    check_writes(many, writes)
    assert [len(segment_frame(write)) for write in writes] == [64, 1]
    big = [
        *segment_frame(tcp_super_packet(ip, tcp, payload_of(7, 1460 * 44), 1460)),
        *segment_frame(
            tcp_super_packet(
                replace(ip, ident=(ip.ident + 44) % 65536),
                replace(tcp, seq=tcp.seq + 1460 * 44),
                payload_of(8, 1460 * 2),
                1460,
            )
        ),
    ]
    writes = coalesce_tun_packets(big)
    check_writes(big, writes)
    for write in writes:
        assert len(write) - HEADER_LENGTH <= MAX_IPV4_LENGTH


@properties(COALESCE_EXAMPLES)
@given(st.lists(st.binary(max_size=100), max_size=8), st.data())
def test_coalescing_anything_never_fails(junk: list[bytes], data: Any) -> None:
    """Junk and mutated segments: as the model says (nothing coalesces that
    is not a complete, valid segment of its run)."""
    segments = data.draw(flow_segments(max_segments=6))
    packets = [
        *junk,
        *(data.draw(st.one_of(st.just(s), mutated(s))) for s in segments),
    ]
    packets = data.draw(st.permutations(packets)) if data.draw(st.booleans()) else packets
    writes = coalesce_tun_packets(packets)
    check_writes(packets, writes)


# -- malformed reads -------------------------------------------------------------------


def _good_frame() -> bytes:
    ip, tcp = Ipv4Fields(), TcpFields(options=timestamps(1, 2))
    return tcp_super_packet(ip, tcp, payload_of(9, 4000), 1448)


def _with_header(frame: bytes, **changes: int) -> bytes:
    header, packet = split_frame(frame)
    return encode_virtio_header(replace(header, **changes)) + packet


def _with_ip_byte(frame: bytes, at: int, value: int) -> bytes:
    """The frame with one IPv4 header byte set, the header checksum valid again."""
    packet = bytearray(frame[HEADER_LENGTH:])
    packet[at] = value
    ihl = min((packet[0] & 0x0F) * 4, len(packet))
    packet[10:12] = b"\0\0"
    packet[10:12] = internet_checksum(bytes(packet[:ihl])).to_bytes(2, "big")
    return frame[:HEADER_LENGTH] + bytes(packet)


def _with_total_length(frame: bytes, delta: int) -> bytes:
    total = len(frame) - HEADER_LENGTH + delta
    frame = _with_ip_byte(frame, 2, total >> 8)
    return _with_ip_byte(frame, 3, total & 0xFF)


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda f: b"",
    "half a virtio header": lambda f: f[:5],
    "virtio header only": lambda f: f[:HEADER_LENGTH],
    "half an IPv4 header": lambda f: f[: HEADER_LENGTH + 10],
    "half a TCP header": lambda f: f[: HEADER_LENGTH + 30],
    "truncated": lambda f: f[:-1],
    "total length too long": lambda f: _with_total_length(f, 1),
    "total length too short": lambda f: _with_total_length(f, -1),
    "total length below the headers": lambda f: _with_total_length(f, 40 - len(f)),
    "IHL 4": lambda f: _with_ip_byte(f, 0, 0x44),
    "IHL past the end": lambda f: _with_total_length(
        _with_ip_byte(f, 0, 0x4F)[: HEADER_LENGTH + 40], 0
    ),
    "IPv6": lambda f: _with_ip_byte(f, 0, 0x65),
    "data offset 4": lambda f: f[: HEADER_LENGTH + 32] + b"\x40" + f[HEADER_LENGTH + 33 :],
    "data offset 15 past the end": lambda f: _with_total_length(
        f[: HEADER_LENGTH + 32] + b"\xf0" + f[HEADER_LENGTH + 33 : HEADER_LENGTH + 60], 0
    ),
    "segment_size 0": lambda f: _with_header(f, segment_size=0),
    "gso_type UDP (UFO)": lambda f: _with_header(f, gso_type=3),
    "gso_type TCPV6": lambda f: _with_header(f, gso_type=4),
    "gso_type 0xff": lambda f: _with_header(f, gso_type=0xFF),
    "TSO of a UDP packet": lambda f: _with_ip_byte(f, 9, 17),
    "USO of a TCP packet": lambda f: _with_header(f, gso_type=GSO_UDP_L4),
    "checksum field past the end": lambda f: _with_header(
        f, gso_type=GSO_NONE, segment_size=0, checksum_start=len(f) - HEADER_LENGTH - 1
    ),
}


@pytest.mark.parametrize("malformation", MALFORMED)
def test_a_malformed_read_is_a_value_error(malformation: str) -> None:
    frame = MALFORMED[malformation](_good_frame())
    with pytest.raises(ValueError):
        segment_tun_packet(frame)


@properties(MALFORMED_EXAMPLES)
@given(st.data())
def test_a_mangled_read_is_cut_validly_or_refused(data: Any) -> None:
    """Whatever a mutated TUN read holds: a ValueError, or (for GSO) complete,
    valid packets; never another exception or a crash."""
    frame, *_ = data.draw(tcp_super_packets(), label="super-packet")
    if data.draw(st.booleans(), label="udp"):
        frame = udp_super_packet(Ipv4Fields(), payload_of(1, 3000), 1000)
    frame = data.draw(mutated(frame), label="mutated")
    try:
        packets = segment_tun_packet(frame)
    except ValueError:
        return
    assert all(isinstance(packet, bytes) for packet in packets)
    header = decode_virtio_header(frame) if len(frame) >= HEADER_LENGTH else None
    if header is not None and header.gso_type in (GSO_TCPV4, GSO_UDP_L4):
        parsed: list[Parsed] = [check_packet(packet) for packet in packets]
        assert all(p.protocol == parsed[0].protocol for p in parsed)
        assert (parsed[0].protocol == IPPROTO_TCP) == (header.gso_type == GSO_TCPV4)
