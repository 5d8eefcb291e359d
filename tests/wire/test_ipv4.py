"""IPv4 header parsing, RFC 791 checksum and IPIP encapsulation (PROTOCOL 2.6)."""

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import (
    IPPROTO_IPIP,
    Ipv4Header,
    decapsulate_ipip,
    decrement_ttl,
    encapsulate_ipip,
    ipv4_checksum,
    ipv4_destination,
    ipv4_source,
    is_broadcast_or_multicast,
    parse_ipv4_header,
)

# UDP 10.77.0.1 -> 10.77.0.2, total length 28, as relayed by a Candy server.
INNER = bytes.fromhex("4500001c00010000401100000a4d00010a4d00027878787878787878")
TUN_IP = IPv4Address("10.77.0.1")
NEXTHOP = IPv4Address("10.77.0.9")


def test_checksum_of_a_textbook_header() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ipv4_checksum(header) == 0xB861


def test_checksum_over_a_header_with_its_checksum_is_zero() -> None:
    header = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    assert ipv4_checksum(header) == 0


def test_checksum_pads_odd_length_with_zero() -> None:
    assert ipv4_checksum(b"\x12\x34\x56") == ipv4_checksum(b"\x12\x34\x56\x00")


def test_checksum_folds_carries() -> None:
    assert ipv4_checksum(b"\xff\xff\x00\x01") == 0xFFFE


def test_encapsulate_ipip_exact_bytes() -> None:
    # version/IHL 45, TOS 0, length 48, id 0, flags 0, TTL 64, protocol 4,
    # checksum 0x6627 (worked out by hand), source, destination.
    expected_header = "45000030" + "00000000" + "40046627" + "0a4d0001" + "0a4d0009"
    assert encapsulate_ipip(INNER, TUN_IP, NEXTHOP).hex() == expected_header + INNER.hex()


def test_decapsulate_ipip_returns_the_inner_packet() -> None:
    assert decapsulate_ipip(encapsulate_ipip(INNER, TUN_IP, NEXTHOP)) == INNER


def test_decapsulate_drops_bytes_after_total_length() -> None:
    assert decapsulate_ipip(encapsulate_ipip(INNER, TUN_IP, NEXTHOP) + b"pad") == INNER


def test_decapsulate_non_ipip_raises() -> None:
    with pytest.raises(DecodeError, match="not IPIP"):
        decapsulate_ipip(INNER)


def test_decapsulate_respects_header_options() -> None:
    # IHL 6: one 4-byte option word (NOP NOP NOP EOL) before the inner packet.
    header = "46000034" + "00000000" + "40040000" + "01020304" + "05060708" + "01010100"
    packet = bytes.fromhex(header) + INNER
    assert decapsulate_ipip(packet) == INNER


def test_encapsulate_refuses_oversized_packet() -> None:
    assert len(encapsulate_ipip(b"\x00" * (65535 - 20), TUN_IP, NEXTHOP)) == 65535
    with pytest.raises(ValueError):
        encapsulate_ipip(b"\x00" * (65535 - 19), TUN_IP, NEXTHOP)


def test_parse_header_fields() -> None:
    assert parse_ipv4_header(INNER) == Ipv4Header(
        version=4,
        header_length=20,
        total_length=28,
        ttl=64,
        protocol=17,
        source=IPv4Address("10.77.0.1"),
        destination=IPv4Address("10.77.0.2"),
    )


def test_parse_header_does_not_verify_the_checksum() -> None:
    assert ipv4_checksum(INNER[:20]) != 0
    assert parse_ipv4_header(INNER).protocol == 17


