"""WebSocket messages between client and server (PROTOCOL 2), sans I/O.

One message per binary frame, byte 0 is the type. Decoders accept frames
longer than the layout (the reference does) and raise only DecodeError.
Encoders raise ValueError for fields the layout cannot carry.

HELLO, NAMES and the GENERAL name announcement are p2pvpn's extensions
(docs/protocol-extensions.md): types and a subtype a Candy side ignores.
"""

import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Self, TypeAlias

from p2pvpn.wire._layout import TYPE_BYTE, pack, unpack
from p2pvpn.wire.crypto import VMAC_SIZE, auth_hash, expttun_hash, vmac_hash
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.names import is_clean_label

__all__ = [
    "BROADCAST",
    "GENERAL_NAME",
    "HELLO_VERSION",
    "MAX_NAMES_PER_MESSAGE",
    "MAX_ROUTES_PER_MESSAGE",
    "Auth",
    "Discovery",
    "ExptTun",
    "Forward",
    "General",
    "Hello",
    "LanAddress",
    "NameAnnouncement",
    "NameEntry",
    "Names",
    "SystemRoute",
    "SystemRoutes",
    "Udp4Conn",
    "UnknownWsMessage",
    "Vmac",
    "WsMessage",
    "WsType",
    "decode_general_header",
    "decode_ws_message",
    "encode_names",
]

BROADCAST = IPv4Address("255.255.255.255")

HASH_SIZE = 32
MIN_PACKET_SIZE = 20
MAX_ROUTES_PER_MESSAGE = 255
GENERAL_SUBTYPE_LAN_ADDRESS = 0
GENERAL_NAME = 0x50
HELLO_VERSION = 1
MAX_NAMES_PER_MESSAGE = 256
# Flag bits of HELLO, of a NAMES entry and of a name announcement.
_FLAG_EXIT_NODE = 0x01
_FLAG_P2PVPN = 0x02
_FLAG_REPLY_WANTED = 0x02
_FLAG_REPLACE = 0x01


class WsType(IntEnum):
    AUTH = 0
    FORWARD = 1
    EXPTTUN = 2
    UDP4CONN = 3
    VMAC = 4
    DISCOVERY = 5
    ROUTE = 6
    HELLO = 0x50
    NAMES = 0x51
    GENERAL = 255


_AUTH = struct.Struct("!B4sq32s")
_EXPTTUN = struct.Struct("!Bq32s32s")
_UDP4CONN = struct.Struct("!B4s4s4sH")
_VMAC = struct.Struct("!B16sq32s")
_DISCOVERY = struct.Struct("!B4s4s")
_ROUTE_HEADER = struct.Struct("!BBH")
_ROUTE_ENTRY = struct.Struct("!4s4s4s")
_GENERAL_HEADER = struct.Struct("!BBH4s4s")
_LAN_ADDRESS = struct.Struct("!BBH4s4s4sH")
_HELLO = struct.Struct("!BBBB")
_NAMES_HEADER = struct.Struct("!BBH")
_NAME_ENTRY_HEADER = struct.Struct("!4sBB")


def _require_hash_size(digest: bytes) -> None:
    # struct's "32s" would silently pad or cut a wrong-sized hash.
    if len(digest) != HASH_SIZE:
        raise ValueError(f"hash must be {HASH_SIZE} bytes, got {len(digest)}")


def _require_label(name: str, what: str) -> bytes:
    if not is_clean_label(name):
        raise ValueError(f"{what} {name!r} is not a clean DNS label")
    return name.encode("ascii")


def _decode_label(raw: bytes, what: str) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} {raw!r} is not ASCII") from exc
    if not is_clean_label(name):
        raise DecodeError(f"{what} {name!r} is not a clean DNS label")
    return name


def _is_contiguous_mask(mask: IPv4Address) -> bool:
    host_bits = ~int(mask) & 0xFFFFFFFF
    return host_bits & (host_bits + 1) == 0


