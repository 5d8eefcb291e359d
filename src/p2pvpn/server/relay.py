"""The signaling/relay server (PROTOCOL 2.4): a sans-I/O core and a WebSocket layer.

:class:`Relay` holds every piece of server state and is driven by
``handle_frame(session, frame, now)``; it never touches a socket or the clock,
so unit tests and the fuzzing harness drive it with fake sessions. The I/O
layer (:class:`RelayServer`) maps each WebSocket connection onto a session
whose ``send`` only queues, so one slow or hostile client can never stall
the event loop or another client.

Security rules (ARCHITECTURE.md) enforced here and not by the reference
server: signed login messages must be fresh and unique, every relayed
message must carry the sender's own tun ip as source, frames are capped.
"""

import abc
import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from p2pvpn.config import ServerConfig
from p2pvpn.logs import install_secret_filter
from p2pvpn.metrics import MetricsServer, serve_server_metrics
from p2pvpn.server.stun import StunResponder, start_stun_responder
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import is_broadcast_or_multicast
from p2pvpn.wire.ws import (
    BROADCAST,
    Auth,
    Discovery,
    ExptTun,
    General,
    LanAddress,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    UnknownWsMessage,
    Vmac,
    WsType,
    decode_ws_message,
)

__all__ = [
    "INTERNAL_ERROR",
    "MAX_FRAME_SIZE",
    "MAX_ROUTES_PER_MESSAGE",
    "REPLAY_WINDOW",
    "ListenError",
    "Relay",
    "RelayServer",
    "RelaySession",
    "SdwanRuleLike",
    "ServerRuntime",
    "listen_address",
    "run_server",
    "serve",
]

logger = logging.getLogger(__name__)

# A FORWARD carries at most a 65535-byte IPv4 packet plus its type byte; any
# larger frame cannot be a valid message and closes the sender.
CLOSE_TIMEOUT = 2.0
MAX_FRAME_SIZE = 65536
# Signed login messages further than this from the server clock are refused,
# and a hash seen within it is a replay (ARCHITECTURE: security).
REPLAY_WINDOW = 300.0
# PROTOCOL 2.6: the reference client reads at most 100 entries per message.
MAX_ROUTES_PER_MESSAGE = 100
# RFC 6455 1011: the server hit an unexpected condition (a bug in this code).
INTERNAL_ERROR = 1011
# WebSocket close code websockets sends when a message exceeds max_size.
MESSAGE_TOO_BIG = 1009

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
# A connection that has not logged in by then only holds resources.
DEFAULT_LOGIN_TIMEOUT = 30.0
# A rejected client is no longer read; if its answer to the close frame does not
# arrive within this (it may sit behind unread frames), the connection is dropped.
REJECTED_CLOSE_TIMEOUT = 2.0
# Frames one connection may have handled before its reader lets other tasks run.
READ_BATCH = 16
# At most one WARNING per reason in this interval for per-packet events.
WARNING_INTERVAL = 10.0

_SIGNED_TYPES = frozenset({WsType.AUTH, WsType.EXPTTUN, WsType.VMAC})
_ALLOWED_BEFORE_AUTH = _SIGNED_TYPES
_KNOWN_TYPES = frozenset(int(kind) for kind in WsType)
_IPV4_HEADER_SIZE = 20


class SdwanRuleLike(Protocol):
    """The shape of :class:`p2pvpn.config.SdwanRule` the relay needs."""

    @property
    def device(self) -> IPv4Network: ...

    @property
    def destination(self) -> IPv4Network: ...

    @property
    def nexthop(self) -> IPv4Address: ...


