"""PeerManager: the peer table and everything around the per-peer state machines.

The state machines (client/peer.py) and the route table (client/routing.py)
decide; this module does what they ask: STUN requests, address exchange over
the server, heartbeats and DELAY probes through the data plane, and handing
CONNECTED peers and client-relay routes to the data plane.

Every table here is filled by what other hosts send (relayed packets, server
messages, control datagrams), so each has a cap with a counted drop beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, Protocol, TypeAlias
from urllib.parse import urlparse

from p2pvpn.client.exit_routing import EXIT_MARK, SO_MARK
from p2pvpn.client.peer import (
    PathDown,
    PathUp,
    Peer,
    PeerAction,
    PeerState,
    RequestStun,
    SendDelayProbe,
    SendHeartbeat,
    SendLanAddress,
    SendPathChallenge,
    SendPublicAddress,
    StateChanged,
)
from p2pvpn.client.routing import (
    Advertise,
    DropRoute,
    RouteAction,
    RouteRefused,
    RouteTable,
    SetRoute,
)
from p2pvpn.config import ClientConfig
from p2pvpn.dataplane.base import DataPlane, DataPlaneStats, UdpAddress
from p2pvpn.wire.crypto import peer_key
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.peer import Delay, Heartbeat, RouteAdvert, decode_peer_message
from p2pvpn.wire.stun import decode_binding_response, encode_binding_request
from p2pvpn.wire.ws import BROADCAST, Discovery, LanAddress, Udp4Conn

logger = logging.getLogger(__name__)

# How many STUN transactions we remember; answers to older ones are ignored.
STUN_OUTSTANDING = 8
STUN_RESOLVE_RETRY_SECONDS = 30.0
# The data plane takes datagrams from the STUN server as STUN only this long
# (seconds) after our last request: at other times they are decrypted like
# anything else, so a spoofed "STUN server" cannot feed us answers.
STUN_ANSWER_SECONDS = 5.0
# Caps of the tables other hosts can fill. A /8 VPN network has 16M addresses
# that relayed packets or a member's messages could name.
MAX_PEERS = 4096
MAX_KEYS = 4096
MAX_RELAY_COUNTERS = 4096


class SignalingSender(Protocol):
    """The part of SignalingSession the peer manager uses."""

    def send(self, message: Any) -> bool: ...


@dataclass(slots=True)
class _RelayCounters:
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0


# A handler of one decoded control datagram: (message, source address, now).
_ControlHandler: TypeAlias = Callable[[Any, UdpAddress, float], None]
# A performer of one PeerAction for a peer: (peer, action, now).
_ActionPerformer: TypeAlias = Callable[[Peer, Any, float], None]


class PeerManager:
    """Owns the peer table of one client (PROTOCOL 3, 4 and 5).

    Sans clock: every event carries ``now`` (seconds, monotonic), read once
    by the node where the event entered the process.
    """

    def __init__(
        self,
        config: ClientConfig,
        address: IPv4Interface,
        data_plane: DataPlane,
        signaling: SignalingSender,
        *,
        local_port: int,
    ) -> None:
        self._config = config
        self._own_ip = address.ip
        self._network = address.network
        self.drops: dict[str, int] = {}
        self._data_plane = data_plane
        self._signaling = signaling
        self._local_port = local_port
        self._peers: dict[IPv4Address, Peer] = {}
        self._keys: dict[IPv4Address, bytes] = {}
        self._relay_counters: dict[IPv4Address, _RelayCounters] = {}
        self._routes = RouteTable(self._own_ip, config.route)
        self._lan_enabled = True
        self._lan_address: UdpAddress | None = None
        self._stun_address: UdpAddress | None = None
        self._stun_transactions: list[bytes] = []
        # When the last STUN request went out while the data plane passes
        # STUN up; None while it does not.
        self._stun_requested_at: float | None = None
        # A fruitless search for a peer to evict happens at most once per tick.
        self._peer_table_full = False
        self._public_address: UdpAddress | None = None
        self._next_discovery = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.stun_failures = 0
        self._control_handlers: dict[type, _ControlHandler] = {
            Heartbeat: self._on_heartbeat,
            Delay: self._on_delay,
            RouteAdvert: self._on_route_advert,
        }
        # RequestStun is not here: _perform collects it (one request serves all peers).
        self._action_performers: dict[type, _ActionPerformer] = {
            SendHeartbeat: self._send_heartbeat,
            SendDelayProbe: self._send_delay_probe,
            SendPathChallenge: self._send_path_challenge,
            SendPublicAddress: self._send_public_address,
            SendLanAddress: self._send_lan_address,
            StateChanged: self._state_changed,
            PathUp: self._path_up,
            PathDown: self._path_down,
        }

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._resolve_stun_forever())
        self._lan_address = self._detect_lan_address()
        if self._lan_address is not None:
            logger.info("LAN address for direct connections: %s:%d", *self._lan_address)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def disable_lan(self) -> None:
        """sdwan routes can capture LAN addresses (PROTOCOL 2.6): stop using them."""
        if self._lan_enabled:
            logger.info("system routes present: LAN direct connections disabled")
        self._lan_enabled = False
        for peer in self._peers.values():
            peer.disable_lan()

    def on_server_lost(self) -> None:
        """Nothing to undo: peers keep their direct paths while the server is away."""

    def endpoint_addresses(self) -> set[IPv4Address]:
        """Peers' public addresses and current direct paths: sdwan routes must not capture them.

        Advertised LAN addresses are left out: sdwan routes turn LAN paths off
        (PROTOCOL 2.6), and a peer's LAN is just what a route to it covers.
        """
        addresses: set[IPv4Address] = set()
        for peer in self._peers.values():
            for endpoint in (peer.public_address, peer.current_address):
                if endpoint is not None:
                    with contextlib.suppress(ValueError):
                        addresses.add(IPv4Address(endpoint[0]))
        return addresses

    @property
    def stun_server(self) -> UdpAddress | None:
        """The STUN server's resolved address (None until resolved or without one)."""
        return self._stun_address

    # -- events from the node -------------------------------------------------

    def tick(self, now: float) -> None:
        self._peer_table_full = False
        requested_at = self._stun_requested_at
        if requested_at is not None and now - requested_at >= STUN_ANSWER_SECONDS:
            self._stop_stun()
        want_stun = False
        for peer in list(self._peers.values()):
            want_stun |= self._perform(peer, peer.tick(now), now)
        if want_stun:
            self._send_stun_request(now)
        if self._config.discovery and now >= self._next_discovery:
            self._next_discovery = now + self._config.discovery
            self._signaling.send(Discovery(self._own_ip, BROADCAST))

    def on_udp4conn(self, message: Udp4Conn, now: float) -> None:
        """A peer's public address, relayed by the server."""
        if not self._from_peer(message.src) or message.dst != self._own_ip:
            return
        peer = self._peer(message.src, now)
        if peer is not None:
            address = (str(message.public_ip), message.public_port)
            self._handle(peer, peer.on_public_address(address, now), now)

    def on_lan_address(self, message: LanAddress, now: float) -> None:
        """A peer's LAN address, relayed by the server."""
        if not self._from_peer(message.src) or message.dst != self._own_ip:
            return
        if not self._lan_enabled:
            return
        peer = self._peer(message.src, now)
        if peer is not None:
            address = (str(message.lan_ip), message.lan_port)
            self._handle(peer, peer.on_lan_address(address, now), now)

    def on_discovery(self, message: Discovery, now: float) -> None:
        """A peer announcing itself, to us or to everyone."""
        if not self._from_peer(message.src):
            return
        if message.dst == BROADCAST:
            self._signaling.send(Discovery(self._own_ip, message.src))
        peer = self._peer(message.src, now)
        if peer is not None:
            self._handle(peer, peer.on_hint(now), now)

    def on_relay_in(self, packet: bytes, now: float) -> None:
        """A packet relayed by the server: count it and take it as a hint (PROTOCOL 2.5)."""
        if len(packet) < 20:
            return
        source = IPv4Address(packet[12:16])
        if not self._is_peer_address(source):
            # e.g. a LAN host behind an sdwan gateway: traffic, not a peer.
            return
        counters = self._relay_counter(source)
        if counters is not None:
            counters.packets_in += 1
            counters.bytes_in += len(packet)
        peer = self._peer(source, now)
        if peer is not None:
            self._handle(peer, peer.on_hint(now), now)

    def on_relay_out(self, packets: Iterable[bytes]) -> None:
        for packet in packets:
            if len(packet) < 20:
                continue
            counters = self._relay_counter(IPv4Address(packet[16:20]))
            if counters is not None:
                counters.packets_out += 1
                counters.bytes_out += len(packet)

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]], now: float) -> None:
        for plaintext, source in datagrams:
            try:
                message = decode_peer_message(plaintext)
            except DecodeError:
                logger.debug("malformed control datagram from %s:%d", *source)
                self._count_drop("control_malformed")
                continue
            handler = self._control_handlers.get(type(message))
            if handler is None:
                self._count_drop("unknown_type")
            else:
                handler(message, source, now)

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]], now: float) -> None:
        for data, _source in datagrams:
            try:
                response = decode_binding_response(data)
            except DecodeError:
                self._count_drop("stun_malformed")
                continue
            if response.transaction_id not in self._stun_transactions:
                self._count_drop("stun_unexpected")
                continue
            self._stop_stun()
            ip, port = response.address
            self._public_address = (str(ip), port)
            logger.debug("STUN: our public address is %s:%d", *self._public_address)
            for peer in list(self._peers.values()):
                if peer.state is PeerState.PREPARING:
                    self._handle(peer, peer.on_own_public_address(now), now)

    # -- peers and tables -------------------------------------------------------

    def _is_peer_address(self, tun_ip: IPv4Address) -> bool:
        """A unicast address of our virtual network other than our own."""
        network = self._network
        return (
            tun_ip != self._own_ip
            and tun_ip in network
            and (
                network.prefixlen >= 31
                or tun_ip not in (network.network_address, network.broadcast_address)
            )
        )

    def _from_peer(self, src: IPv4Address) -> bool:
        """Whether a relayed address exchange may name ``src`` as a peer; counts a drop if not.

        A Candy server relays these without checking src: never start a
        connection with ourselves, a broadcast or an address outside the VPN.
        """
        if self._is_peer_address(src):
            return True
        self._count_drop("bad_peer_address")
        return False

    def _count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _peer(self, tun_ip: IPv4Address, now: float) -> Peer | None:
        """The peer for ``tun_ip``, created if need be; None when the table is full."""
        peer = self._peers.get(tun_ip)
        if peer is not None:
            return peer
        if len(self._peers) >= MAX_PEERS and not self._evict_idle_peer():
            self._count_drop("peer_table_full")
            return None
        peer = self._peers[tun_ip] = Peer(
            tun_ip,
            now,
            stun_enabled=self._config.stun is not None,
            lan_enabled=self._lan_enabled,
            delay_probes=self._config.route > 0,
        )
        logger.info("peer %s seen", tun_ip)
        return peer

    def _evict_idle_peer(self) -> bool:
        """Forget the oldest peer in INIT or FAILED, which has no path and no timers.

        Without this, a flood of made-up source addresses would fill the table
        for good and lock out members that join later.
        """
        if self._peer_table_full:
            return False
        for tun_ip, peer in self._peers.items():
            if peer.state in (PeerState.INIT, PeerState.FAILED):
                del self._peers[tun_ip]
                self._count_drop("peer_evicted")
                logger.debug("peer table full: forgetting idle peer %s", tun_ip)
                return True
        self._peer_table_full = True
        return False

    def _relay_counter(self, tun_ip: IPv4Address) -> _RelayCounters | None:
        counters = self._relay_counters.get(tun_ip)
        if counters is None:
            if len(self._relay_counters) >= MAX_RELAY_COUNTERS:
                self._count_drop("relay_counters_full")
                return None
            counters = self._relay_counters[tun_ip] = _RelayCounters()
        return counters

    def _key(self, tun_ip: IPv4Address) -> bytes:
        key = self._keys.get(tun_ip)
        if key is None:
            if len(self._keys) >= MAX_KEYS:
                # A cache: the oldest key goes, and is recomputed if needed again.
                del self._keys[next(iter(self._keys))]
                self._count_drop("key_cache_evicted")
            key = self._keys[tun_ip] = peer_key(self._config.password, tun_ip)
        return key

    # -- actions ----------------------------------------------------------------

    def _handle(self, peer: Peer, actions: list[PeerAction], now: float) -> None:
        """Perform what one event of ``peer`` asked for, STUN request included."""
        if self._perform(peer, actions, now):
            self._send_stun_request(now)

    def _perform(self, peer: Peer, actions: list[PeerAction], now: float) -> bool:
        """Perform ``actions`` except RequestStun; True if one of them was a RequestStun."""
        want_stun = False
        for action in actions:
            if isinstance(action, RequestStun):
                want_stun = True
            else:
                self._action_performers[type(action)](peer, action, now)
        return want_stun

    def _send_heartbeat(self, peer: Peer, action: SendHeartbeat, now: float) -> None:
        ip, port = action.address
        heartbeat = Heartbeat(self._own_ip, IPv4Address(ip), port, action.ack)
        self._send_control(peer, action.address, heartbeat.encode())

    def _send_delay_probe(self, peer: Peer, action: SendDelayProbe, now: float) -> None:
        probe = Delay(self._own_ip, peer.tun_ip, int(now * 1000))
        self._send_control(peer, action.address, probe.encode())

    def _send_path_challenge(self, peer: Peer, action: SendPathChallenge, now: float) -> None:
        probe = Delay(self._own_ip, peer.tun_ip, action.timestamp_ms)
        self._send_control(peer, action.address, probe.encode())

    def _send_control(self, peer: Peer, address: UdpAddress, plaintext: bytes) -> None:
        self._data_plane.send_control(address, self._key(peer.tun_ip), plaintext)

    def _state_changed(self, peer: Peer, action: StateChanged, now: float) -> None:
        if action.old is PeerState.PREPARING and action.new is PeerState.FAILED:
            # PREPARING only fails when STUN never answered within 10 s.
            self.stun_failures += self._config.stun is not None
        logger.info(
            "peer %s: %s -> %s (%s)", peer.tun_ip, action.old.name, action.new.name, action.reason
        )

    def _path_up(self, peer: Peer, action: PathUp, now: float) -> None:
        logger.info("peer %s: direct path %s:%d", peer.tun_ip, *action.address)
        self._data_plane.set_peer(peer.tun_ip, action.address, self._key(peer.tun_ip))

    def _path_down(self, peer: Peer, action: PathDown, now: float) -> None:
        self._data_plane.drop_peer(peer.tun_ip)
        self._apply_routes(self._routes.on_peer_lost(peer.tun_ip))

    def _send_public_address(self, peer: Peer, action: SendPublicAddress, now: float) -> None:
        if self._public_address is None:
            return
        ip, port = self._public_address
        self._signaling.send(Udp4Conn(self._own_ip, peer.tun_ip, IPv4Address(ip), port))

    def _send_lan_address(self, peer: Peer, action: SendLanAddress, now: float) -> None:
        if self._lan_address is None or not self._lan_enabled:
            return
        ip, port = self._lan_address
        self._signaling.send(LanAddress(self._own_ip, peer.tun_ip, IPv4Address(ip), port))

    def _send_stun_request(self, now: float) -> None:
        if self._stun_address is None:
            self.stun_failures += 1
            return
        if self._stun_requested_at is None:
            self._data_plane.set_stun_server(self._stun_address)
        self._stun_requested_at = now
        transaction_id = os.urandom(12)
        self._stun_transactions = [
            *self._stun_transactions[-(STUN_OUTSTANDING - 1) :],
            transaction_id,
        ]
        self._data_plane.send_stun(self._stun_address, encode_binding_request(transaction_id))

    def _stop_stun(self) -> None:
        """No answer is awaited any more: STUN-looking datagrams are opened again."""
        self._stun_transactions.clear()
        if self._stun_requested_at is not None:
            self._stun_requested_at = None
            self._data_plane.set_stun_server(None)

    def _on_heartbeat(self, heartbeat: Heartbeat, source: UdpAddress, now: float) -> None:
        peer = self._peers.get(heartbeat.tun_ip)
        if peer is None:
            self._count_drop("heartbeat_unknown_peer")
        else:
            self._handle(peer, peer.on_heartbeat(source, heartbeat.ack, now), now)

    def _on_delay(self, probe: Delay, source: UdpAddress, now: float) -> None:
        if probe.dst == self._own_ip and probe.src != self._own_ip:
            self._echo_delay(probe, source)
        elif probe.src == self._own_ip:
            self._delay_answered(probe, source, now)

    def _echo_delay(self, probe: Delay, source: UdpAddress) -> None:
        if not self._is_peer_address(probe.src):
            self._count_drop("delay_bad_source")
            return
        # Echo it back unchanged, sealed for the prober (PROTOCOL 3.2), to
        # wherever it came from: that is how a peer challenges a new path.
        key = self._key(probe.src)
        self._data_plane.send_control(source, key, probe.encode())
        peer = self._peers.get(probe.src)
        if peer is None or peer.state is not PeerState.CONNECTED:
            return
        if peer.current_address != source:
            # Possibly a replay from a third host: one echo is no amplification,
            # the whole route table behind it would be.
            return
        # The prober accepts our adverts once it has measured us, which the
        # echo is about to let it do: send the table right behind the echo.
        for advert in self._routes.advertisements():
            self._data_plane.send_control(source, key, advert.encode())

    def _delay_answered(self, probe: Delay, source: UdpAddress, now: float) -> None:
        peer = self._peers.get(probe.dst)
        if peer is None:
            return
        # An echo of a path challenge moves the path first, so that it then
        # counts as a measurement on the new path.
        self._handle(peer, peer.on_path_echo(source, probe.timestamp_ms, now), now)
        if peer.state is not PeerState.CONNECTED:
            return  # a late answer must not resurrect an rtt
        if peer.current_address != source:
            # A third host may replay an old echo: its rtt would be huge and
            # take down every route through the peer.
            self._count_drop("delay_echo_source")
            return
        rtt_ms = max(0.0, now * 1000 - probe.timestamp_ms)
        first_measurement = peer.rtt_ms is None
        self._handle(peer, peer.on_rtt(rtt_ms, now), now)
        self._apply_routes(self._routes.on_direct_rtt(probe.dst, round(rtt_ms)))
        if first_measurement:
            # The peer accepts our adverts only once it has measured us too,
            # so the full table goes out after the first RTT, not at PathUp.
            key = self._key(probe.dst)
            for advert in self._routes.advertisements():
                self._data_plane.send_control(source, key, advert.encode())

    def _on_route_advert(self, advert: RouteAdvert, source: UdpAddress, now: float) -> None:
        if not self._routes.enabled or advert.dst == self._own_ip:
            # Peers advertise their route to us as to everyone: not a drop.
            return
        # The sender must be the next hop it names, seen on that peer's path;
        # otherwise anyone could steer our traffic or replay a deletion.
        sender = self._peers.get(advert.next)
        if (
            sender is None
            or sender.state is not PeerState.CONNECTED
            or sender.current_address != source
        ):
            self._count_drop("route_advert_sender")
            return
        if not self._is_peer_address(advert.dst):
            self._count_drop("route_advert_destination")
            return
        self._apply_routes(self._routes.on_advert(advert))

    def _apply_routes(self, actions: list[RouteAction]) -> None:
        for action in actions:
            if isinstance(action, SetRoute):
                logger.info("route %s via %s", action.destination, action.next_hop)
                self._data_plane.set_route(action.destination, action.next_hop)
            elif isinstance(action, DropRoute):
                logger.info("route %s removed", action.destination)
                self._data_plane.drop_route(action.destination)
            elif isinstance(action, Advertise):
                self._advertise(action.advert)
            elif isinstance(action, RouteRefused):
                self._count_drop("route_table_full")

    def _advertise(self, advert: RouteAdvert) -> None:
        plaintext = advert.encode()
        for tun_ip, peer in self._peers.items():
            if peer.state is PeerState.CONNECTED and peer.current_address is not None:
                self._data_plane.send_control(peer.current_address, self._key(tun_ip), plaintext)

    # -- addresses ----------------------------------------------------------------

    async def _resolve_stun_forever(self) -> None:
        stun = self._config.stun
        if stun is None:
            logger.info("no STUN server configured: direct connections are disabled")
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(
                    stun.host, stun.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
            except OSError as error:
                logger.warning("cannot resolve STUN server %s: %s", stun.host, error)
                await asyncio.sleep(STUN_RESOLVE_RETRY_SECONDS)
                continue
            ip, port = infos[0][4][:2]
            # The data plane hears of it only while a request is outstanding.
            self._stun_address = (str(ip), int(port))
            logger.info("STUN server %s:%d", *self._stun_address)
            return

    def _detect_lan_address(self) -> UdpAddress | None:
        if self._config.localhost is not None:
            return (str(self._config.localhost), self._local_port)
        # The first server whose name resolves and is routed answers it: with several
        # servers the first one may be the one that is down (or unknown to DNS) now.
        for url in self._config.websockets:
            host = urlparse(url).hostname
            if not host:
                continue
            # connect() on a UDP socket sends nothing; it only asks the kernel
            # which source address it would use to reach the server.
            with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
                try:
                    if self._config.exit:
                        # Marked like the UDP socket: else the exit node's route answers
                        # and the LAN address would be the VPN one.
                        probe.setsockopt(socket.SOL_SOCKET, SO_MARK, EXIT_MARK)
                    probe.connect((host, 9))
                except OSError:
                    continue
                return (str(probe.getsockname()[0]), self._local_port)
        return None

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status -------------------------------------------------------------------

    def snapshot(self, stats: DataPlaneStats | None, now: float) -> list[dict[str, Any]]:
        rows = []
        # Peers reached only through another client never show up as relayed
        # packets or state machines, so routes and counters name them too.
        known = set(self._peers) | set(self._relay_counters)
        known |= {route.destination for route in self._routes.routes()}
        if stats is not None:
            known |= set(stats.peers)
        known.discard(self._own_ip)
        for tun_ip in sorted(known):
            peer = self._peers.get(tun_ip)
            relay = self._relay_counters.get(tun_ip, _RelayCounters())
            direct = stats.peers.get(tun_ip) if stats is not None else None
            rows.append(
                {
                    "tun_ip": str(tun_ip),
                    "state": peer.state.name if peer else PeerState.INIT.name,
                    "path": self._path(tun_ip, peer),
                    "rtt_ms": round(peer.rtt_ms, 2) if peer and peer.rtt_ms is not None else None,
                    "packets_out": relay.packets_out + (direct.packets_out if direct else 0),
                    "bytes_out": relay.bytes_out + (direct.bytes_out if direct else 0),
                    "packets_in": relay.packets_in + (direct.packets_in if direct else 0),
                    "bytes_in": relay.bytes_in + (direct.bytes_in if direct else 0),
                    "relay_bytes_out": relay.bytes_out,
                    "relay_bytes_in": relay.bytes_in,
                    "state_seconds": round(now - peer.state_since, 1) if peer else None,
                    "retry_seconds": peer.retry if peer else None,
                }
            )
        return rows

    def _path(self, tun_ip: IPv4Address, peer: Peer | None) -> str:
        route = self._routes.lookup(tun_ip)
        if route is not None and route.next_hop != tun_ip:
            return f"via {route.next_hop}"
        if peer is not None and peer.state is PeerState.CONNECTED and peer.current_address:
            ip, port = peer.current_address
            kind = "lan" if peer.on_lan_path else "direct"
            return f"{kind} {ip}:{port}"
        return "relay server"

    def route_snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "destination": str(route.destination),
                "next_hop": str(route.next_hop),
                "delay_ms": route.delay_ms,
            }
            for route in self._routes.routes()
        ]
