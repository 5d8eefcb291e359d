"""The DataPlane interface that the pure-Python and the compiled data planes share.

The data plane owns the TUN fd and the UDP socket. It moves IP packets between
them (sealing and opening AES-256-GCM datagrams) and hands everything it cannot
handle alone up to the control plane through a `DataPlaneEvents` object, in
batches, on the event loop thread.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from p2pvpn.wire.crypto import OVERHEAD
from p2pvpn.wire.ipv4 import MAX_TOTAL_LENGTH
from p2pvpn.wire.peer import PeerType

UdpAddress = tuple[str, int]

# The compiled data plane (p2pvpn._fastpath) holds its own copies of the
# constants below as C values and refuses to import when one differs.

# Upper bound on how many packets one read or write batch moves; matches the
# compiled data plane's recvmmsg/sendmmsg batch so both behave alike.
BATCH_SIZE = 64

# Largest datagram we accept on the UDP socket: a maximal IPv4 packet plus the
# FORWARD type byte and the GCM overhead.
MAX_DATAGRAM = MAX_TOTAL_LENGTH + 1 + OVERHEAD

# The first plaintext byte of a datagram that carries an IP packet; a plain
# int, as both planes compare it with every datagram's first byte.
FORWARD_TYPE = int(PeerType.FORWARD)

# Bounds each plane's cache of ciphers for control messages to peers that are
# not CONNECTED yet; a handful of peers is normal, so 256 is generous.
CONTROL_CIPHER_CACHE = 256

# Most addresses that get per-peer counters (more than a /18 network holds).
# Counters are keyed by the inner source address, which a peer that has the
# password can forge at will; past this bound new addresses are not counted,
# so such a peer cannot grow the tables without end.
MAX_PEER_COUNTERS = 16384

# How long a received IV is remembered (seconds). Every datagram carries a
# random 96-bit IV, and all datagrams to us are sealed under our one key, so
# an authenticated datagram whose IV was already seen is a replay. The record
# is kept in three buckets of half this length: an IV is remembered for
# between one and one and a half windows.
REPLAY_WINDOW_SECONDS = 2.0

# Most IVs one bucket of the replay record holds. A bucket lasts one second,
# and 10 Gbit/s of 1400-byte packets is about 893,000 datagrams a second.
# Past it the bucket is full and new IVs go unrecorded: a flood can shorten
# what the record covers, but never makes us drop fresh traffic.
REPLAY_BUCKET_LIMIT = 1 << 20


class DropReason(enum.StrEnum):
    """Why a packet or datagram was dropped; the keys of `DataPlaneStats.drops`."""

    TOO_SHORT = "too_short"
    AUTHENTICATION = "authentication"
    MALFORMED = "malformed"
    NOT_IPV4 = "not_ipv4"
    SEND_FAILED = "send_failed"
    TUN_WRITE_FAILED = "tun_write_failed"
    LOOP = "loop"
    QUEUE_FULL = "queue_full"
    # An authenticated datagram whose IV was seen within the replay window.
    REPLAY = "replay"
    # A FORWARD for another address while this client does not relay (route = 0).
    TRANSIT = "transit"
    # A relayed packet whose TTL ran out: a routing loop dies out here.
    TTL_EXPIRED = "ttl_expired"
    # An IPIP packet over UDP whose outer source is not the sdwan next hop of
    # a route covering its inner source.
    IPIP_SOURCE = "ipip_source"


@dataclass(slots=True)
class PeerCounters:
    """Traffic exchanged directly (UDP) with one peer."""

    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0


@dataclass(slots=True)
class DataPlaneStats:
    """A snapshot of the data plane's counters.

    Bytes are IP packet bytes (not datagram bytes), so direct and relayed
    figures compare. `relay_*` counts packets handed to / taken from the
    WebSocket path; `tun_*` counts what crossed the TUN device.
    """

    implementation: str
    tun_packets_in: int = 0
    tun_bytes_in: int = 0
    tun_packets_out: int = 0
    tun_bytes_out: int = 0
    relay_packets_out: int = 0
    relay_bytes_out: int = 0
    relay_packets_in: int = 0
    relay_bytes_in: int = 0
    peers: dict[IPv4Address, PeerCounters] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)


class DataPlaneEvents(Protocol):
    """What the data plane hands up to the control plane, always in batches.

    Called on the event loop thread. Implementations must not block.
    """

    def on_relay_packets(self, packets: list[bytes]) -> None:
        """IP packets read from TUN with no direct path: send them over the WebSocket."""

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        """Decrypted UDP messages that are not FORWARD (heartbeat, delay, route)."""

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        """Raw datagrams from the STUN server's address."""


