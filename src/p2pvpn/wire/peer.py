"""Plaintexts of the encrypted UDP datagrams between clients (PROTOCOL 3.2), sans I/O.

Decoders accept input longer than the layout and raise only DecodeError.
Encoders raise ValueError for fields the layout cannot carry.
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address
from typing import TypeAlias

from p2pvpn.wire._layout import TYPE_BYTE, pack, unpack
from p2pvpn.wire.errors import DecodeError

__all__ = [
    "ROUTE_DELETED",
    "Delay",
    "Heartbeat",
    "PeerForward",
    "PeerMessage",
    "PeerType",
    "RouteAdvert",
    "UnknownPeerMessage",
    "decode_peer_message",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
ROUTE_DELETED = INT32_MAX
MIN_PACKET_SIZE = 20


class PeerType(IntEnum):
    HEARTBEAT = 0
    FORWARD = 1
    DELAY = 2
    ROUTE = 4


_HEARTBEAT = struct.Struct("!B4s4sHB")
_DELAY = struct.Struct("!B4s4sq")
_ROUTE_I32 = struct.Struct("!B4s4si")
# The protocol design document's 8-byte delay; no released client sends it,
# but accepting it costs nothing.
_ROUTE_I64 = struct.Struct("!B4s4sq")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Hole punching and keepalive.

    ``ip``/``port`` are informational only: the reference leaves them unset,
    so receivers use the datagram's source address instead.
    """

    tun_ip: IPv4Address
    ip: IPv4Address
    port: int
    ack: bool

    def encode(self) -> bytes:
        return pack(
            _HEARTBEAT,
            PeerType.HEARTBEAT,
            self.tun_ip.packed,
            self.ip.packed,
            self.port,
            1 if self.ack else 0,
        )


@dataclass(frozen=True, slots=True)
class PeerForward:
    """An IPv4 packet sent directly to (or relayed through) a peer."""

    packet: bytes

    def encode(self) -> bytes:
        if len(self.packet) < MIN_PACKET_SIZE:
            raise ValueError(f"an IPv4 packet has at least {MIN_PACKET_SIZE} bytes")
        return bytes((PeerType.FORWARD,)) + self.packet


@dataclass(frozen=True, slots=True)
class Delay:
    """Latency probe; ``dst`` echoes it back unchanged to ``src``."""

    src: IPv4Address
    dst: IPv4Address
    timestamp_ms: int

    def encode(self) -> bytes:
        return pack(_DELAY, PeerType.DELAY, self.src.packed, self.dst.packed, self.timestamp_ms)


@dataclass(frozen=True, slots=True)
class RouteAdvert:
    """Distance-vector advertisement for client relaying (PROTOCOL 5).

    A delay < 0 or > 1000 is a deletion; ROUTE_DELETED is the one sent.
    """

    dst: IPv4Address
    next: IPv4Address
    delay_ms: int

    def encode(self) -> bytes:
        # Released clients read an i32, so a larger delay would wrap into garbage.
        delay = max(INT32_MIN, min(INT32_MAX, self.delay_ms))
        return _ROUTE_I32.pack(PeerType.ROUTE, self.dst.packed, self.next.packed, delay)


@dataclass(frozen=True, slots=True)
class UnknownPeerMessage:
    """A plaintext whose type byte is not in the table; receivers ignore these."""

    type: int
    payload: bytes

    def encode(self) -> bytes:
        return pack(TYPE_BYTE, self.type) + self.payload


PeerMessage: TypeAlias = Heartbeat | PeerForward | Delay | RouteAdvert | UnknownPeerMessage


def _decode_heartbeat(plaintext: bytes) -> Heartbeat:
    _, tun_ip, ip, port, ack = unpack(_HEARTBEAT, plaintext, "HEARTBEAT")
    return Heartbeat(IPv4Address(tun_ip), IPv4Address(ip), port, bool(ack))


def _decode_forward(plaintext: bytes) -> PeerForward:
    if len(plaintext) < 1 + MIN_PACKET_SIZE:
        raise DecodeError(
            f"FORWARD needs at least {1 + MIN_PACKET_SIZE} bytes, got {len(plaintext)}"
        )
    return PeerForward(bytes(plaintext[1:]))


def _decode_delay(plaintext: bytes) -> Delay:
    _, src, dst, timestamp_ms = unpack(_DELAY, plaintext, "DELAY")
    return Delay(IPv4Address(src), IPv4Address(dst), timestamp_ms)


def _decode_route(plaintext: bytes) -> RouteAdvert:
    layout = _ROUTE_I64 if len(plaintext) >= _ROUTE_I64.size else _ROUTE_I32
    _, dst, next_hop, delay_ms = unpack(layout, plaintext, "ROUTE")
    return RouteAdvert(IPv4Address(dst), IPv4Address(next_hop), delay_ms)


_DECODERS: dict[int, Callable[[bytes], PeerMessage]] = {
    PeerType.HEARTBEAT: _decode_heartbeat,
    PeerType.FORWARD: _decode_forward,
    PeerType.DELAY: _decode_delay,
    PeerType.ROUTE: _decode_route,
}


def decode_peer_message(plaintext: bytes) -> PeerMessage:
    """Decode one decrypted UDP datagram; raises DecodeError and nothing else."""
    if not plaintext:
        raise DecodeError("empty peer message")
    decoder = _DECODERS.get(plaintext[0])
    if decoder is None:
        return UnknownPeerMessage(plaintext[0], bytes(plaintext[1:]))
    return decoder(plaintext)