@dataclass(frozen=True, slots=True)
class Auth:
    """Login with a virtual address (client -> server)."""

    tun_ip: IPv4Address
    timestamp: int
    hash: bytes

    @classmethod
    def create(cls, password: str, tun_ip: IPv4Address, timestamp: int) -> Self:
        return cls(tun_ip, timestamp, auth_hash(password, tun_ip, timestamp))

    def verify(self, password: str) -> bool:
        expected = auth_hash(password, self.tun_ip, self.timestamp)
        return hmac.compare_digest(self.hash, expected)

    def encode(self) -> bytes:
        _require_hash_size(self.hash)
        return pack(_AUTH, WsType.AUTH, self.tun_ip.packed, self.timestamp, self.hash)


@dataclass(frozen=True, slots=True)
class Forward:
    """An IPv4 packet relayed through the server."""

    packet: bytes

    def encode(self) -> bytes:
        if len(self.packet) < MIN_PACKET_SIZE:
            raise ValueError(f"an IPv4 packet has at least {MIN_PACKET_SIZE} bytes")
        return bytes((WsType.FORWARD,)) + self.packet


@dataclass(frozen=True, slots=True)
class ExptTun:
    """Address request (client -> server) or grant (server -> client)."""

    timestamp: int
    cidr: IPv4Interface
    hash: bytes

    @classmethod
    def create(cls, password: str, cidr: IPv4Interface, timestamp: int) -> Self:
        return cls(timestamp, cidr, expttun_hash(password, timestamp))

    def verify(self, password: str) -> bool:
        return hmac.compare_digest(self.hash, expttun_hash(password, self.timestamp))

    def encode(self) -> bytes:
        _require_hash_size(self.hash)
        # "255.255.255.255/32" is 18 characters, so the NUL always fits.
        cidr_text = str(self.cidr).encode("ascii")
        return pack(_EXPTTUN, WsType.EXPTTUN, self.timestamp, cidr_text, self.hash)


@dataclass(frozen=True, slots=True)
class Udp4Conn:
    """The public UDP address of peer ``src``, relayed by the server to ``dst``."""

    src: IPv4Address
    dst: IPv4Address
    public_ip: IPv4Address
    public_port: int

    def encode(self) -> bytes:
        return pack(
            _UDP4CONN,
            WsType.UDP4CONN,
            self.src.packed,
            self.dst.packed,
            self.public_ip.packed,
            self.public_port,
        )


@dataclass(frozen=True, slots=True)
class Vmac:
    """The client's persistent random id, so it gets its dynamic address back."""

    vmac: str
    timestamp: int
    hash: bytes

    @classmethod
    def create(cls, password: str, vmac: str, timestamp: int) -> Self:
        return cls(vmac, timestamp, vmac_hash(password, vmac, timestamp))

    def verify(self, password: str) -> bool:
        try:
            expected = vmac_hash(password, self.vmac, self.timestamp)
        except ValueError:  # not 16 ASCII characters: cannot have been hashed by a peer
            return False
        return hmac.compare_digest(self.hash, expected)

    def encode(self) -> bytes:
        _require_hash_size(self.hash)
        vmac_bytes = self.vmac.encode("ascii")
        if len(vmac_bytes) != VMAC_SIZE:
            raise ValueError(f"vmac must be {VMAC_SIZE} ASCII characters")
        return pack(_VMAC, WsType.VMAC, vmac_bytes, self.timestamp, self.hash)


@dataclass(frozen=True, slots=True)
class Discovery:
    """A hint to try a direct path with ``src``; ``dst`` may be BROADCAST."""

    src: IPv4Address
    dst: IPv4Address

    def encode(self) -> bytes:
        return pack(_DISCOVERY, WsType.DISCOVERY, self.src.packed, self.dst.packed)


@dataclass(frozen=True, slots=True)
class SystemRoute:
    """One "sdwan" entry: traffic for dst/mask goes IPIP-encapsulated to nexthop."""

    dst: IPv4Address
    mask: IPv4Address
    nexthop: IPv4Address

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(f"{self.dst}/{self.mask}", strict=False)

    def encode(self) -> bytes:
        if not _is_contiguous_mask(self.mask):
            raise ValueError(f"mask {self.mask} is not a contiguous netmask")
        return _ROUTE_ENTRY.pack(self.dst.packed, self.mask.packed, self.nexthop.packed)