class RelaySession(abc.ABC):
    """One client connection as the relay sees it.

    Subclasses implement ``send`` (must not block: queue or drop) and
    ``close``. The attributes are owned by :class:`Relay`.
    """

    def __init__(self, remote: str) -> None:
        self.remote = remote  # "host:port", for logs only
        self.tun_ip: IPv4Address | None = None
        self.vmac: str | None = None
        self.authenticated = False
        # Set by the relay when it closes the session; later frames are ignored.
        self.closed = False
        # Set once on_disconnect ran, so a second call does not log twice.
        self.disconnected = False

    @abc.abstractmethod
    def send(self, frame: bytes) -> None:
        """Queue one binary frame for the client; never blocks, may drop."""

    @abc.abstractmethod
    def close(self, code: CloseCode | int, reason: str) -> None:
        """Start closing the connection with ``code`` and ``reason``."""

    def describe(self) -> str:
        who = str(self.tun_ip) if self.tun_ip is not None else "not logged in"
        return f"{self.remote} ({who})"


class _Throttle:
    """Lets one log line per key through per interval and counts the rest."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str, now: float) -> int | None:
        """The number of lines suppressed since the last one, or None to stay quiet."""
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self._interval:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class _ReplayCache:
    """Keys of signed messages accepted within the freshness window."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._expiry: dict[tuple[object, ...], float] = {}
        # (expiry, insertion number, key): the number breaks ties between equal
        # expiries, so keys are never compared with each other. They are not
        # always comparable: an EXPTTUN key holds the vmac, which may be None.
        self._heap: list[tuple[float, int, tuple[object, ...]]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._expiry)

    def prune(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            expiry, _, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]

    def seen(self, key: tuple[object, ...]) -> bool:
        return key in self._expiry

    def add(self, key: tuple[object, ...], timestamp: int) -> None:
        # A message stays acceptable until timestamp + window on the server
        # clock, so that is how long its key must be remembered.
        expiry = float(timestamp) + self._window
        self._expiry[key] = expiry
        heapq.heappush(self._heap, (expiry, next(self._sequence), key))