def test_parse_header_accepts_trailing_bytes() -> None:
    assert parse_ipv4_header(INNER + b"\x00" * 10).total_length == 28


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (INNER[:19], "needs 20"),
        (b"\x65" + INNER[1:], "version 6"),
        (b"\x44" + INNER[1:], "header length 16"),
        (INNER[:27], "total length"),
        (INNER[:2] + b"\x00\x13" + INNER[4:], "total length"),
        (b"\x46" + INNER[1:2] + b"\x00\x14" + INNER[4:20], "total length"),
    ],
)
def test_parse_header_rejects_malformed(packet: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        parse_ipv4_header(packet)


def test_addresses() -> None:
    assert ipv4_source(INNER) == IPv4Address("10.77.0.1")
    assert ipv4_destination(INNER) == IPv4Address("10.77.0.2")


@pytest.mark.parametrize("packet", [b"", INNER[:19], b"\x60" + INNER[1:]])
def test_addresses_of_malformed_packets_raise(packet: bytes) -> None:
    with pytest.raises(DecodeError):
        ipv4_source(packet)
    with pytest.raises(DecodeError):
        ipv4_destination(packet)


@pytest.mark.parametrize(
    ("destination", "network", "expected"),
    [
        ("255.255.255.255", None, True),
        ("224.0.0.1", None, True),
        ("239.255.255.250", None, True),
        ("240.0.0.1", None, False),
        ("223.255.255.255", None, False),
        ("10.77.0.255", None, False),
        ("10.77.0.255", "10.77.0.0/24", True),
        ("10.77.0.254", "10.77.0.0/24", False),
        ("10.78.0.255", "10.77.0.0/24", False),
        ("255.255.255.255", "10.77.0.0/24", True),
        ("10.77.0.1", "10.77.0.0/31", False),
        ("10.77.0.1", "10.77.0.1/32", False),
    ],
)
def test_is_broadcast_or_multicast(destination: str, network: str | None, expected: bool) -> None:
    dhcp_network = IPv4Network(network) if network else None
    assert is_broadcast_or_multicast(IPv4Address(destination), dhcp_network) is expected


def test_ipip_protocol_number() -> None:
    assert IPPROTO_IPIP == 4


def test_header_encode_refuses_options_and_bad_fields() -> None:
    with pytest.raises(ValueError):
        Ipv4Header(4, 24, 24, 64, 4, TUN_IP, NEXTHOP).encode()
    with pytest.raises(ValueError):
        Ipv4Header(4, 20, 70000, 64, 4, TUN_IP, NEXTHOP).encode()


addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))


@given(st.binary(max_size=1500), addresses, addresses)
def test_ipip_round_trip(inner: bytes, source: IPv4Address, destination: IPv4Address) -> None:
    packet = encapsulate_ipip(inner, source, destination)
    header = parse_ipv4_header(packet)
    assert (header.source, header.destination) == (source, destination)
    assert (header.protocol, header.ttl, header.total_length) == (4, 64, 20 + len(inner))
    assert ipv4_checksum(packet[:20]) == 0
    assert decapsulate_ipip(packet) == inner


@given(
    ttl=st.integers(min_value=2, max_value=255),
    protocol=st.integers(min_value=0, max_value=255),
    body=st.binary(max_size=40),
)
def test_decrement_ttl_keeps_a_valid_checksum(ttl: int, protocol: int, body: bytes) -> None:
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, ttl, protocol
    header[2:4] = (20 + len(body)).to_bytes(2, "big")
    header[12:20] = bytes([10, 0, 0, 1, 10, 0, 0, 2])
    header[10:12] = ipv4_checksum(bytes(header)).to_bytes(2, "big")
    relayed = decrement_ttl(bytes(header) + body)
    assert relayed is not None
    assert relayed[8] == ttl - 1
    assert ipv4_checksum(relayed[:20]) == 0
    assert (
        relayed[:8] + relayed[9:10] + relayed[12:]
        == bytes(header[:8] + header[9:10] + header[12:]) + body
    )


@pytest.mark.parametrize("ttl", [0, 1])
def test_decrement_ttl_refuses_a_packet_whose_ttl_runs_out(ttl: int) -> None:
    header = bytearray(20)
    header[0], header[8] = 0x45, ttl
    assert decrement_ttl(bytes(header)) is None