@dataclass(frozen=True, slots=True)
class SystemRoutes:
    """A ROUTE message (server -> client) carrying up to 255 entries."""

    routes: tuple[SystemRoute, ...]

    def encode(self) -> bytes:
        if len(self.routes) > MAX_ROUTES_PER_MESSAGE:
            raise ValueError(
                f"{len(self.routes)} routes do not fit in one message "
                f"(at most {MAX_ROUTES_PER_MESSAGE})"
            )
        header = _ROUTE_HEADER.pack(WsType.ROUTE, len(self.routes), 0)
        return header + b"".join(route.encode() for route in self.routes)


@dataclass(frozen=True, slots=True)
class General:
    """A GENERAL message with a subtype this code does not interpret."""

    subtype: int
    extra: int
    src: IPv4Address
    dst: IPv4Address
    data: bytes

    def encode(self) -> bytes:
        header = pack(
            _GENERAL_HEADER,
            WsType.GENERAL,
            self.subtype,
            self.extra,
            self.src.packed,
            self.dst.packed,
        )
        return header + self.data


@dataclass(frozen=True, slots=True)
class LanAddress:
    """GENERAL subtype 0: the LAN address of peer ``src``, for same-LAN shortcuts."""

    src: IPv4Address
    dst: IPv4Address
    lan_ip: IPv4Address
    lan_port: int

    def encode(self) -> bytes:
        return pack(
            _LAN_ADDRESS,
            WsType.GENERAL,
            GENERAL_SUBTYPE_LAN_ADDRESS,
            0,
            self.src.packed,
            self.dst.packed,
            self.lan_ip.packed,
            self.lan_port,
        )


@dataclass(frozen=True, slots=True)
class Hello:
    """A p2pvpn client says so after AUTH (client -> server): "send me NAMES"."""

    exit_node: bool = False

    def encode(self) -> bytes:
        flags = _FLAG_EXIT_NODE if self.exit_node else 0
        return _HELLO.pack(WsType.HELLO, HELLO_VERSION, flags, 0)


@dataclass(frozen=True, slots=True)
class NameEntry:
    """One member in NAMES; an empty ``name`` says the address has no name any more."""

    address: IPv4Address
    name: str
    exit_node: bool = False
    p2pvpn: bool = False

    def encode(self) -> bytes:
        name = _require_label(self.name, "NAMES entry name")
        flags = (_FLAG_EXIT_NODE if self.exit_node else 0) | (_FLAG_P2PVPN if self.p2pvpn else 0)
        return _NAME_ENTRY_HEADER.pack(self.address.packed, flags, len(name)) + name


@dataclass(frozen=True, slots=True)
class Names:
    """The server's name table (server -> p2pvpn clients); ``replace`` starts a full table."""

    replace: bool
    entries: tuple[NameEntry, ...]

    def encode(self) -> bytes:
        if len(self.entries) > MAX_NAMES_PER_MESSAGE:
            raise ValueError(
                f"{len(self.entries)} names do not fit in one message "
                f"(at most {MAX_NAMES_PER_MESSAGE}): use encode_names"
            )
        flags = _FLAG_REPLACE if self.replace else 0
        header = _NAMES_HEADER.pack(WsType.NAMES, flags, len(self.entries))
        return header + b"".join(entry.encode() for entry in self.entries)


def encode_names(entries: Sequence[NameEntry], replace: bool) -> list[bytes]:
    """NAMES frames of at most 256 entries; with ``replace`` the first one is the REPLACE.

    A full table of no entries is still one (empty) REPLACE frame; no entries
    without ``replace`` are no frame at all.
    """
    frames = []
    for start in range(0, len(entries), MAX_NAMES_PER_MESSAGE):
        chunk = tuple(entries[start : start + MAX_NAMES_PER_MESSAGE])
        frames.append(Names(replace and start == 0, chunk).encode())
    if not frames and replace:
        frames.append(Names(True, ()).encode())
    return frames


