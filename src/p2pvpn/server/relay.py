"""The signaling/relay server's sans-I/O core (PROTOCOL 2.4).

:class:`Relay` holds every piece of server state and is driven by
``handle_frame(session, frame, now)``, which returns the :class:`Send` and
:class:`Close` actions the frame causes. It never touches a socket, the event
loop or the clock, so unit tests and the fuzzing harness drive it with plain
sessions; :mod:`p2pvpn.server.ws` performs the actions over WebSocket.

Security rules (ARCHITECTURE.md) enforced here and not by the reference
server: signed login messages must be fresh and unique, every relayed
message must carry the sender's own tun ip as source, frames are capped.
The resource caps of :class:`~p2pvpn.server.limits.ServerLimits` that need
no socket are kept here too: one login message of each kind per connection,
the replay cache's size, a token bucket and a size cap on broadcasts, and
the dynamic addresses per source address.

Member names (issue 16): ``on_ping`` reads the host name in a client's ping
payload; the table of names (:mod:`p2pvpn.server.names`) goes as NAMES to the
sessions that sent HELLO, whole after their HELLO and as changes after that.

With a :class:`~p2pvpn.server.cluster_state.ClusterView` (a relay cluster on
NATS) the relay also returns :class:`Publish`, :class:`Claim`,
:class:`Release` and :class:`RecordLease` for :mod:`p2pvpn.server.cluster` to
perform, reads the view to route frames and grant addresses, and takes the
other servers' frames and claims through :meth:`Relay.deliver_from_cluster`
and :meth:`Relay.kick`. Without one, none of that happens.
"""

import hashlib
import heapq
import itertools
import json
import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from p2pvpn.server.cluster_state import ClusterView, OwnerRecord, SdwanRuleLike
from p2pvpn.server.limits import DEFAULT_LIMITS, LogThrottle, ServerLimits, TokenBucket
from p2pvpn.server.names import NAME_CHANGE_BURST, NAME_CHANGE_RATE, NameBook, NamedMember
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import is_broadcast_or_multicast
from p2pvpn.wire.names import decode_ping_payload
from p2pvpn.wire.ws import (
    BROADCAST,
    GENERAL_NAME,
    Auth,
    Discovery,
    ExptTun,
    General,
    Hello,
    LanAddress,
    NameAnnouncement,
    NameEntry,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    UnknownWsMessage,
    Vmac,
    WsMessage,
    WsType,
    decode_general_header,
    decode_ws_message,
    encode_names,
)

__all__ = [
    "INTERNAL_ERROR",
    "MAX_FRAME_SIZE",
    "MAX_ROUTES_PER_MESSAGE",
    "REPLAY_WINDOW",
    "Action",
    "Claim",
    "Close",
    "Publish",
    "RecordLease",
    "Relay",
    "RelaySession",
    "Release",
    "SdwanRuleLike",
    "Send",
]

logger = logging.getLogger(__name__)

# A FORWARD carries at most a 65535-byte IPv4 packet plus its type byte; any
# larger frame cannot be a valid message and closes the sender.
MAX_FRAME_SIZE = 65536
# Signed login messages further than this from the server clock are refused,
# and a hash seen within it is a replay (ARCHITECTURE: security).
REPLAY_WINDOW = 300.0
# PROTOCOL 2.6: the reference client reads at most 100 entries per message.
MAX_ROUTES_PER_MESSAGE = 100
# RFC 6455 1011: the server hit an unexpected condition (a bug in this code).
INTERNAL_ERROR = 1011
# RFC 6455 1008: a generic policy violation; a client that does not read its
# frames is closed with it, and may come back.
POLICY_VIOLATION = 1008
# At most one WARNING per reason in this interval for per-packet events.
WARNING_INTERVAL = 10.0

# The signed login messages; every other known type needs a logged-in sender.
_ALLOWED_BEFORE_AUTH = frozenset({WsType.AUTH, WsType.EXPTTUN, WsType.VMAC})
# p2pvpn's own types: a Candy server ignores them, so before login they are
# only dropped, never a reason to close.
_EXTENSION_TYPES = frozenset({int(WsType.HELLO), int(WsType.NAMES)})
_KNOWN_TYPES = frozenset(int(kind) for kind in WsType) - _EXTENSION_TYPES
_RELAYED_SIGNALS = (Udp4Conn, Discovery, General, LanAddress, NameAnnouncement)
_LOGIN_TYPES = frozenset({int(WsType.AUTH), int(WsType.EXPTTUN), int(WsType.VMAC)})
_IPV4_HEADER_SIZE = 20


