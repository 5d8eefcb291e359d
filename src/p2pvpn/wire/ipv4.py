"""Just enough IPv4 for routing decisions and IPIP ("sdwan") encapsulation, sans I/O.

Parsers never verify the header checksum: relays pass packets on unchanged
(the reference does not check it either; a packet captured from a Candy
server has a zero checksum), and the receiving kernel is the one to judge.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from p2pvpn.wire.errors import DecodeError

__all__ = [
    "IPPROTO_IPIP",
    "MIN_HEADER_LENGTH",
    "Ipv4Header",
    "decapsulate_ipip",
    "decrement_ttl",
    "encapsulate_ipip",
    "ipv4_checksum",
    "ipv4_destination",
    "ipv4_source",
    "is_broadcast_or_multicast",
    "parse_ipv4_header",
]

IPPROTO_IPIP = 4
MIN_HEADER_LENGTH = 20
MAX_TOTAL_LENGTH = 0xFFFF
DEFAULT_TTL = 64

LIMITED_BROADCAST = IPv4Address("255.255.255.255")
MULTICAST = IPv4Network("224.0.0.0/4")

# version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol,
# checksum, source, destination.
_HEADER = struct.Struct("!BBHHHBBH4s4s")
_CHECKSUM_OFFSET = 10
_SOURCE_OFFSET = 12
_DESTINATION_OFFSET = 16


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    """The fields of an IPv4 header that p2pvpn looks at.

    ``header_length`` is in bytes (IHL * 4), not in 32-bit words.
    """

    version: int
    header_length: int
    total_length: int
    ttl: int
    protocol: int
    source: IPv4Address
    destination: IPv4Address

    def encode(self) -> bytes:
        """An option-less header: TOS, id and flags zero, checksum filled in."""
        if self.version != 4 or self.header_length != MIN_HEADER_LENGTH:
            raise ValueError("only version 4 headers without options can be encoded")
        try:
            header = _HEADER.pack(
                (self.version << 4) | (self.header_length // 4),
                0,
                self.total_length,
                0,
                0,
                self.ttl,
                self.protocol,
                0,
                self.source.packed,
                self.destination.packed,
            )
        except struct.error as exc:
            raise ValueError(f"IPv4 header field out of range: {exc}") from exc
        checksum = ipv4_checksum(header).to_bytes(2, "big")
        return header[:_CHECKSUM_OFFSET] + checksum + header[_CHECKSUM_OFFSET + 2 :]


def ipv4_checksum(header: bytes) -> int:
    """RFC 791 header checksum (one's complement of the one's complement sum).

    Computed over a header whose checksum field is zero it gives the value to
    store; over a header holding a correct checksum it gives 0.
    """
    if len(header) % 2:
        header += b"\0"
    words: tuple[int, ...] = struct.unpack(f"!{len(header) // 2}H", header)
    total = sum(words)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _require_fixed_header(packet: bytes) -> None:
    if len(packet) < MIN_HEADER_LENGTH:
        raise DecodeError(f"IPv4 packet needs {MIN_HEADER_LENGTH} bytes, got {len(packet)}")
    if packet[0] >> 4 != 4:
        raise DecodeError(f"IP version {packet[0] >> 4}, expected 4")


def parse_ipv4_header(packet: bytes) -> Ipv4Header:
    """Parse and sanity-check the header; trailing bytes after total_length are allowed."""
    _require_fixed_header(packet)
    fields = _HEADER.unpack_from(packet)
    version_ihl, _, total_length, _, _, ttl, protocol, _, source, destination = fields
    header_length = (version_ihl & 0x0F) * 4
    if header_length < MIN_HEADER_LENGTH:
        raise DecodeError(f"IPv4 header length {header_length} is below {MIN_HEADER_LENGTH}")
    if not header_length <= total_length <= len(packet):
        raise DecodeError(
            f"IPv4 total length {total_length} does not fit header length {header_length} "
            f"and {len(packet)} bytes of packet"
        )
    return Ipv4Header(
        version=version_ihl >> 4,
        header_length=header_length,
        total_length=total_length,
        ttl=ttl,
        protocol=protocol,
        source=IPv4Address(source),
        destination=IPv4Address(destination),
    )


def ipv4_destination(packet: bytes) -> IPv4Address:
    """Destination address; only the fixed header is checked, so it is cheap per packet."""
    _require_fixed_header(packet)
    return IPv4Address(bytes(packet[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 4]))


def ipv4_source(packet: bytes) -> IPv4Address:
    """Source address; only the fixed header is checked, so it is cheap per packet."""
    _require_fixed_header(packet)
    return IPv4Address(bytes(packet[_SOURCE_OFFSET : _SOURCE_OFFSET + 4]))


def encapsulate_ipip(packet: bytes, source: IPv4Address, destination: IPv4Address) -> bytes:
    """Prepend a 20-byte IPIP header (TTL 64, valid checksum) addressed to ``destination``."""
    total_length = MIN_HEADER_LENGTH + len(packet)
    if total_length > MAX_TOTAL_LENGTH:
        raise ValueError(f"packet of {len(packet)} bytes is too large to encapsulate")
    outer = Ipv4Header(
        version=4,
        header_length=MIN_HEADER_LENGTH,
        total_length=total_length,
        ttl=DEFAULT_TTL,
        protocol=IPPROTO_IPIP,
        source=source,
        destination=destination,
    )
    return outer.encode() + packet


def decapsulate_ipip(packet: bytes) -> bytes:
    """The inner packet of an IPIP packet; DecodeError if the packet is not IPIP."""
    header = parse_ipv4_header(packet)
    if header.protocol != IPPROTO_IPIP:
        raise DecodeError(f"IP protocol {header.protocol} is not IPIP ({IPPROTO_IPIP})")
    return bytes(packet[header.header_length : header.total_length])


def decrement_ttl(packet: bytes) -> bytes | None:
    """The packet with its TTL one less and the header checksum updated
    incrementally (RFC 1624, eqn. 3), as a router does; None when the TTL
    runs out, so that a loop between relaying clients dies out."""
    ttl = packet[8]
    if ttl <= 1:
        return None
    old_word = (ttl << 8) | packet[9]
    new_word = old_word - 0x0100
    checksum = int.from_bytes(packet[10:12], "big")
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header = bytearray(packet[:12])
    header[8] = ttl - 1
    header[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(header) + packet[12:]


def is_broadcast_or_multicast(destination: IPv4Address, network: IPv4Network | None = None) -> bool:
    """Whether a packet to ``destination`` goes to every client rather than one.

    ``network`` is the server's DHCP network, whose directed broadcast counts too.
    """
    if destination == LIMITED_BROADCAST or destination in MULTICAST:
        return True
    # /31 and /32 have no broadcast address (RFC 3021); their "broadcast" is a host.
    if network is None or network.prefixlen >= 31:
        return False
    return destination == network.broadcast_address