@dataclass(frozen=True, slots=True)
class NameAnnouncement:
    """GENERAL subtype 0x50: member ``src`` tells its name (peer -> peer); "" = leaving."""

    src: IPv4Address
    dst: IPv4Address
    name: str
    exit_node: bool = False
    reply_wanted: bool = False

    def encode(self) -> bytes:
        name = _require_label(self.name, "announced name")
        flags = (_FLAG_EXIT_NODE if self.exit_node else 0) | (
            _FLAG_REPLY_WANTED if self.reply_wanted else 0
        )
        header = _GENERAL_HEADER.pack(
            WsType.GENERAL, GENERAL_NAME, flags, self.src.packed, self.dst.packed
        )
        return header + name


@dataclass(frozen=True, slots=True)
class UnknownWsMessage:
    """A frame whose type byte is not in the table; receivers ignore these."""

    type: int
    payload: bytes

    def encode(self) -> bytes:
        return pack(TYPE_BYTE, self.type) + self.payload


WsMessage: TypeAlias = (
    Auth
    | Forward
    | ExptTun
    | Udp4Conn
    | Vmac
    | Discovery
    | SystemRoutes
    | General
    | LanAddress
    | Hello
    | Names
    | NameAnnouncement
    | UnknownWsMessage
)


def _decode_auth(frame: bytes) -> Auth:
    _, tun_ip, timestamp, digest = unpack(_AUTH, frame, "AUTH")
    return Auth(IPv4Address(tun_ip), timestamp, digest)


def _decode_forward(frame: bytes) -> Forward:
    if len(frame) < 1 + MIN_PACKET_SIZE:
        raise DecodeError(f"FORWARD needs at least {1 + MIN_PACKET_SIZE} bytes, got {len(frame)}")
    return Forward(bytes(frame[1:]))


def _decode_cidr(raw: bytes) -> IPv4Interface:
    text, _, _ = raw.partition(b"\0")
    try:
        return IPv4Interface(text.decode("ascii"))
    except ValueError as exc:  # also covers UnicodeDecodeError
        raise DecodeError(f"EXPTTUN cidr {text!r} is not an IPv4 address/prefix") from exc


def _decode_expttun(frame: bytes) -> ExptTun:
    _, timestamp, raw_cidr, digest = unpack(_EXPTTUN, frame, "EXPTTUN")
    return ExptTun(timestamp, _decode_cidr(raw_cidr), digest)


def _decode_udp4conn(frame: bytes) -> Udp4Conn:
    _, src, dst, public_ip, public_port = unpack(_UDP4CONN, frame, "UDP4CONN")
    return Udp4Conn(IPv4Address(src), IPv4Address(dst), IPv4Address(public_ip), public_port)


def _decode_vmac(frame: bytes) -> Vmac:
    _, raw_vmac, timestamp, digest = unpack(_VMAC, frame, "VMAC")
    try:
        vmac = raw_vmac.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"VMAC {raw_vmac!r} is not ASCII") from exc
    return Vmac(vmac, timestamp, digest)


def _decode_discovery(frame: bytes) -> Discovery:
    _, src, dst = unpack(_DISCOVERY, frame, "DISCOVERY")
    return Discovery(IPv4Address(src), IPv4Address(dst))


def _decode_route(frame: bytes) -> SystemRoutes:
    _, count, _reserved = unpack(_ROUTE_HEADER, frame, "ROUTE")
    needed = _ROUTE_HEADER.size + count * _ROUTE_ENTRY.size
    if len(frame) < needed:
        raise DecodeError(f"ROUTE with {count} entries needs {needed} bytes, got {len(frame)}")
    routes = []
    for offset in range(_ROUTE_HEADER.size, needed, _ROUTE_ENTRY.size):
        dst, mask, nexthop = _ROUTE_ENTRY.unpack_from(frame, offset)
        route = SystemRoute(IPv4Address(dst), IPv4Address(mask), IPv4Address(nexthop))
        # Rejected here so that route.network can never raise for a decoded route.
        if not _is_contiguous_mask(route.mask):
            raise DecodeError(f"ROUTE mask {route.mask} is not a contiguous netmask")
        routes.append(route)
    return SystemRoutes(tuple(routes))