class RelaySession:
    """One client connection as the relay sees it; the attributes are owned by :class:`Relay`.

    The I/O layer subclasses it to attach its connection; the relay only names
    sessions in the actions it returns.
    """

    def __init__(self, remote: str) -> None:
        self.remote = remote  # "host:port", for logs only
        self.host = _host_of(remote)  # the source address, for the per-address caps
        self.tun_ip: IPv4Address | None = None
        self.vmac: str | None = None
        self.authenticated = False
        # Set by the relay when it closes the session; later frames are ignored.
        self.closed = False
        # Set once on_disconnect ran, so a second call does not log twice.
        self.disconnected = False
        # Type bytes of the login messages seen: each is allowed once per connection.
        self.login_messages: set[int] = set()
        # Made by the relay at the first broadcast of this session.
        self.broadcast_bucket: TokenBucket | None = None
        # Frames from this session the relay dropped: the I/O layer slows the
        # reading of a session whose frames are mostly junk (junk_rate).
        self.dropped_frames = 0
        self.junk_bucket: TokenBucket | None = None  # made by the I/O layer at the first drop
        # Tells two logins of one address apart across the cluster (OwnerRecord.session).
        self.session_id = secrets.token_hex(8)
        self.since: float | None = None  # login time, Unix seconds
        # For `p2pvpn server status`: frames from this session passed on (to
        # local sessions or published), and frames sent to it.
        self.frames_relayed = 0
        self.bytes_relayed = 0
        self.frames_delivered = 0
        self.bytes_delivered = 0
        self.tls = False  # set by the I/O layer
        # What the member's ping payload and HELLO say (issue 16): its host name
        # (a clean label), its version, whether it is a p2pvpn client that wants
        # NAMES (sent HELLO), whether it offers itself as an exit node.
        self.hostname: str | None = None
        self.client_version: str | None = None
        self.extensions = False
        self.exit_node = False
        self.name_bucket: TokenBucket | None = None  # made at the first name change

    def describe(self) -> str:
        who = str(self.tun_ip) if self.tun_ip is not None else "not logged in"
        return f"{self.remote} ({who})"


# Not frozen: a frozen dataclass costs twice as much to build, once per relayed frame.
@dataclass(slots=True)
class Send:
    """Queue ``frame`` for ``session`` (never blocking: the I/O layer may drop it)."""

    session: RelaySession
    frame: bytes


@dataclass(slots=True)
class Close:
    """Start closing ``session`` with WebSocket close ``code`` and ``reason``."""

    session: RelaySession
    code: int
    reason: str


# Not frozen either: one per frame for an address held by another server.
@dataclass(slots=True)
class Publish:
    """Publish ``frame`` to the cluster: for ``address``'s holder, or to all (None)."""

    address: IPv4Address | None
    frame: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """``session`` logged in with ``address`` here: put ``record`` as its owner, keep it fresh."""

    session: RelaySession
    address: IPv4Address
    record: OwnerRecord


@dataclass(frozen=True, slots=True)
class Release:
    """``session`` ended: delete ``address``'s owner record if it still names the session."""

    session: RelaySession
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class RecordLease:
    """Put the cluster-wide DHCP lease of ``vmac``."""

    vmac: str
    address: IPv4Address


# The cluster actions never appear without a cluster; an I/O layer without
# one only needs to perform Send and Close.
Action = Send | Close | Publish | Claim | Release | RecordLease