class _RejectError(Exception):
    """Raised inside a handler to close the sender; caught in handle_frame."""

    def __init__(self, code: CloseCode, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason  # sent to the client in the close frame
        self.detail = detail  # logged


class Relay:
    """All relay state: sessions by tun ip, DHCP leases, replay cache, counters."""

    def __init__(
        self,
        password: str,
        *,
        dhcp: IPv4Network | None = None,
        sdwan: Sequence[SdwanRuleLike] = (),
    ) -> None:
        self._password = password
        self._dhcp = dhcp
        self._sdwan = tuple(sdwan)
        # A client named as an sdwan next hop forwards the replies of the LAN
        # behind it, whose sources are in the rule's destination network.
        self._routed_sources: dict[IPv4Address, list[IPv4Network]] = {}
        for rule in self._sdwan:
            self._routed_sources.setdefault(rule.nexthop, []).append(rule.destination)
        self._sessions: dict[IPv4Address, RelaySession] = {}
        self._open: set[RelaySession] = set()
        self._leases: dict[str, IPv4Address] = {}  # vmac -> address
        self._lease_owner: dict[IPv4Address, str] = {}  # address -> vmac
        self._dhcp_cursor = 0  # index into the host addresses for "next free"
        self._replays = _ReplayCache(REPLAY_WINDOW)
        self._throttle = _Throttle(WARNING_INTERVAL)
        self._counters: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._rejections: Counter[str] = Counter()

    # -- public API ---------------------------------------------------------

    def on_connect(self, session: RelaySession) -> None:
        self._open.add(session)
        self._counters["connections_total"] += 1
        logger.info("connect from %s", session.remote)

    def on_disconnect(self, session: RelaySession, reason: str = "connection closed") -> None:
        """Forget ``session``; idempotent and never raises."""
        try:
            self._open.discard(session)
            self._unmap(session)
            if not session.disconnected:
                session.disconnected = True
                logger.info("disconnect %s: %s", session.describe(), reason)
        except Exception:
            logger.exception("internal error while forgetting %s", session.remote)

    def handle_frame(self, session: RelaySession, frame: bytes, now: float) -> None:
        """Process one binary frame from ``session``; ``now`` is Unix time in seconds.

        Never raises: a bad frame closes its sender, a bug closes only the
        session that triggered it.
        """
        if session.closed:
            self._drops["after_close"] += 1
            return
        self._counters["frames_received"] += 1
        self._counters["bytes_received"] += len(frame)
        try:
            self._dispatch(session, frame, now)
        except _RejectError as rejected:
            self.reject(session, rejected.code, rejected.reason, rejected.detail)
        except Exception:
            self._counters["internal_errors"] += 1
            logger.exception("internal error handling a frame from %s", session.remote)
            self._close_quietly(session, INTERNAL_ERROR, "internal error")

    def reject(self, session: RelaySession, code: CloseCode, reason: str, detail: str) -> None:
        """Close ``session`` for ``code``, logging ``detail`` with its remote address."""
        self._rejections[code.name] += 1
        logger.warning("rejected %s: %s", session.describe(), detail)
        self._close_quietly(session, code, reason)

    def record_rejection(self, session: RelaySession, label: str, detail: str) -> None:
        """Count and log a rejection the I/O layer performed itself (e.g. 1009)."""
        self._rejections[label] += 1
        logger.warning("rejected %s: %s", session.describe(), detail)

    def login_timed_out(self, session: RelaySession, timeout: float) -> None:
        if session.closed or session.authenticated:
            return
        self.reject(
            session,
            CloseCode.NOT_AUTHENTICATED,
            "no login",
            f"no login within {timeout:g} s",
        )

    def count_drop(self, reason: str) -> None:
        self._drops[reason] += 1

    def session_for(self, tun_ip: IPv4Address) -> RelaySession | None:
        return self._sessions.get(tun_ip)

    def lease_of(self, vmac: str) -> IPv4Address | None:
        return self._leases.get(vmac)

    def stats(self) -> dict[str, Any]:
        """Counters for status output and metrics; plain JSON-able values."""
        counters = self._counters
        return {
            "connections_total": counters["connections_total"],
            "connections_open": len(self._open),
            "sessions_authenticated": len(self._sessions),
            "logins": counters["logins"],
            "frames_received": counters["frames_received"],
            "bytes_received": counters["bytes_received"],
            "frames_relayed": counters["frames_relayed"],
            "bytes_relayed": counters["bytes_relayed"],
            "dhcp_leases": len(self._leases),
            "replay_cache_entries": len(self._replays),
            "internal_errors": counters["internal_errors"],
            "drops": dict(self._drops),
            "rejections": dict(self._rejections),
        }

    # -- dispatch -----------------------------------------------------------

    def _dispatch(self, session: RelaySession, frame: bytes, now: float) -> None:
        if len(frame) > MAX_FRAME_SIZE:
            raise _RejectError(
                CloseCode.PROTOCOL_VIOLATION,
                "frame too large",
                f"frame of {len(frame)} bytes (limit {MAX_FRAME_SIZE})",
            )
        if not frame:
            raise _RejectError(CloseCode.PROTOCOL_VIOLATION, "empty frame", "empty frame")
        kind = frame[0]
        if kind == WsType.FORWARD and session.authenticated:
            # Hot path: no decode into objects, and short packets are only dropped.
            self._forward(session, frame, now)
            return
        if not session.authenticated and kind in _KNOWN_TYPES and kind not in _ALLOWED_BEFORE_AUTH:
            raise _RejectError(
                CloseCode.NOT_AUTHENTICATED,
                "login first",
                f"{WsType(kind).name} before login",
            )
        try:
            message = decode_ws_message(frame)
        except DecodeError as exc:
            self._drops["malformed"] += 1
            raise _RejectError(
                CloseCode.PROTOCOL_VIOLATION, "malformed message", f"malformed frame: {exc}"
            ) from None
        self._handle_message(session, message, frame, now)

    def _handle_message(
        self, session: RelaySession, message: object, frame: bytes, now: float
    ) -> None:
        if isinstance(message, Auth):
            self._on_auth(session, message, now)
        elif isinstance(message, ExptTun):
            self._on_expttun(session, message, now)
        elif isinstance(message, Vmac):
            self._on_vmac(session, message, now)
        elif isinstance(message, Udp4Conn | Discovery | General | LanAddress):
            self._relay_signal(session, message, frame)
        elif isinstance(message, UnknownWsMessage):
            self._drops["unknown_type"] += 1  # PROTOCOL 2: unknown types are ignored
        else:
            # ROUTE goes server -> client only; a client sending it is ignored.
            self._drops["unexpected_type"] += 1

    # -- signed login messages ----------------------------------------------

    def _check_signed(
        self,
        name: str,
        valid: bool,
        timestamp: int,
        key: tuple[object, ...],
        now: float,
    ) -> None:
        """Hash, then freshness, then uniqueness; raises _RejectError on failure.

        Only messages with a valid hash enter the replay cache, so a client
        without the password cannot grow it.
        """
        if not valid:
            raise _RejectError(
                CloseCode.AUTHENTICATION_FAILED,
                "authentication failed",
                f"{name} with a wrong hash (wrong password?)",
            )
        skew = timestamp - now
        if abs(skew) > REPLAY_WINDOW:
            raise _RejectError(
                CloseCode.STALE_OR_REPLAYED,
                "stale timestamp",
                f"{name} timestamp is {skew:+.0f} s off the server clock",
            )
        self._replays.prune(now)
        if self._replays.seen(key):
            raise _RejectError(CloseCode.STALE_OR_REPLAYED, "replayed", f"replayed {name}")
        self._replays.add(key, timestamp)

    def _on_vmac(self, session: RelaySession, message: Vmac, now: float) -> None:
        valid = message.verify(self._password)
        key = (WsType.VMAC, message.hash)
        self._check_signed("VMAC", valid, message.timestamp, key, now)
        session.vmac = message.vmac
        logger.debug("vmac %r from %s", message.vmac, session.remote)

    def _on_auth(self, session: RelaySession, message: Auth, now: float) -> None:
        valid = message.verify(self._password)
        key = (WsType.AUTH, message.hash)
        self._check_signed("AUTH", valid, message.timestamp, key, now)
        tun_ip = message.tun_ip
        self._check_tun_ip(tun_ip)
        if session.authenticated and session.tun_ip == tun_ip:
            return  # a repeated login changes nothing
        self._unmap(session)
        older = self._sessions.get(tun_ip)
        if older is not None and older is not session:
            logger.warning(
                "kicked %s: %s logged in with the same address", older.describe(), session.remote
            )
            self._rejections[CloseCode.KICKED.name] += 1
            self._close_quietly(older, CloseCode.KICKED, "another client logged in")
        self._sessions[tun_ip] = session
        session.tun_ip = tun_ip
        session.authenticated = True
        self._counters["logins"] += 1
        if session.vmac is not None and self._is_pool_host(tun_ip):
            self._record_lease(session.vmac, tun_ip)
        logger.info("login %s from %s (vmac %s)", tun_ip, session.remote, session.vmac)
        self._send_routes(session, tun_ip)

    def _check_tun_ip(self, tun_ip: IPv4Address) -> None:
        """Addresses that would collide with broadcast routing are refused."""
        unusable = tun_ip.is_unspecified or tun_ip.is_loopback
        if unusable or is_broadcast_or_multicast(tun_ip, self._dhcp):
            raise _RejectError(
                CloseCode.ADDRESS_REFUSED, "address not usable", f"AUTH for {tun_ip} refused"
            )
        if self._dhcp is not None and tun_ip == self._dhcp.network_address:
            raise _RejectError(
                CloseCode.ADDRESS_REFUSED,
                "address not usable",
                f"AUTH for the network address {tun_ip} refused",
            )

    def _send_routes(self, session: RelaySession, tun_ip: IPv4Address) -> None:
        routes = [
            SystemRoute(rule.destination.network_address, rule.destination.netmask, rule.nexthop)
            for rule in self._sdwan
            if tun_ip in rule.device
        ]
        for start in range(0, len(routes), MAX_ROUTES_PER_MESSAGE):
            chunk = tuple(routes[start : start + MAX_ROUTES_PER_MESSAGE])
            session.send(SystemRoutes(chunk).encode())

    # -- DHCP ---------------------------------------------------------------

    def _on_expttun(self, session: RelaySession, message: ExptTun, now: float) -> None:
        if self._dhcp is None:
            raise _RejectError(
                CloseCode.ADDRESS_REFUSED,
                "no dhcp range configured",
                "address request, but no dhcp range is configured",
            )
        valid = message.verify(self._password)
        # The EXPTTUN hash covers only password and timestamp, so every client
        # asking in the same second sends the same hash: the vmac (itself
        # signed and replay-checked) tells their requests apart.
        key = (WsType.EXPTTUN, session.vmac, message.hash)
        self._check_signed("EXPTTUN", valid, message.timestamp, key, now)
        granted = self._allocate(session, message.cidr.ip)
        if granted is None:
            raise _RejectError(
                CloseCode.ADDRESS_REFUSED,
                "dhcp range exhausted",
                f"no free address left in {self._dhcp}",
            )
        if session.vmac is not None:
            self._record_lease(session.vmac, granted)
        cidr = IPv4Interface((granted, self._dhcp.prefixlen))
        session.send(ExptTun.create(self._password, cidr, int(now)).encode())
        logger.info("granted %s to %s (vmac %s)", cidr, session.remote, session.vmac)

    def _allocate(self, session: RelaySession, requested: IPv4Address) -> IPv4Address | None:
        """PROTOCOL 2.4 plus sticky leases: requested, then previous, then next free."""
        vmac = session.vmac
        if self._is_pool_host(requested) and self._available(requested, session, strict=True):
            return requested
        previous = self._leases.get(vmac) if vmac is not None else None
        if (
            previous is not None
            and self._is_pool_host(previous)
            and self._available(previous, session, strict=False)
        ):
            return previous
        return self._next_free(session)

    def _available(self, address: IPv4Address, session: RelaySession, *, strict: bool) -> bool:
        """Not held by another client; with ``strict`` not leased to another vmac either."""
        holder = self._sessions.get(address)
        # The same installation reconnecting (same vmac) may take its address over.
        same_client = holder is session or (
            holder is not None and session.vmac is not None and holder.vmac == session.vmac
        )
        if holder is not None and not same_client:
            return False
        owner = self._lease_owner.get(address)
        return not strict or owner is None or owner == session.vmac

    def _next_free(self, session: RelaySession) -> IPv4Address | None:
        """Round-robin from the last grant: unleased first, else reclaim a stale lease."""
        if self._dhcp is None:
            return None
        hosts = _HostRange(self._dhcp)
        count = len(hosts)
        fallback: int | None = None
        for step in range(count):
            index = (self._dhcp_cursor + step) % count
            address = hosts[index]
            if not self._available(address, session, strict=False):
                continue
            if self._available(address, session, strict=True):
                self._dhcp_cursor = (index + 1) % count
                return address
            if fallback is None:
                fallback = index
        if fallback is None:
            return None
        self._dhcp_cursor = (fallback + 1) % count
        return hosts[fallback]

    def _is_pool_host(self, address: IPv4Address) -> bool:
        return self._dhcp is not None and address in _HostRange(self._dhcp)

    def _record_lease(self, vmac: str, address: IPv4Address) -> None:
        """Keep leases one-to-one: a vmac holds one address, an address one vmac."""
        old_address = self._leases.get(vmac)
        if old_address is not None and self._lease_owner.get(old_address) == vmac:
            del self._lease_owner[old_address]
        old_owner = self._lease_owner.get(address)
        if old_owner is not None and old_owner != vmac:
            del self._leases[old_owner]
        self._leases[vmac] = address
        self._lease_owner[address] = vmac

    # -- relaying -------------------------------------------------------------

    def _forward(self, session: RelaySession, frame: bytes, now: float) -> None:
        if len(frame) < 1 + _IPV4_HEADER_SIZE:
            self._drops["short_forward"] += 1
            return
        if frame[1] >> 4 != 4:
            self._drops["not_ipv4"] += 1
            return
        source = IPv4Address(frame[13:17])
        destination = IPv4Address(frame[17:21])
        if source != session.tun_ip and not self._may_route(session, source):
            self._drops["spoofed_source"] += 1
            suppressed = self._throttle.allow("spoofed_source", now)
            if suppressed is not None:
                logger.warning(
                    "dropped FORWARD from %s with source %s (%d similar drops not logged)",
                    session.describe(),
                    source,
                    suppressed,
                )
            return
        target = self._sessions.get(destination)
        if target is not None:
            self._deliver(target, frame)
        elif is_broadcast_or_multicast(destination, self._dhcp):
            self._fan_out(session, frame)
        else:
            self._drops["unknown_destination"] += 1

    def _may_route(self, session: RelaySession, source: IPv4Address) -> bool:
        assert session.tun_ip is not None  # only called for authenticated sessions
        networks = self._routed_sources.get(session.tun_ip, ())
        return any(source in network for network in networks)

    def _relay_signal(
        self,
        session: RelaySession,
        message: Udp4Conn | Discovery | General | LanAddress,
        frame: bytes,
    ) -> None:
        """UDP4CONN, DISCOVERY, GENERAL: check the source, pass the frame on unchanged."""
        name = WsType(frame[0]).name
        source, destination = message.src, message.dst
        if source != session.tun_ip:
            # Unlike FORWARD there is no legitimate reason for another source:
            # these messages are generated by the client itself.
            raise _RejectError(
                CloseCode.PROTOCOL_VIOLATION,
                "wrong source address",
                f"{name} with source {source}",
            )
        # PROTOCOL 2.4: only DISCOVERY and GENERAL may go to everyone.
        if destination == BROADCAST and not isinstance(message, Udp4Conn):
            self._fan_out(session, frame)
            return
        target = self._sessions.get(destination)
        if target is None:
            self._drops["unknown_destination"] += 1
            return
        self._deliver(target, frame)

    def _deliver(self, target: RelaySession, frame: bytes) -> None:
        self._counters["frames_relayed"] += 1
        self._counters["bytes_relayed"] += len(frame)
        target.send(frame)

    def _fan_out(self, sender: RelaySession, frame: bytes) -> None:
        for target in list(self._sessions.values()):
            if target is not sender:
                self._deliver(target, frame)

    # -- session bookkeeping ------------------------------------------------

    def _unmap(self, session: RelaySession) -> None:
        """Drop the tun ip mapping only if it still points at ``session``."""
        tun_ip = session.tun_ip
        if tun_ip is not None and self._sessions.get(tun_ip) is session:
            del self._sessions[tun_ip]

    def _close_quietly(self, session: RelaySession, code: CloseCode | int, reason: str) -> None:
        session.closed = True
        self._unmap(session)
        session.authenticated = False
        try:
            session.close(code, reason)
        except Exception:
            logger.exception("internal error closing %s", session.remote)


class _HostRange:
    """The assignable host addresses of a network, without building a list."""

    def __init__(self, network: IPv4Network) -> None:
        first = int(network.network_address)
        last = int(network.broadcast_address)
        if network.prefixlen < 31:
            # Never the network or the broadcast address.
            first, last = first + 1, last - 1
        self._first = first
        self._count = last - first + 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> IPv4Address:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return IPv4Address(self._first + index)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address):
            return False
        return 0 <= int(address) - self._first < self._count