def hand_up_udp_batch(
    events: DataPlaneEvents,
    stun: list[tuple[bytes, UdpAddress]],
    control: list[tuple[bytes, UdpAddress]],
    relay: list[bytes],
) -> None:
    """One UDP batch's upward events, in the order both planes keep (tests rely on it)."""
    if stun:
        events.on_stun_datagrams(stun)
    if control:
        events.on_control_datagrams(control)
    if relay:
        events.on_relay_packets(relay)


class DataPlane(Protocol):
    """The packet path between TUN and UDP; see ARCHITECTURE.md."""

    @property
    def implementation(self) -> str:
        """`"pure"` or `"fast"`."""

    @property
    def udp_offloads(self) -> tuple[str, ...]:
        """Kernel UDP offloads in use now (`"gso"`, `"gro"`); empty when none."""

    @property
    def tun_offloads(self) -> tuple[str, ...]:
        """TUN offloads in use (`"csum"`, `"tso4"`, `"uso4"`): the virtio-net header
        is on every TUN packet; empty for a plain TUN device."""

    def start(self) -> None:
        """Start moving packets (call on the event loop thread)."""

    def close(self) -> None:
        """Stop moving packets; idempotent. Does not close the fds it was given."""

    def set_peer(self, tun_ip: IPv4Address, address: UdpAddress, key: bytes) -> None:
        """Send packets for `tun_ip` directly to `address`, sealed with `key`."""

    def drop_peer(self, tun_ip: IPv4Address) -> None:
        """Stop sending directly to `tun_ip`; no packet goes to it after this returns."""

    def set_route(self, destination: IPv4Address, next_hop: IPv4Address) -> None:
        """Client relaying: send packets for `destination` through peer `next_hop`."""

    def drop_route(self, destination: IPv4Address) -> None:
        """Remove the client-relay route for `destination`."""

    def set_sysroutes(self, routes: Sequence[tuple[IPv4Network, IPv4Address]]) -> None:
        """Replace the IPIP table: packets to `network` are wrapped toward `nexthop`."""

    def set_forwarded_wrap(self, network: IPv4Network | None) -> None:
        """Exit node: a packet from TUN whose source lies outside `network` and whose
        destination is a member of it (not us) is IPIP-wrapped toward that member,
        outer source our own address; None: off.

        Such packets are replies the kernel forwarded back from the internet; wrapped,
        a relay's FORWARD check and Candy peers carry them unchanged, and the member
        unwraps them because its exit routes put their source behind us."""

    def set_stun_server(self, address: UdpAddress | None) -> None:
        """Datagrams from this address that look like a STUN binding response go up
        unopened; None while no request is outstanding (everything is opened)."""

    def send_control(self, address: UdpAddress, key: bytes, plaintext: bytes) -> None:
        """Seal one control message with `key` and send it to `address`."""

    def send_stun(self, address: UdpAddress, data: bytes) -> None:
        """Send one unencrypted STUN datagram from the data plane's UDP socket."""

    def write_tun(self, packet: bytes) -> None:
        """Deliver an IP packet that came over the WebSocket (IPIP is unwrapped)."""

    def stats(self) -> DataPlaneStats:
        """A snapshot of the counters."""