def _decode_relayable(frame: bytes) -> WsMessage:
    """decode_ws_message, but a name announcement whose name does not decode is a General.

    The relay passes GENERAL frames on unchanged, as a Candy server does: what
    one member tells another is for the receiver to judge, and a later version
    (or Candy) may say something else with the subtype.
    """
    try:
        return decode_ws_message(frame)
    except DecodeError:
        if frame[:1] == bytes((WsType.GENERAL,)) and frame[1:2] == bytes((GENERAL_NAME,)):
            return decode_general_header(frame)
        raise


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
        limits: ServerLimits = DEFAULT_LIMITS,
        cluster: ClusterView | None = None,
    ) -> None:
        self._password = password
        # Other servers of the network; None: this relay is alone, and no
        # cluster action is ever returned.
        self._cluster = cluster
        self._limits = limits
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
        # Which source address each leased vmac asked from, and the reverse
        # (both bounded by the pool: one entry per lease).
        self._lease_host: dict[str, str] = {}
        self._host_leases: dict[str, set[str]] = {}
        self._replays = _ReplayCache(REPLAY_WINDOW)
        self._throttle = LogThrottle(WARNING_INTERVAL)
        self._counters: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._rejections: Counter[str] = Counter()
        self._caps: Counter[str] = Counter()  # how often each resource cap bit
        self._names = NameBook()  # the member names last sent to p2pvpn sessions
        # What the current event asks of the I/O layer, handed out when it ends.
        self._actions: list[Action] = []

    # -- public API ---------------------------------------------------------

    @property
    def cluster(self) -> ClusterView | None:
        return self._cluster

    def on_connect(self, session: RelaySession) -> None:
        self._open.add(session)
        self._counters["connections_total"] += 1
        logger.info("connect from %s", session.remote)

    def on_disconnect(
        self, session: RelaySession, reason: str = "connection closed"
    ) -> list[Action]:
        """Forget ``session``; idempotent and never raises.

        With a cluster, a session that logged in yields the Release of its
        address, even when it was closed or kicked before: the I/O layer deletes
        the owner record only if it still names this session.
        """
        actions: list[Action] = []
        try:
            self._open.discard(session)
            self._unmap(session)
            # Recomputing the table is a pass over all sessions: only when it can change.
            if session.tun_ip is not None and self._names.name_of(session.tun_ip) is not None:
                self._publish_names()
                actions.extend(self._take_actions())
            if not session.disconnected:
                session.disconnected = True
                logger.info("disconnect %s: %s", session.describe(), reason)
                tun_ip = session.tun_ip
                if self._cluster is not None and session.since is not None and tun_ip is not None:
                    actions.append(Release(session, tun_ip))
        except Exception:
            self._actions.clear()
            logger.exception("internal error while forgetting %s", session.remote)
        return actions

    def on_ping(self, session: RelaySession, payload: bytes, now: float) -> list[Action]:
        """A WebSocket ping from ``session`` with ``payload``: the member's name, maybe.

        A Candy-style payload (``candy::<os>::<version>::<hostname>``) names the
        member; a logged-in member's new name goes to the p2pvpn sessions as
        NAMES, within the name_change_rate cap. Before login the name is only
        kept. Never raises.
        """
        try:
            self._on_ping(session, payload, now)
        except Exception:
            self._counters["internal_errors"] += 1
            logger.exception("internal error handling a ping from %s", session.remote)
            self._actions.clear()
        return self._take_actions()

    def handle_frame(self, session: RelaySession, frame: bytes, now: float) -> list[Action]:
        """Process one binary frame from ``session``; ``now`` is Unix time in seconds.

        Returns what to send and whom to close, in order. Never raises: a bad
        frame closes its sender, a bug closes only the session that triggered it.
        """
        if session.closed:
            self._drops["after_close"] += 1
            return []
        self._counters["frames_received"] += 1
        self._counters["bytes_received"] += len(frame)
        try:
            self._dispatch(session, frame, now)
        except _RejectError as rejected:
            self._reject(session, rejected.code, rejected.reason, rejected.detail)
        except Exception:
            self._counters["internal_errors"] += 1
            logger.exception("internal error handling a frame from %s", session.remote)
            self._close(session, INTERNAL_ERROR, "internal error")
        return self._take_actions()

    def record_rejection(self, session: RelaySession, label: str, detail: str) -> None:
        """Count and log a rejection the I/O layer performed itself (e.g. 1009)."""
        self._rejections[label] += 1
        logger.warning("rejected %s: %s", session.describe(), detail)

    def login_timed_out(self, session: RelaySession, timeout: float, now: float) -> list[Action]:
        """The login deadline of ``session`` passed: close it unless it logged in."""
        if session.closed or session.authenticated:
            return []
        # Idle connections come in floods: the log line is throttled.
        self._rejections[CloseCode.NOT_AUTHENTICATED.name] += 1
        self.cap_hit("login_timeout", now, "no login within %g s from %s", timeout, session.remote)
        self._close(session, CloseCode.NOT_AUTHENTICATED, "no login")
        return self._take_actions()

    def _drop(self, session: RelaySession, reason: str) -> None:
        """A frame from ``session`` goes nowhere: counted by reason and against its sender."""
        self._drops[reason] += 1
        session.dropped_frames += 1

    def count_drop(self, reason: str) -> None:
        self._drops[reason] += 1

    def cap_hit(self, cap: str, now: float, message: str, *args: object) -> None:
        """Count that ``cap`` bit and log ``message`` at most once per WARNING_INTERVAL.

        The I/O layer reports its own caps here too, so all of them show in stats().
        """
        self._caps[cap] += 1
        suppressed = self._throttle.allow(cap, now)
        if suppressed is not None:
            logger.warning(
                "limit %s: " + message + " (%d similar not logged)", cap, *args, suppressed
            )

    def send_queue_stalled(self, session: RelaySession, now: float, seconds: float) -> list[Action]:
        """``session``'s send queue stayed full for ``seconds``: close it (it may reconnect)."""
        if session.closed:
            return []
        self.cap_hit("send_queue_stalled", now, "closed %s", session.describe())
        self._rejections["SEND_QUEUE_STALLED"] += 1
        self._close(session, POLICY_VIOLATION, f"not reading: send queue full for {seconds:g} s")
        return self._take_actions()

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
            "frames_published": counters["frames_published"],
            "frames_from_cluster": counters["frames_from_cluster"],
            "dhcp_leases": len(self._leases),
            "named_sessions": len(self._names),
            "replay_cache_entries": len(self._replays),
            "internal_errors": counters["internal_errors"],
            "drops": dict(self._drops),
            "rejections": dict(self._rejections),
            "limits": dict(self._caps),
        }

    def session_rows(self, now: float) -> list[dict[str, object]]:
        """One row per logged-in session, by address, for `p2pvpn server status`.

        ``since`` is the login time (Unix seconds), not an age: ``now`` is
        taken for symmetry with the other calls and not used.
        """
        return [
            {
                "address": str(address),
                "vmac": session.vmac,
                "remote": session.remote,
                "since": session.since,
                "frames_relayed": session.frames_relayed,
                "bytes_relayed": session.bytes_relayed,
                "frames_delivered": session.frames_delivered,
                "bytes_delivered": session.bytes_delivered,
                "tls": session.tls,
                "name": self._names.name_of(address),
                "p2pvpn": session.extensions,
                "exit_node": session.exit_node,
                "version": session.client_version,
            }
            for address, session in sorted(self._sessions.items())
        ]

    # -- cluster --------------------------------------------------------------

    def deliver_from_cluster(self, frame: bytes, now: float, *, broadcast: bool) -> list[Action]:
        """A frame another server published: Send it to the local session(s) it is for.

        Never raises; a frame that is not a relayable message is dropped and
        counted (``cluster_malformed``), one for an address not held here
        any more too (``cluster_unknown_destination``).
        """
        self._counters["frames_from_cluster"] += 1
        try:
            parsed = _parse_cluster_frame(frame, broadcast=broadcast, dhcp=self._dhcp)
            if parsed is None:
                self._drops["cluster_malformed"] += 1
                return []
            source, destination = parsed
            if broadcast:
                for target in list(self._sessions.values()):
                    # The sender's address held here too (a login moving between
                    # servers): its own broadcast never comes back to it.
                    if target.tun_ip != source:
                        self._deliver(target, frame)
            else:
                holder = self._sessions.get(destination)
                if holder is None:
                    self._drops["cluster_unknown_destination"] += 1
                else:
                    self._deliver(holder, frame)
        except Exception:
            self._counters["internal_errors"] += 1
            logger.exception("internal error handling a frame from the cluster")
            self._actions.clear()
        return self._take_actions()

    def kick(self, address: IPv4Address, record: OwnerRecord, now: float) -> list[Action]:
        """Another server holds ``address`` now: close our session of it, if it is older.

        No Release follows from here: the owner record is the other server's now.
        A record of ours, of the same session, or older than our login (a late
        refresh from before our claim) kicks nobody. Comparing login times
        across servers assumes their clocks agree to well within the time a
        client takes to log in again (NTP does).
        """
        session = self._sessions.get(address)
        if session is None or self._cluster is None or record.server == self._cluster.server_id:
            return []
        if record.session == session.session_id:
            return []
        if session.since is not None and record.since < session.since:
            return []
        logger.warning(
            "kicked %s: a client logged in with the same address on server %s",
            session.describe(),
            record.server,
        )
        self._rejections[CloseCode.KICKED.name] += 1
        self._close(session, CloseCode.KICKED, "another client logged in")
        return self._take_actions()

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
        if not session.authenticated and kind in _EXTENSION_TYPES:
            # A p2pvpn client sends HELLO after AUTH; one before it is a mistake, not an attack.
            self._drop(session, "hello_before_login" if kind == WsType.HELLO else "unexpected_type")
            return
        if not session.authenticated and kind in _KNOWN_TYPES and kind not in _ALLOWED_BEFORE_AUTH:
            raise _RejectError(
                CloseCode.NOT_AUTHENTICATED,
                "login first",
                f"{WsType(kind).name} before login",
            )
        try:
            message = _decode_relayable(frame)
        except DecodeError as exc:
            self._drops["malformed"] += 1
            raise _RejectError(
                CloseCode.PROTOCOL_VIOLATION, "malformed message", f"malformed frame: {exc}"
            ) from None
        self._handle_message(session, message, frame, now)

    def _handle_message(
        self, session: RelaySession, message: object, frame: bytes, now: float
    ) -> None:
        if frame[0] in _LOGIN_TYPES and not isinstance(message, UnknownWsMessage):
            self._once_per_connection(session, frame[0], now)
        if isinstance(message, Auth):
            self._on_auth(session, message, now)
        elif isinstance(message, ExptTun):
            self._on_expttun(session, message, now)
        elif isinstance(message, Vmac):
            self._on_vmac(session, message, now)
        elif isinstance(message, _RELAYED_SIGNALS):
            self._relay_signal(session, message, frame, now)
        elif isinstance(message, Hello):
            self._on_hello(session, message, now)
        elif isinstance(message, UnknownWsMessage):
            self._drop(session, "unknown_type")  # PROTOCOL 2: unknown types are ignored
        else:
            # ROUTE and NAMES go server -> client only; a client sending them is ignored.
            self._drop(session, "unexpected_type")

    # -- signed login messages ----------------------------------------------

    def _once_per_connection(self, session: RelaySession, kind: int, now: float) -> None:
        """Clients send one VMAC, at most one EXPTTUN and one AUTH per connection.

        A second one could only make the server verify hashes and fill the
        replay cache for nothing.
        """
        name = WsType(kind).name
        if kind in session.login_messages:
            self._caps["repeated_login_message"] += 1  # _reject logs it
            raise _RejectError(
                CloseCode.PROTOCOL_VIOLATION,
                f"repeated {name}",
                f"a second {name} on one connection",
            )
        session.login_messages.add(kind)

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
        self._check_hash_and_freshness(name, valid, timestamp, now)
        self._replays.prune(now)
        if self._replays.seen(key):
            raise _RejectError(CloseCode.STALE_OR_REPLAYED, "replayed", f"replayed {name}")
        if len(self._replays) >= self._limits.max_replay_entries:
            # Evicting the oldest key instead would make its message acceptable
            # again while still fresh: a replay. Refusing costs a retry only; the
            # cache empties as timestamps leave the window.
            self._caps["replay_cache_full"] += 1
            raise _RejectError(
                CloseCode.TRY_AGAIN_LATER,
                "server busy, try again later",
                f"{name} refused: replay cache full",
            )
        self._replays.add(key, timestamp)

    @staticmethod
    def _check_hash_and_freshness(name: str, valid: bool, timestamp: int, now: float) -> None:
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

    @staticmethod
    def _replay_key(session: RelaySession, message: Auth | ExptTun | Vmac) -> tuple[object, ...]:
        if isinstance(message, Auth):
            return (WsType.AUTH, message.hash)
        if isinstance(message, ExptTun):
            # The EXPTTUN hash covers only password and timestamp, so every client
            # asking in the same second sends the same hash: the vmac (itself
            # signed and replay-checked) tells their requests apart.
            return (WsType.EXPTTUN, session.vmac, message.hash)
        return (WsType.VMAC, message.hash)

    def login_replay_key(self, session: RelaySession, frame: bytes, now: float) -> str | None:
        """The cluster-wide replay key of a signed login frame, or None.

        None for anything the normal path refuses anyway (not a login message,
        malformed, a wrong hash, a stale timestamp, a repeat on this
        connection): only frames that could log in are worth a claim on the
        cluster. Changes no state.
        """
        if session.closed or not frame or len(frame) > MAX_FRAME_SIZE:
            return None
        kind = frame[0]
        if kind not in _LOGIN_TYPES or kind in session.login_messages:
            return None
        try:
            message = decode_ws_message(frame)
        except DecodeError:
            return None
        if not isinstance(message, Auth | ExptTun | Vmac):
            return None
        valid = message.verify(self._password)
        try:
            self._check_hash_and_freshness(WsType(kind).name, valid, message.timestamp, now)
        except _RejectError:
            return None
        return _replay_digest(self._replay_key(session, message))

    def refuse_replay(self, session: RelaySession, kind_name: str, now: float) -> list[Action]:
        """Another server saw this login message already: close ``session`` as a replay."""
        if session.closed:
            return []
        self._reject(
            session,
            CloseCode.STALE_OR_REPLAYED,
            "replayed",
            f"replayed {kind_name} (seen by another server)",
        )
        return self._take_actions()

    def _on_vmac(self, session: RelaySession, message: Vmac, now: float) -> None:
        valid = message.verify(self._password)
        key = self._replay_key(session, message)
        self._check_signed("VMAC", valid, message.timestamp, key, now)
        session.vmac = message.vmac
        logger.debug("vmac %r from %s", message.vmac, session.remote)

    def _on_auth(self, session: RelaySession, message: Auth, now: float) -> None:
        valid = message.verify(self._password)
        key = self._replay_key(session, message)
        self._check_signed("AUTH", valid, message.timestamp, key, now)
        tun_ip = message.tun_ip
        self._check_tun_ip(tun_ip)
        older = self._sessions.get(tun_ip)
        if older is not None and older is not session:
            logger.warning(
                "kicked %s: %s logged in with the same address", older.describe(), session.remote
            )
            self._rejections[CloseCode.KICKED.name] += 1
            self._close(older, CloseCode.KICKED, "another client logged in")
        self._sessions[tun_ip] = session
        session.tun_ip = tun_ip
        session.authenticated = True
        session.since = now
        self._counters["logins"] += 1
        if self._cluster is not None:
            record = OwnerRecord(self._cluster.server_id, session.session_id, session.vmac, now)
            self._actions.append(Claim(session, tun_ip, record))
        if session.vmac is not None and self._is_pool_host(tun_ip):
            self._record_lease(session.vmac, tun_ip, session.host)
        logger.info("login %s from %s (vmac %s)", tun_ip, session.remote, session.vmac)
        self._send_routes(session, tun_ip)
        # A name from a ping before the login, or a kicked session's name gone.
        if session.hostname or self._names.name_of(tun_ip) is not None:
            self._publish_names()

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
            self._actions.append(Send(session, SystemRoutes(chunk).encode()))

    # -- DHCP ---------------------------------------------------------------

    def _on_expttun(self, session: RelaySession, message: ExptTun, now: float) -> None:
        if self._dhcp is None:
            raise _RejectError(
                CloseCode.ADDRESS_REFUSED,
                "no dhcp range configured",
                "address request, but no dhcp range is configured",
            )
        valid = message.verify(self._password)
        key = self._replay_key(session, message)
        self._check_signed("EXPTTUN", valid, message.timestamp, key, now)
        self._check_leases_of_host(session)
        granted = self._allocate(session, message.cidr.ip)
        if granted is None:
            # Retryable: addresses come free as clients leave.
            self._caps["dhcp_exhausted"] += 1
            raise _RejectError(
                CloseCode.TRY_AGAIN_LATER,
                "dhcp range exhausted, try again later",
                f"no free address left in {self._dhcp}",
            )
        if session.vmac is not None:
            self._record_lease(session.vmac, granted, session.host)
        cidr = IPv4Interface((granted, self._dhcp.prefixlen))
        grant = ExptTun.create(self._password, cidr, int(now))
        self._actions.append(Send(session, grant.encode()))
        logger.info("granted %s to %s (vmac %s)", cidr, session.remote, session.vmac)

    def _allocate(self, session: RelaySession, requested: IPv4Address) -> IPv4Address | None:
        """PROTOCOL 2.4 plus sticky leases: requested, then previous, then next free."""
        vmac = session.vmac
        if self._is_pool_host(requested) and self._available(requested, session, strict=True):
            return requested
        previous = self._lease_of_vmac(vmac) if vmac is not None else None
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
        cluster = self._cluster
        if holder is None and cluster is not None:
            remote = cluster.remote_owner(address)
            if remote is not None and (session.vmac is None or remote.vmac != session.vmac):
                return False
        if not strict:
            return True
        owner = self._lease_owner.get(address)
        if owner is None and cluster is not None:
            owner = cluster.lease_owner(address)
        return owner is None or owner == session.vmac

    def _lease_of_vmac(self, vmac: str) -> IPv4Address | None:
        """The sticky address of ``vmac``: ours, else the cluster's."""
        address = self._leases.get(vmac)
        if address is None and self._cluster is not None:
            address = self._cluster.lease_of(vmac)
        return address

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

    def _check_leases_of_host(self, session: RelaySession) -> None:
        """A new vmac from a source address with max_leases_per_ip leases is refused.

        One machine making up vmacs would otherwise take the whole pool. A
        lease of that address whose client is gone makes room instead.
        """
        vmac = session.vmac
        if vmac is None or self._lease_of_vmac(vmac) is not None:
            return
        vmacs = self._host_leases.get(session.host, set())
        if len(vmacs) < self._limits.max_leases_per_ip:
            return
        for other in sorted(vmacs):
            holder = self._sessions.get(self._leases[other])
            if holder is None or holder.vmac != other:
                self._drop_lease(other)
                return
        self._caps["dhcp_leases_per_ip"] += 1
        raise _RejectError(
            CloseCode.TRY_AGAIN_LATER,
            "too many addresses for this source address, try again later",
            f"{len(vmacs)} addresses already leased to {session.host}",
        )

    def _is_pool_host(self, address: IPv4Address) -> bool:
        return self._dhcp is not None and address in _HostRange(self._dhcp)

    def _record_lease(self, vmac: str, address: IPv4Address, host: str) -> None:
        """Keep leases one-to-one: a vmac holds one address, an address one vmac."""
        old_address = self._leases.get(vmac)
        if old_address is not None and self._lease_owner.get(old_address) == vmac:
            del self._lease_owner[old_address]
        old_owner = self._lease_owner.get(address)
        if old_owner is not None and old_owner != vmac:
            self._drop_lease(old_owner)
        self._forget_lease_host(vmac)
        self._leases[vmac] = address
        self._lease_owner[address] = vmac
        self._lease_host[vmac] = host
        self._host_leases.setdefault(host, set()).add(vmac)
        if self._cluster is not None:
            self._actions.append(RecordLease(vmac, address))

    def _drop_lease(self, vmac: str) -> None:
        address = self._leases.pop(vmac)
        if self._lease_owner.get(address) == vmac:
            del self._lease_owner[address]
        self._forget_lease_host(vmac)

    def _forget_lease_host(self, vmac: str) -> None:
        host = self._lease_host.pop(vmac, None)
        if host is None:
            return
        vmacs = self._host_leases[host]
        vmacs.discard(vmac)
        if not vmacs:
            del self._host_leases[host]

    # -- relaying -------------------------------------------------------------

    def _forward(self, session: RelaySession, frame: bytes, now: float) -> None:
        if len(frame) < 1 + _IPV4_HEADER_SIZE:
            self._drop(session, "short_forward")
            return
        if frame[1] >> 4 != 4:
            self._drop(session, "not_ipv4")
            return
        source = IPv4Address(frame[13:17])
        destination = IPv4Address(frame[17:21])
        if source != session.tun_ip and not self._may_route(session, source):
            self._drop(session, "spoofed_source")
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
            session.frames_relayed += 1
            session.bytes_relayed += len(frame)
            self._deliver(target, frame)
        elif is_broadcast_or_multicast(destination, self._dhcp):
            self._fan_out(session, frame, now)
        else:
            # Inline, not _publish_or_drop: a relay without a cluster pays no call.
            cluster = self._cluster
            if cluster is not None and cluster.remote_owner(destination) is not None:
                self._publish(session, destination, frame)
            else:
                self._drop(session, "unknown_destination")

    def _may_route(self, session: RelaySession, source: IPv4Address) -> bool:
        assert session.tun_ip is not None  # only called for authenticated sessions
        networks = self._routed_sources.get(session.tun_ip, ())
        return any(source in network for network in networks)

    def _relay_signal(
        self,
        session: RelaySession,
        message: Udp4Conn | Discovery | General | LanAddress | NameAnnouncement,
        frame: bytes,
        now: float,
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
            self._fan_out(session, frame, now)
            return
        target = self._sessions.get(destination)
        if target is None:
            self._publish_or_drop(session, destination, frame)
            return
        session.frames_relayed += 1
        session.bytes_relayed += len(frame)
        self._deliver(target, frame)

    def _deliver(self, target: RelaySession, frame: bytes) -> None:
        size = len(frame)
        self._counters["frames_relayed"] += 1
        self._counters["bytes_relayed"] += size
        target.frames_delivered += 1
        target.bytes_delivered += size
        self._actions.append(Send(target, frame))

    def _publish_or_drop(
        self, sender: RelaySession, destination: IPv4Address, frame: bytes
    ) -> None:
        """No local session holds ``destination``: publish it to its holder, if a server has it."""
        cluster = self._cluster
        if cluster is None or cluster.remote_owner(destination) is None:
            self._drop(sender, "unknown_destination")
        else:
            self._publish(sender, destination, frame)

    def _publish(self, sender: RelaySession, destination: IPv4Address, frame: bytes) -> None:
        sender.frames_relayed += 1
        sender.bytes_relayed += len(frame)
        self._counters["frames_published"] += 1
        self._actions.append(Publish(destination, frame))

    def _fan_out(self, sender: RelaySession, frame: bytes, now: float) -> None:
        """Send ``frame`` to everyone but ``sender``, within the broadcast caps.

        One broadcast costs a send per client, so its size and rate are capped;
        over the cap it is dropped, and the sender stays connected.
        """
        limits = self._limits
        if len(frame) > limits.max_broadcast_size:
            self._drop(sender, "broadcast_too_large")
            self.cap_hit(
                "broadcast_size",
                now,
                "dropped a %d-byte broadcast from %s",
                len(frame),
                sender.describe(),
            )
            return
        bucket = sender.broadcast_bucket
        if bucket is None:
            rate = limits.broadcast_rate
            bucket = sender.broadcast_bucket = TokenBucket(rate, 2 * rate, now)
        if not bucket.take(now):
            self._drop(sender, "broadcast_rate")
            self.cap_hit("broadcast_rate", now, "dropped broadcasts from %s", sender.describe())
            return
        # Counted once per broadcast: the sender passed on one frame.
        sender.frames_relayed += 1
        sender.bytes_relayed += len(frame)
        for target in list(self._sessions.values()):
            if target is not sender:
                self._deliver(target, frame)
        if self._cluster is not None:
            # After the caps: they hold for the sender across the whole cluster.
            self._counters["frames_published"] += 1
            self._actions.append(Publish(None, frame))

    # -- member names (issue 16) ----------------------------------------------

    def _on_ping(self, session: RelaySession, payload: bytes, now: float) -> None:
        if session.closed or session.disconnected:
            return
        identity = decode_ping_payload(payload)
        if identity is None:
            return
        session.client_version = identity.version
        if identity.hostname == session.hostname:
            return
        if not session.authenticated:
            session.hostname = identity.hostname  # enters the table at login
            return
        if not self._name_change_allowed(session, now):
            return
        logger.info(
            "%s is named %r (was %r)", session.describe(), identity.hostname, session.hostname
        )
        session.hostname = identity.hostname
        self._publish_names()

    def _on_hello(self, session: RelaySession, message: Hello, now: float) -> None:
        """A p2pvpn client: the whole table to it, its changed entry to the others."""
        # The first HELLO of a connection is free; repeats cost a full table each.
        if session.extensions and not self._name_change_allowed(session, now):
            return
        if not session.extensions:
            logger.debug(
                "%s is a p2pvpn client (exit node: %s)", session.describe(), message.exit_node
            )
        session.extensions = True
        session.exit_node = message.exit_node
        self._publish_names(exclude=session)
        for frame in encode_names(self._names.entries(), replace=True):
            self._actions.append(Send(session, frame))

    def _name_change_allowed(self, session: RelaySession, now: float) -> bool:
        """Within ``session``'s name_change_rate; counts the cap and says no when over it."""
        bucket = session.name_bucket
        if bucket is None:
            bucket = session.name_bucket = TokenBucket(NAME_CHANGE_RATE, NAME_CHANGE_BURST, now)
        if bucket.take(now):
            return True
        self.cap_hit("name_change_rate", now, "ignored name changes of %s", session.describe())
        return False

    def _named_members(self) -> list[NamedMember]:
        """Logged-in sessions with a name, by login time then address: who keeps a plain name."""
        named = [
            (session.since or 0.0, address, session.hostname, session)
            for address, session in self._sessions.items()
            if session.hostname
        ]
        named.sort(key=lambda item: (item[0], item[1]))
        return [
            NamedMember(address, hostname, session.exit_node, session.extensions)
            for _, address, hostname, session in named
            if hostname
        ]

    def _publish_names(self, exclude: RelaySession | None = None) -> None:
        """Bring the table up to date; its changes go to every p2pvpn session but ``exclude``."""
        changes: list[NameEntry] = self._names.update(self._named_members())
        if not changes:
            return
        frames = encode_names(changes, replace=False)
        for target in self._sessions.values():
            if target.extensions and target is not exclude and not target.closed:
                self._actions.extend(Send(target, frame) for frame in frames)

    # -- session bookkeeping ------------------------------------------------

    def _unmap(self, session: RelaySession) -> None:
        """Drop the tun ip mapping only if it still points at ``session``."""
        tun_ip = session.tun_ip
        if tun_ip is not None and self._sessions.get(tun_ip) is session:
            del self._sessions[tun_ip]

    def _reject(self, session: RelaySession, code: CloseCode, reason: str, detail: str) -> None:
        """Close ``session`` for ``code``, logging ``detail`` with its remote address."""
        self._rejections[code.name] += 1
        logger.warning("rejected %s: %s", session.describe(), detail)
        self._close(session, code, reason)

    def _close(self, session: RelaySession, code: int, reason: str) -> None:
        session.closed = True
        self._unmap(session)
        session.authenticated = False
        self._actions.append(Close(session, int(code), reason))

    def _take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions


def _parse_cluster_frame(
    frame: bytes, *, broadcast: bool, dhcp: IPv4Network | None
) -> tuple[IPv4Address, IPv4Address] | None:
    """(source, destination) of a relayable frame from the cluster, or None for junk.

    The publishing server checked the sender already; this only makes sure a
    frame is what its subject says, so a broken or hostile publisher cannot
    make us send a client anything the relay itself would not.
    """
    if not frame or len(frame) > MAX_FRAME_SIZE:
        return None
    if frame[0] == WsType.FORWARD:
        if len(frame) < 1 + _IPV4_HEADER_SIZE or frame[1] >> 4 != 4:
            return None
        source, destination = IPv4Address(frame[13:17]), IPv4Address(frame[17:21])
        if broadcast != is_broadcast_or_multicast(destination, dhcp):
            return None
        return source, destination
    try:
        message = _decode_relayable(frame)
    except DecodeError:
        return None
    if not isinstance(message, _RELAYED_SIGNALS):
        return None
    # As from a client: everything but UDP4CONN may go to everyone (PROTOCOL 2.4).
    if broadcast and (isinstance(message, Udp4Conn) or message.dst != BROADCAST):
        return None
    return message.src, message.dst


def _replay_digest(key: tuple[object, ...]) -> str:
    """The hex sha256 of a replay key: the same on every server for the same message.

    Servers of different versions may share a cluster, so the form is fixed:
    the JSON list [type number, (vmac or null, EXPTTUN only,) hash as hex].
    """
    parts = [
        part.hex() if isinstance(part, bytes) else int(part) if isinstance(part, WsType) else part
        for part in key
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _host_of(remote: str) -> str:
    """``"192.0.2.1"`` from ``"192.0.2.1:40000"``, ``"2001:db8::1"`` from ``"[2001:db8::1]:1"``."""
    host, separator, _ = remote.rpartition(":")
    return host.strip("[]") if separator else remote


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