# -- WebSocket I/O layer ------------------------------------------------------


class _WsSession(RelaySession):
    """A WebSocket connection: send() queues, a writer task drains the queue."""

    def __init__(self, connection: ServerConnection, relay: Relay, queue_size: int) -> None:
        super().__init__(_format_remote(connection.remote_address))
        self._connection = connection
        self._relay = relay
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._close_task: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            # A client that does not read must not hold up anyone else.
            self._relay.count_drop("send_queue_full")

    def close(self, code: CloseCode | int, reason: str) -> None:
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._connection.close(int(code), reason)
            )

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the close started by close(); after ``timeout``, drop the connection.

        Called once the relay stopped reading: a client whose answer to the close
        sits behind frames nobody reads any more cannot complete the handshake.
        """
        if self._close_task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._close_task)
        except TimeoutError:
            self._connection.transport.abort()
        except Exception:  # the close task logs nothing; its failure ends the connection too
            self._connection.transport.abort()

    async def write_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self._queue.get()
                await self._connection.send(frame)


def _format_remote(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _describe_close(connection: ServerConnection) -> str:
    code = connection.close_code
    reason = connection.close_reason
    if code is None:
        return "connection lost"
    return f"close code {code}" + (f" ({reason})" if reason else "")


class RelayServer:
    """Serves a :class:`Relay` over WebSocket on ``host:port`` (port 0: any)."""

    def __init__(
        self,
        relay: Relay,
        host: str,
        port: int,
        *,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
    ) -> None:
        self.relay = relay
        self._host = host
        self._port = port
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._queue_size = queue_size
        self._login_timeout = login_timeout
        self._server: Server | None = None

    @property
    def requested_port(self) -> int:
        return self._port

    @property
    def port(self) -> int:
        """The bound TCP port (useful after binding port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the relay server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting; raises OSError when the address is unusable."""
        self._server = await ws_serve(
            self._handle,
            self._host,
            self._port,
            compression=None,
            max_size=MAX_FRAME_SIZE,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            # A client that cannot answer the closing handshake must not hold
            # up a shutdown or restart for websockets' default 10 s.
            close_timeout=CLOSE_TIMEOUT,
            server_header=None,
        )

    async def close(self) -> None:
        """Close every connection (1001 going away) and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> "RelayServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, connection: ServerConnection) -> None:
        session = _WsSession(connection, self.relay, self._queue_size)
        self.relay.on_connect(session)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(session.write_loop())
        timer = loop.call_later(
            self._login_timeout, self.relay.login_timed_out, session, self._login_timeout
        )
        try:
            await self._read_loop(connection, session)
        finally:
            timer.cancel()
            writer.cancel()
            self.relay.on_disconnect(session, _describe_close(connection))

    async def _read_loop(self, connection: ServerConnection, session: _WsSession) -> None:
        try:
            budget = READ_BATCH
            async for message in connection:
                # Candy's server treats text and binary frames alike.
                frame = message.encode() if isinstance(message, str) else message
                self.relay.handle_frame(session, frame, time.time())
                budget -= 1
                if budget == 0:
                    # recv() does not yield while frames are queued: without this, one
                    # client flooding the relay would hold the loop for whole batches.
                    budget = READ_BATCH
                    await asyncio.sleep(0)
                if session.closed:
                    # Rejected (or kicked): read nothing more. A client that keeps
                    # sending instead of answering the close would otherwise have
                    # every frame read and dispatched until the close times out;
                    # unread, they stop at the connection's bounded receive queue.
                    await session.wait_closed(REJECTED_CLOSE_TIMEOUT)
                    return
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == MESSAGE_TOO_BIG:
                self.relay.record_rejection(
                    session, "MESSAGE_TOO_BIG", f"frame larger than {MAX_FRAME_SIZE} bytes"
                )


# -- process entry points -----------------------------------------------------


class ListenError(Exception):
    """A listening socket could not be bound; the message names the address."""


def _os_error_text(exc: OSError) -> str:
    # asyncio wraps bind errors in a long message that repeats the address.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def listen_address(url: str) -> tuple[str, int]:
    """Host and port to listen on from ``ws://host:port/path`` (the path is ignored)."""
    parts = urlsplit(url)
    if parts.scheme == "wss":
        raise ValueError(
            f"cannot listen on {url}: the server speaks plain ws://, "
            "TLS (wss://) must be terminated by a reverse proxy in front of it"
        )
    if parts.scheme != "ws":
        raise ValueError(f"cannot listen on {url}: expected a ws://host:port URL")
    if not parts.hostname:
        raise ValueError(f"cannot listen on {url}: no host")
    port = parts.port if parts.port is not None else 80
    return parts.hostname, port


class ServerRuntime:
    """The whole server process: WebSocket relay, optional STUN responder and metrics."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        stun_host: str = "0.0.0.0",
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
    ) -> None:
        self.config = config
        self.host, port = listen_address(config.websocket)
        self.relay = Relay(config.password, dhcp=config.dhcp, sdwan=config.sdwan)
        self.ws = RelayServer(self.relay, self.host, port, login_timeout=login_timeout)
        self._stun_host = stun_host
        self._stun: tuple[asyncio.DatagramTransport, StunResponder] | None = None
        self._metrics: MetricsServer | None = None

    @property
    def ws_port(self) -> int:
        return self.ws.port

    @property
    def metrics(self) -> MetricsServer | None:
        """The Prometheus endpoint (``config.metrics``) once started, else None."""
        return self._metrics

    @property
    def stun(self) -> StunResponder | None:
        return self._stun[1] if self._stun is not None else None

    async def start(self) -> None:
        """Bind every socket; raises ListenError naming the address that failed."""
        try:
            await self.ws.start()
        except OSError as exc:
            address = f"ws://{self.host}:{self.ws.requested_port}"
            raise ListenError(f"cannot listen on {address}: {_os_error_text(exc)}") from exc
        if self.config.stun_port:
            try:
                self._stun = await start_stun_responder(self._stun_host, self.config.stun_port)
            except OSError as exc:
                await self.ws.close()
                address = f"udp {self._stun_host}:{self.config.stun_port}"
                raise ListenError(
                    f"cannot start the STUN responder on {address}: {_os_error_text(exc)}"
                ) from exc
        if self.config.metrics is not None:
            try:
                # Scrapes run in prometheus_client's thread; stats() is read on this loop.
                self._metrics = serve_server_metrics(self.config.metrics, self.stats)
            except OSError as exc:
                await self.close()
                host, port = self.config.metrics
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise ListenError(
                    f"cannot serve metrics on {address}: {_os_error_text(exc)}"
                ) from exc

    async def close(self) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await asyncio.to_thread(metrics.close)  # waits for the HTTP thread
        if self._stun is not None:
            self._stun[0].close()
        await self.ws.close()

    def stats(self) -> dict[str, Any]:
        stats = self.relay.stats()
        stun = self.stun
        if stun is not None:
            stats["stun"] = stun.stats()
        return stats


async def serve(
    config: ServerConfig,
    *,
    stop: asyncio.Event,
    ready: Callable[[ServerRuntime], object] | None = None,
) -> None:
    """Run the server until ``stop`` is set.

    ``ready`` is called with the running :class:`ServerRuntime` once both
    sockets are bound, so an in-process caller can read the bound port
    (``runtime.ws_port``) and the counters. Raises ListenError.
    """
    runtime = ServerRuntime(config)
    await runtime.start()
    logger.info("listening on ws://%s:%d", runtime.host, runtime.ws_port)
    if config.stun_port:
        logger.info("STUN responder on udp port %d", config.stun_port)
    else:
        logger.info("STUN responder disabled (stun_port = 0)")
    try:
        if ready is not None:
            ready(runtime)
        await stop.wait()
    finally:
        logger.info("shutting down")
        await runtime.close()


def run_server(config: ServerConfig, *, debug: bool) -> int:
    """Entry point of ``p2pvpn server``: 0 after SIGINT/SIGTERM, 1 if it cannot start."""
    try:
        listen_address(config.websocket)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    if not debug:
        # websockets logs every connection at INFO, duplicating our own lines.
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
    else:
        logger.debug(
            "dhcp=%s, %d sdwan rule(s), stun_port=%d",
            config.dhcp,
            len(config.sdwan),
            config.stun_port,
        )
    install_secret_filter(config.password)
    return asyncio.run(_main(config))


async def _main(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(config, stop=stop)
    except ListenError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0
