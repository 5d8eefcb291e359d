"""Pure-Python data plane: the reference the compiled one is tested against.

Runs on the event loop: readers on the TUN fd and the UDP socket drain up to
BATCH_SIZE packets per wake-up, and everything the control plane must see is
handed up in one batch per wake-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from p2pvpn.dataplane.base import (
    BATCH_SIZE,
    CONTROL_CIPHER_CACHE,
    FORWARD_TYPE,
    MAX_DATAGRAM,
    MAX_PEER_COUNTERS,
    REPLAY_WINDOW_SECONDS,
    DataPlaneEvents,
    DataPlaneStats,
    DropReason,
    PeerCounters,
    UdpAddress,
    hand_up_udp_batch,
)
from p2pvpn.dataplane.replay import ReplayWindow
from p2pvpn.wire.crypto import IV_SIZE, AuthenticationFailed, DatagramCipher
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import IPPROTO_IPIP, decapsulate_ipip, decrement_ttl, encapsulate_ipip
from p2pvpn.wire.stun import looks_like_binding_response

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _DirectPeer:
    address: UdpAddress
    cipher: DatagramCipher


class PureDataPlane:
    """The DataPlane interface in Python, on the running asyncio loop."""

    def __init__(
        self,
        tun_fd: int,
        udp_socket: socket.socket,
        tun_ip: IPv4Address,
        key: bytes,
        events: DataPlaneEvents,
        *,
        relaying: bool = False,
        replay_window: float = REPLAY_WINDOW_SECONDS,
    ) -> None:
        self._tun_fd = tun_fd
        self._udp = udp_socket
        self._own_ip = tun_ip.packed
        self._own_cipher = DatagramCipher(key)
        self._events = events
        self._peers: dict[bytes, _DirectPeer] = {}
        self._routes: dict[bytes, bytes] = {}
        self._sysroutes: list[tuple[int, int, bytes]] = []
        # (network, mask) of set_forwarded_wrap; None while off.
        self._forwarded_wrap: tuple[int, int] | None = None
        self._stun_server: UdpAddress | None = None
        self._control_ciphers: dict[bytes, DatagramCipher] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = DataPlaneStats(implementation="pure")
        self._peer_counters: dict[bytes, PeerCounters] = {}
        self._relaying = relaying
        self._replay = ReplayWindow(replay_window)

    @property
    def implementation(self) -> str:
        return "pure"

    @property
    def udp_offloads(self) -> tuple[str, ...]:
        return ()  # one datagram per system call

    @property
    def tun_offloads(self) -> tuple[str, ...]:
        return ()  # one plain IPv4 packet per TUN read and write

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._udp.setblocking(False)
        os.set_blocking(self._tun_fd, False)
        self._loop.add_reader(self._tun_fd, self._on_tun_readable)
        self._loop.add_reader(self._udp.fileno(), self._on_udp_readable)

    def close(self) -> None:
        if self._loop is None:
            return
        self._loop.remove_reader(self._tun_fd)
        self._loop.remove_reader(self._udp.fileno())
        self._loop = None

    # -- tables ---------------------------------------------------------

    def set_peer(self, tun_ip: IPv4Address, address: UdpAddress, key: bytes) -> None:
        self._peers[tun_ip.packed] = _DirectPeer(address, DatagramCipher(key))

    def drop_peer(self, tun_ip: IPv4Address) -> None:
        self._peers.pop(tun_ip.packed, None)

    def set_route(self, destination: IPv4Address, next_hop: IPv4Address) -> None:
        self._routes[destination.packed] = next_hop.packed

    def drop_route(self, destination: IPv4Address) -> None:
        self._routes.pop(destination.packed, None)

    def set_sysroutes(self, routes: Sequence[tuple[IPv4Network, IPv4Address]]) -> None:
        self._sysroutes = [
            (int(network.network_address), int(network.netmask), nexthop.packed)
            for network, nexthop in routes
        ]

    def set_forwarded_wrap(self, network: IPv4Network | None) -> None:
        self._forwarded_wrap = (
            None if network is None else (int(network.network_address), int(network.netmask))
        )

    def set_stun_server(self, address: UdpAddress | None) -> None:
        self._stun_server = address

    # -- sending ----------------------------------------------------------

    def send_control(self, address: UdpAddress, key: bytes, plaintext: bytes) -> None:
        cipher = self._control_ciphers.get(key)
        if cipher is None:
            if len(self._control_ciphers) >= CONTROL_CIPHER_CACHE:
                self._control_ciphers.clear()
            cipher = self._control_ciphers[key] = DatagramCipher(key)
        self._sendto(cipher.seal(plaintext), address)

    def send_stun(self, address: UdpAddress, data: bytes) -> None:
        self._sendto(data, address)

    def write_tun(self, packet: bytes) -> None:
        self._stats.relay_packets_in += 1
        self._stats.relay_bytes_in += len(packet)
        # From the server: IPIP is unwrapped whoever sent it (PROTOCOL 2.5).
        self._deliver(packet, from_peer=False)

    def stats(self) -> DataPlaneStats:
        return dataclasses.replace(
            self._stats,
            peers={
                IPv4Address(ip): dataclasses.replace(counters)
                for ip, counters in self._peer_counters.items()
            },
            drops=dict(self._stats.drops),
        )

    # -- packet path ------------------------------------------------------

    def _counters(self, tun_ip: bytes) -> PeerCounters:
        counters = self._peer_counters.get(tun_ip)
        if counters is None:
            if len(self._peer_counters) >= MAX_PEER_COUNTERS:
                return PeerCounters()  # counted nowhere (see MAX_PEER_COUNTERS)
            counters = self._peer_counters[tun_ip] = PeerCounters()
        return counters

    def _drop(self, reason: DropReason) -> None:
        self._stats.drops[reason] = self._stats.drops.get(reason, 0) + 1

    def _on_tun_readable(self) -> None:
        relay: list[bytes] = []
        for _ in range(BATCH_SIZE):
            try:
                packet = os.read(self._tun_fd, 65535)
            except BlockingIOError:
                break
            except OSError as error:
                logger.warning("reading the TUN device failed: %s", error)
                break
            if not packet:
                break
            self._stats.tun_packets_in += 1
            self._stats.tun_bytes_in += len(packet)
            self._route(packet, relay, came_from=None)
        if relay:
            self._events.on_relay_packets(relay)

    def _on_udp_readable(self) -> None:
        relay: list[bytes] = []
        control: list[tuple[bytes, UdpAddress]] = []
        stun: list[tuple[bytes, UdpAddress]] = []
        for _ in range(BATCH_SIZE):
            try:
                datagram, source = self._udp.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                # ICMP errors from earlier sends surface here; they are not fatal.
                logger.debug("UDP receive error: %s", error)
                continue
            if source == self._stun_server and looks_like_binding_response(datagram):
                stun.append((datagram, source))
                continue
            self._on_datagram(datagram, source, relay, control)
        hand_up_udp_batch(self._events, stun, control, relay)

    def _on_datagram(
        self,
        datagram: bytes,
        source: UdpAddress,
        relay: list[bytes],
        control: list[tuple[bytes, UdpAddress]],
    ) -> None:
        try:
            plaintext = self._own_cipher.open(datagram)
        except AuthenticationFailed:
            self._drop(DropReason.AUTHENTICATION)
            return
        except DecodeError:
            self._drop(DropReason.TOO_SHORT)
            return
        # Before anything of the plaintext is used; authenticated first, so
        # that junk cannot fill the record.
        if self._replay.seen(datagram[:IV_SIZE]):
            self._drop(DropReason.REPLAY)
            return
        if not plaintext:
            self._drop(DropReason.MALFORMED)
            return
        if plaintext[0] != FORWARD_TYPE:
            control.append((plaintext, source))
            return
        packet = plaintext[1:]
        if not _is_ipv4(packet):
            self._drop(DropReason.NOT_IPV4)
            return
        counters = self._counters(packet[12:16])
        counters.packets_in += 1
        counters.bytes_in += len(packet)
        if packet[16:20] == self._own_ip:
            self._deliver(packet, from_peer=True)
            return
        if not self._relaying:
            self._drop(DropReason.TRANSIT)
            return
        relayed = decrement_ttl(packet)
        if relayed is None:
            self._drop(DropReason.TTL_EXPIRED)
            return
        self._route(relayed, relay, came_from=source)

    def _route(self, packet: bytes, relay: list[bytes], came_from: UdpAddress | None) -> None:
        """Send one IP packet toward its destination (PROTOCOL 4, "Sending an IP packet")."""
        if not _is_ipv4(packet):
            self._drop(DropReason.NOT_IPV4)
            return
        destination = packet[16:20]
        if came_from is None:
            nexthop = self._wrap_nexthop(packet)
            if nexthop is not None:
                try:
                    packet = encapsulate_ipip(
                        packet, IPv4Address(self._own_ip), IPv4Address(nexthop)
                    )
                except ValueError:
                    # No room for the outer header in a maximal packet.
                    self._drop(DropReason.MALFORMED)
                    return
                destination = nexthop
        next_hop = self._routes.get(destination, destination)
        peer = self._peers.get(next_hop)
        if peer is None:
            relay.append(packet)
            self._stats.relay_packets_out += 1
            self._stats.relay_bytes_out += len(packet)
            return
        if peer.address == came_from:
            self._drop(DropReason.LOOP)
            return
        if self._sendto(peer.cipher.seal(b"\x01" + packet), peer.address):
            counters = self._counters(destination)
            counters.packets_out += 1
            counters.bytes_out += len(packet)

    def _wrap_nexthop(self, packet: bytes) -> bytes | None:
        """Where a packet from TUN is IPIP-wrapped to: a member, for a packet we
        forward as an exit node; else an sdwan route's next hop; None: not wrapped."""
        destination = packet[16:20]
        if self._forwarded_wrap is not None and destination != self._own_ip:
            network, mask = self._forwarded_wrap
            source = int.from_bytes(packet[12:16], "big")
            if int.from_bytes(destination, "big") & mask == network and source & mask != network:
                return destination
        if self._sysroutes:
            return self._sysroute_for(destination)
        return None

    def _sysroute_for(self, destination: bytes) -> bytes | None:
        value = int.from_bytes(destination, "big")
        for network, mask, nexthop in self._sysroutes:
            if value & mask == network:
                return nexthop
        return None

    def _deliver(self, packet: bytes, *, from_peer: bool) -> None:
        if len(packet) >= 20 and packet[9] == IPPROTO_IPIP:
            outer_source = packet[12:16]
            try:
                packet = decapsulate_ipip(packet)
            except DecodeError:
                self._drop(DropReason.MALFORMED)
                return
            if from_peer and not self._may_wrap(outer_source, packet):
                self._drop(DropReason.IPIP_SOURCE)
                return
        try:
            os.write(self._tun_fd, packet)
        except OSError:
            self._drop(DropReason.TUN_WRITE_FAILED)
            return
        self._stats.tun_packets_out += 1
        self._stats.tun_bytes_out += len(packet)

    def _may_wrap(self, outer_source: bytes, inner: bytes) -> bool:
        """Whether a peer may hand us `inner` wrapped in IPIP from `outer_source`.

        Its own packets (an sdwan client sending to its gateway), or packets
        from a network our sdwan routes say lies behind it (gateway to
        gateway); anything else would let a peer inject packets from any
        address into our TUN.
        """
        if len(inner) < 20:
            return False
        inner_source = inner[12:16]
        return inner_source == outer_source or self._sysroute_for(inner_source) == outer_source

    def _sendto(self, datagram: bytes, address: UdpAddress) -> bool:
        try:
            self._udp.sendto(datagram, address)
        except OSError:
            self._drop(DropReason.SEND_FAILED)
            return False
        return True


def _is_ipv4(packet: bytes) -> bool:
    return len(packet) >= 20 and packet[0] >> 4 == 4