def decode_general_header(frame: bytes) -> General:
    """Any GENERAL frame as a plain General, its data not interpreted (for relaying)."""
    _, subtype, extra, src, dst = unpack(_GENERAL_HEADER, frame, "GENERAL")
    if frame[0] != WsType.GENERAL:
        raise DecodeError(f"type {frame[0]} is not GENERAL")
    data = bytes(frame[_GENERAL_HEADER.size :])
    return General(subtype, extra, IPv4Address(src), IPv4Address(dst), data)


def _decode_general(frame: bytes) -> General | LanAddress | NameAnnouncement:
    general = decode_general_header(frame)
    if general.subtype == GENERAL_NAME:
        name = _decode_label(general.data, "announced name")
        exit_node = bool(general.extra & _FLAG_EXIT_NODE)
        reply_wanted = bool(general.extra & _FLAG_REPLY_WANTED)
        return NameAnnouncement(general.src, general.dst, name, exit_node, reply_wanted)
    if general.subtype != GENERAL_SUBTYPE_LAN_ADDRESS:
        return general
    *_, lan_ip, lan_port = unpack(_LAN_ADDRESS, frame, "GENERAL LAN address")
    return LanAddress(general.src, general.dst, IPv4Address(lan_ip), lan_port)


def _decode_hello(frame: bytes) -> Hello:
    # The version is not checked: a later one still asks for NAMES, and
    # carries whatever it adds after these four bytes.
    _, _version, flags, _reserved = unpack(_HELLO, frame, "HELLO")
    return Hello(exit_node=bool(flags & _FLAG_EXIT_NODE))


def _decode_names(frame: bytes) -> Names:
    _, flags, count = unpack(_NAMES_HEADER, frame, "NAMES")
    if count > MAX_NAMES_PER_MESSAGE:
        raise DecodeError(f"NAMES with {count} entries (at most {MAX_NAMES_PER_MESSAGE})")
    entries: list[NameEntry] = []
    offset = _NAMES_HEADER.size
    for _ in range(count):
        end = offset + _NAME_ENTRY_HEADER.size
        if len(frame) < end:
            raise DecodeError(f"NAMES entry {len(entries)} is cut off at byte {len(frame)}")
        address, entry_flags, length = _NAME_ENTRY_HEADER.unpack_from(frame, offset)
        if len(frame) < end + length:
            raise DecodeError(f"NAMES entry {len(entries)} name is cut off at byte {len(frame)}")
        name = _decode_label(bytes(frame[end : end + length]), "NAMES entry name")
        exit_node = bool(entry_flags & _FLAG_EXIT_NODE)
        p2pvpn = bool(entry_flags & _FLAG_P2PVPN)
        entries.append(NameEntry(IPv4Address(address), name, exit_node, p2pvpn))
        offset = end + length
    return Names(bool(flags & _FLAG_REPLACE), tuple(entries))


_DECODERS: dict[int, Callable[[bytes], WsMessage]] = {
    WsType.AUTH: _decode_auth,
    WsType.FORWARD: _decode_forward,
    WsType.EXPTTUN: _decode_expttun,
    WsType.UDP4CONN: _decode_udp4conn,
    WsType.VMAC: _decode_vmac,
    WsType.DISCOVERY: _decode_discovery,
    WsType.ROUTE: _decode_route,
    WsType.HELLO: _decode_hello,
    WsType.NAMES: _decode_names,
    WsType.GENERAL: _decode_general,
}


def decode_ws_message(frame: bytes) -> WsMessage:
    """Decode one binary WebSocket frame; raises DecodeError and nothing else."""
    if not frame:
        raise DecodeError("empty WebSocket frame")
    decoder = _DECODERS.get(frame[0])
    if decoder is None:
        return UnknownWsMessage(frame[0], bytes(frame[1:]))
    return decoder(frame)
