"""One peer's direct-connection state machine (PROTOCOL 4), sans I/O.

A ``Peer`` never touches a socket or a clock: the caller passes ``now`` (in
seconds, any monotonic origin) to every event and performs the returned
actions. Like h11 and aioquic, the behaviour is written down as tables:

* ``_TICK_RULES``: per state, how long the state may last, what a tick does
  while it lasts, and where the peer goes when it has lasted too long;
* ``_TRANSITIONS``: ``(state, event) -> handler``; a missing row means the
  event is ignored in that state (no actions).

Where PROTOCOL 4 is silent, the reference implementation (Candy,
``src/peer/peer.cc``) decides; each such place says so in a comment.

One deliberate difference: once CONNECTED, a heartbeat from an address other
than the path does not move the path. Anyone can capture a heartbeat and send
it again from elsewhere, so the new address first gets a DELAY probe with a
fresh timestamp (a path challenge) and becomes the path only when that probe
comes back from it: only a holder of the peer's key can echo it.
"""

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TypeAlias

__all__ = [
    "ACK_TIMEOUT",
    "DELAY_PROBE_TICKS",
    "PATH_CHALLENGE_INTERVAL",
    "PATH_CHALLENGE_TIMEOUT",
    "PUNCH_TIMEOUT",
    "RETRY_MAX",
    "RETRY_MIN",
    "Address",
    "Event",
    "PathDown",
    "PathUp",
    "Peer",
    "PeerAction",
    "PeerState",
    "RequestStun",
    "SendDelayProbe",
    "SendHeartbeat",
    "SendLanAddress",
    "SendPathChallenge",
    "SendPublicAddress",
    "StateChanged",
    "is_lan_address",
]

logger = logging.getLogger(__name__)

Address: TypeAlias = tuple[str, int]

RETRY_MIN = 30
RETRY_MAX = 3600
# PREPARING, SYNCHRONIZING and CONNECTING each get this long.
PUNCH_TIMEOUT = 10.0
# CONNECTED survives this long without a heartbeat carrying ack=1.
ACK_TIMEOUT = 3.0
# A DELAY probe goes out every this many CONNECTED ticks (when relaying is on).
DELAY_PROBE_TICKS = 60
# A candidate path is challenged at most this often (seconds): replaying one
# captured heartbeat many times must not make us send as many probes.
PATH_CHALLENGE_INTERVAL = 1.0
# An echo later than this (seconds) answers a challenge we have given up on.
PATH_CHALLENGE_TIMEOUT = 5.0
_CHALLENGES_KEPT = int(PATH_CHALLENGE_TIMEOUT / PATH_CHALLENGE_INTERVAL)

# RFC 1918 and link-local, exactly. ``IPv4Address.is_private`` would also
# count 100.64/10 (CGNAT), 192.0.0/24, the documentation ranges and more,
# which are not LAN addresses a peer could be reached on directly.
_LAN_NETWORKS = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv4Network("169.254.0.0/16"),
)


def is_lan_address(host: str) -> bool:
    """True for an RFC 1918 or link-local IPv4 address (anything else is public)."""
    try:
        address = IPv4Address(host)
    except ValueError:
        return False
    return any(address in network for network in _LAN_NETWORKS)


class PeerState(enum.Enum):
    INIT = "INIT"
    PREPARING = "PREPARING"
    SYNCHRONIZING = "SYNCHRONIZING"
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    WAITING = "WAITING"
    FAILED = "FAILED"


class Event(enum.Enum):
    """Everything except the tick that can happen to a peer."""

    HINT = "relayed packet or discovery"
    PUBLIC_ADDRESS = "peer's public address (UDP4CONN)"
    LAN_ADDRESS = "peer's LAN address (GENERAL/0)"
    OWN_PUBLIC_ADDRESS = "our STUN answer"
    HEARTBEAT = "heartbeat"
    RTT = "DELAY answer"
    PATH_ECHO = "DELAY answer from a challenged address"


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class RequestStun:
    """We need our public address; the manager sends one request per tick for all."""


@dataclass(frozen=True, slots=True)
class SendPublicAddress:
    """Send our UDP4CONN (public address from STUN) to this peer via the server."""


@dataclass(frozen=True, slots=True)
class SendLanAddress:
    """Send our LAN address (GENERAL subtype 0) to this peer via the server."""


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    address: Address
    ack: bool


@dataclass(frozen=True, slots=True)
class SendDelayProbe:
    address: Address


@dataclass(frozen=True, slots=True)
class SendPathChallenge:
    """Send a DELAY probe stamped exactly ``timestamp_ms`` to the candidate ``address``."""

    address: Address
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class StateChanged:
    """Always the first action of a transition; the manager logs it at INFO."""

    old: PeerState
    new: PeerState
    reason: str


@dataclass(frozen=True, slots=True)
class PathUp:
    """Entered CONNECTED, or the path changed while CONNECTED: data_plane.set_peer."""

    address: Address


@dataclass(frozen=True, slots=True)
class PathDown:
    """Left CONNECTED: data_plane.drop_peer and routing.on_peer_lost."""


PeerAction: TypeAlias = (
    RequestStun
    | SendPublicAddress
    | SendLanAddress
    | SendHeartbeat
    | SendDelayProbe
    | SendPathChallenge
    | StateChanged
    | PathUp
    | PathDown
)

# Entering one of these forgets everything learnt about the peer.
_FORGETTING = frozenset({PeerState.INIT, PeerState.WAITING, PeerState.FAILED})


def _show(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _next_retry(old: PeerState, new: PeerState, retry: int) -> int:
    """Back-off exactly as Candy's Peer::updateState computes it.

    WAITING -> INIT doubles (capped); any other way into INIT, and every way
    into FAILED, starts over. A successful connection therefore resets the
    back-off only when it is lost (CONNECTED -> INIT).
    """
    if old is PeerState.WAITING and new is PeerState.INIT:
        return min(retry * 2, RETRY_MAX)
    if new in (PeerState.INIT, PeerState.FAILED):
        return RETRY_MIN
    return retry


@dataclass(frozen=True, slots=True)
class _TickRule:
    """One row of the tick table.

    While ``now - timer_since < limit(peer)`` a tick performs ``on_time``;
    afterwards it moves the peer to ``expired`` for ``reason(peer, limit)``.
    """

    limit: Callable[["Peer"], float]
    on_time: Callable[["Peer"], list[PeerAction]]
    expired: PeerState
    reason: Callable[["Peer", float], str]


class Peer:
    """Direct-connection state of one remote client, identified by its tun ip."""

    def __init__(
        self,
        tun_ip: IPv4Address,
        now: float,
        *,
        stun_enabled: bool,
        lan_enabled: bool,
        delay_probes: bool,
    ) -> None:
        self._tun_ip = tun_ip
        self._stun_enabled = stun_enabled
        self._lan_enabled = lan_enabled
        self._delay_probes = delay_probes
        self._state = PeerState.INIT
        self._state_since = now
        # Candy's lastActiveTime: the origin of ``t``. Set on every state
        # change and refreshed by a few events without one (heartbeat ack in
        # CONNECTED, UDP4CONN in PREPARING).
        self._timer_since = now
        self._retry = RETRY_MIN
        self._public: Address | None = None
        self._lan: Address | None = None
        self._current: Address | None = None
        self._ack = False
        self._rtt_ms: float | None = None
        self._last_ack_heartbeat: float | None = None
        self._connected_ticks = 0
        # Path challenge (CONNECTED only): the address a heartbeat came from
        # that is not the path, when we last probed it, and the timestamps of
        # the probes it may answer. Keeping a few lets an echo slower than
        # PATH_CHALLENGE_INTERVAL count. Timestamps only grow: each is fresh.
        self._candidate: Address | None = None
        self._challenged_at: float | None = None
        self._challenges: list[int] = []
        self._challenge_ms = 0

    def __repr__(self) -> str:
        return f"<Peer {self._tun_ip} {self._state.name} path={self._current}>"

    # ------------------------------------------------------------ observers

    @property
    def tun_ip(self) -> IPv4Address:
        return self._tun_ip

    @property
    def state(self) -> PeerState:
        return self._state

    @property
    def state_since(self) -> float:
        """When the peer entered its current state (not refreshed by events)."""
        return self._state_since

    @property
    def retry(self) -> int:
        """Seconds the next WAITING lasts."""
        return self._retry

    @property
    def public_address(self) -> Address | None:
        return self._public

    @property
    def lan_address(self) -> Address | None:
        return self._lan

    @property
    def current_address(self) -> Address | None:
        """The path: where heartbeats and packets go once CONNECTED."""
        return self._current

    @property
    def on_lan_path(self) -> bool:
        """The path is a LAN address (RFC 1918 or link-local)."""
        return self._current is not None and is_lan_address(self._current[0])

    @property
    def ack(self) -> bool:
        """Our ack flag: we have received a heartbeat from this peer."""
        return self._ack

    @property
    def rtt_ms(self) -> float | None:
        return self._rtt_ms

    @property
    def last_ack_heartbeat(self) -> float | None:
        return self._last_ack_heartbeat

    @property
    def path_challenge(self) -> tuple[Address, int] | None:
        """The candidate path and the timestamp its echo must carry, while one is pending."""
        if self._candidate is None or not self._challenges:
            return None
        return self._candidate, self._challenges[-1]

    def disable_lan(self) -> None:
        """System routes arrived (PROTOCOL 2.6): stop using LAN addresses from now on.

        Like Candy's localP2PDisabled, this takes effect event by event rather
        than tearing anything down: a CONNECTED LAN path stays until a public
        address answers a path challenge, or until it times out because
        heartbeats from LAN sources are now dropped.
        """
        self._lan_enabled = False
        self._lan = None
        if self._state is not PeerState.CONNECTED and self.on_lan_path:
            self._current = None

    # --------------------------------------------------------------- events

    def tick(self, now: float) -> list[PeerAction]:
        """The 1-second tick that drives timeouts and periodic sends."""
        rule = _TICK_RULES.get(self._state)
        if rule is None:
            return []
        limit = rule.limit(self)
        if now - self._timer_since < limit:
            return rule.on_time(self)
        return self._enter(rule.expired, now, rule.reason(self, limit))

    def on_hint(self, now: float) -> list[PeerAction]:
        """A relayed packet or a DISCOVERY from this peer arrived."""
        return self._dispatch(Event.HINT, now)

    def on_public_address(self, address: Address, now: float) -> list[PeerAction]:
        """The peer's UDP4CONN arrived through the server."""
        return self._dispatch(Event.PUBLIC_ADDRESS, now, address)

    def on_lan_address(self, address: Address, now: float) -> list[PeerAction]:
        """The peer's GENERAL subtype 0 arrived through the server."""
        if not self._lan_enabled:
            return []
        return self._dispatch(Event.LAN_ADDRESS, now, address)

    def on_own_public_address(self, now: float) -> list[PeerAction]:
        """Our STUN answer arrived (the manager tells every peer)."""
        return self._dispatch(Event.OWN_PUBLIC_ADDRESS, now)

    def on_heartbeat(self, source: Address, ack: bool, now: float) -> list[PeerAction]:
        """A heartbeat from this peer arrived from UDP address ``source``."""
        return self._dispatch(Event.HEARTBEAT, now, source, ack)

    def on_rtt(self, rtt_ms: float, now: float) -> list[PeerAction]:
        """The manager measured a round trip with a DELAY probe."""
        return self._dispatch(Event.RTT, now, rtt_ms)

    def on_path_echo(self, source: Address, timestamp_ms: int, now: float) -> list[PeerAction]:
        """Our DELAY probe stamped ``timestamp_ms`` came back from UDP address ``source``."""
        return self._dispatch(Event.PATH_ECHO, now, source, timestamp_ms)

    def _dispatch(self, event: Event, now: float, *args: object) -> list[PeerAction]:
        handler = _TRANSITIONS.get((self._state, event))
        if handler is None:
            return []
        return handler(self, now, *args)

    # ------------------------------------------------------------- handlers

    def _start(self, now: float) -> list[PeerAction]:
        return self._enter(PeerState.PREPARING, now, "relayed packet or discovery from peer")

    def _restart_with_public(self, now: float, address: Address) -> list[PeerAction]:
        actions = self._enter(
            PeerState.PREPARING, now, f"public address {_show(address)} from peer"
        )
        self._public = address
        return actions + self._lan_reply()

    def _restart_with_lan(self, now: float, address: Address) -> list[PeerAction]:
        actions = self._enter(PeerState.PREPARING, now, f"LAN address {_show(address)} from peer")
        self._lan = address
        return actions

    def _store_public_preparing(self, now: float, address: Address) -> list[PeerAction]:
        # Candy calls updateState(PREPARING) here: no transition, but the
        # timer restarts and the LAN address goes out again. When both sides
        # start at once this is the only LAN address either of them sends.
        self._public = address
        self._timer_since = now
        return self._lan_reply()

    def _synchronized(self, now: float, address: Address) -> list[PeerAction]:
        self._public = address
        return self._enter(PeerState.CONNECTING, now, f"public address {_show(address)} from peer")

    def _store_public(self, now: float, address: Address) -> list[PeerAction]:
        self._public = address
        return []

    def _store_lan(self, now: float, address: Address) -> list[PeerAction]:
        self._lan = address
        return []

    def _own_public_known(self, now: float) -> list[PeerAction]:
        if self._public is None:
            target, why = PeerState.SYNCHRONIZING, "waiting for the peer's"
        else:
            target, why = PeerState.CONNECTING, "peer's known too"
        actions = self._enter(target, now, f"own public address known, {why}")
        # Our LAN address goes out with the public one: otherwise, when both
        # peers finish STUN before either's UDP4CONN arrives, neither ever
        # sends it, and two peers behind one NAT without hairpinning fail.
        lan = [SendLanAddress()] if self._lan_enabled else []
        return [*actions, SendPublicAddress(), *lan]

    def _heartbeat(self, now: float, source: Address, ack: bool) -> list[PeerAction]:
        lan = is_lan_address(source[0])
        if lan and not self._lan_enabled:
            # Candy drops the whole heartbeat: with system routes a LAN
            # address may be captured by the tunnel itself.
            return []
        if lan:
            self._lan = source
        else:
            self._public = source
        actions = self._choose_path(source, lan)
        self._ack = True
        if not ack:
            return actions
        self._last_ack_heartbeat = self._timer_since = now
        if self._state is PeerState.CONNECTED:
            return actions
        actions += self._enter(PeerState.CONNECTED, now, f"heartbeat ack from {_show(source)}")
        # Candy probes on entering CONNECTED whether or not relaying is on.
        return [*actions, SendDelayProbe(self._current or source)]

    def _heartbeat_connected(self, now: float, source: Address, ack: bool) -> list[PeerAction]:
        if source == self._current:
            return self._heartbeat(now, source, ack)
        # Possibly a replay from a third host: it neither moves the path nor
        # keeps it alive until the address has answered a challenge.
        if not self._may_become_path(source):
            return []
        if source != self._candidate:
            # One candidate at a time: the newest is the likeliest rebinding.
            self._drop_candidate()
            self._candidate = source
        elif (
            self._challenged_at is not None and now - self._challenged_at < PATH_CHALLENGE_INTERVAL
        ):
            return []
        self._challenged_at = now
        self._challenge_ms = max(int(now * 1000), self._challenge_ms + 1)
        self._challenges = [*self._challenges[-(_CHALLENGES_KEPT - 1) :], self._challenge_ms]
        logger.debug(
            "peer %s: heartbeat from %s, not the path: challenging it", self._tun_ip, _show(source)
        )
        return [SendPathChallenge(source, self._challenge_ms)]

    def _path_echo(self, now: float, source: Address, timestamp_ms: int) -> list[PeerAction]:
        if source != self._candidate or timestamp_ms not in self._challenges:
            return []
        self._drop_candidate()
        # Our timestamps are our clock in ms: they say when the probe went out.
        # disable_lan() or a new LAN path may have come in since the challenge.
        late = now * 1000 - timestamp_ms > PATH_CHALLENGE_TIMEOUT * 1000
        if late or not self._may_become_path(source):
            return []
        if is_lan_address(source[0]):
            self._lan = source
        else:
            self._public = source
        self._last_ack_heartbeat = self._timer_since = now
        logger.info(
            "peer %s: path moves to %s, which answered a challenge", self._tun_ip, _show(source)
        )
        return self._choose_path(source, is_lan_address(source[0]))

    def _drop_candidate(self) -> None:
        self._candidate = self._challenged_at = None
        self._challenges = []

    def _may_become_path(self, source: Address) -> bool:
        lan = is_lan_address(source[0])
        if lan:
            return self._lan_enabled
        return not (self._current is not None and self._lan_enabled and self.on_lan_path)

    def _choose_path(self, source: Address, lan: bool) -> list[PeerAction]:
        """Make ``source`` the path unless that would leave a LAN path for a public one."""
        if not lan and not self._may_become_path(source):
            return []
        current = self._current
        self._current = source
        if self._state is PeerState.CONNECTED and source != current:
            return [PathUp(source)]
        return []

    def _lan_reply(self) -> list[PeerAction]:
        return [SendLanAddress()] if self._lan_enabled else []

    def _store_rtt(self, now: float, rtt_ms: float) -> list[PeerAction]:
        self._rtt_ms = rtt_ms
        return []

    # ---------------------------------------------------------- tick bodies

    def _request_stun(self) -> list[PeerAction]:
        return [RequestStun()]

    def _heartbeat_lan(self) -> list[PeerAction]:
        return self._heartbeats(self._lan)

    def _heartbeat_punch(self) -> list[PeerAction]:
        return self._heartbeats(self._public, self._lan)

    def _heartbeat_path(self) -> list[PeerAction]:
        actions = self._heartbeats(self._current)
        self._connected_ticks += 1
        probe_due = self._connected_ticks % DELAY_PROBE_TICKS == 0
        if self._delay_probes and probe_due and self._current is not None:
            actions.append(SendDelayProbe(self._current))
        return actions

    def _nothing(self) -> list[PeerAction]:
        return []

    def _heartbeats(self, *addresses: Address | None) -> list[PeerAction]:
        # dict.fromkeys: one heartbeat per distinct address, in order.
        targets = dict.fromkeys(a for a in addresses if a is not None)
        return [SendHeartbeat(address, self._ack) for address in targets]

    # ----------------------------------------------------------- transition

    def _enter(self, new: PeerState, now: float, reason: str) -> list[PeerAction]:
        old = self._state
        actions: list[PeerAction] = [StateChanged(old, new, reason)]
        if old is PeerState.CONNECTED:
            actions.append(PathDown())
        if new in _FORGETTING:
            self._forget()
        self._retry = _next_retry(old, new, self._retry)
        self._state = new
        self._state_since = self._timer_since = now
        # A challenge belongs to one stretch of CONNECTED.
        self._drop_candidate()
        if new is PeerState.CONNECTED and self._current is not None:
            self._connected_ticks = 0
            actions.append(PathUp(self._current))
        return actions

    def _forget(self) -> None:
        self._public = self._lan = self._current = None
        self._ack = False
        self._rtt_ms = None
        self._last_ack_heartbeat = None


def _preparing_reason(peer: Peer, limit: float) -> str:
    if not peer._stun_enabled:
        return "no STUN server: direct connections disabled"
    return f"no STUN answer within {limit:g} s in PREPARING"


def _timeout_reason(state: PeerState) -> Callable[[Peer, float], str]:
    return lambda peer, limit: f"timeout after {limit:g} s in {state.name}"


_TICK_RULES: dict[PeerState, _TickRule] = {
    PeerState.PREPARING: _TickRule(
        limit=lambda peer: PUNCH_TIMEOUT if peer._stun_enabled else 0.0,
        on_time=Peer._request_stun,
        expired=PeerState.FAILED,
        reason=_preparing_reason,
    ),
    PeerState.SYNCHRONIZING: _TickRule(
        limit=lambda peer: PUNCH_TIMEOUT,
        on_time=Peer._heartbeat_lan,
        expired=PeerState.FAILED,
        reason=_timeout_reason(PeerState.SYNCHRONIZING),
    ),
    PeerState.CONNECTING: _TickRule(
        limit=lambda peer: PUNCH_TIMEOUT,
        on_time=Peer._heartbeat_punch,
        expired=PeerState.WAITING,
        reason=_timeout_reason(PeerState.CONNECTING),
    ),
    PeerState.CONNECTED: _TickRule(
        limit=lambda peer: ACK_TIMEOUT,
        on_time=Peer._heartbeat_path,
        expired=PeerState.INIT,
        reason=lambda peer, limit: f"no heartbeat with ack for {limit:g} s",
    ),
    PeerState.WAITING: _TickRule(
        limit=lambda peer: float(peer._retry),
        on_time=Peer._nothing,
        expired=PeerState.INIT,
        reason=lambda peer, limit: f"back-off of {limit:g} s over",
    ),
    # INIT and FAILED: a tick does nothing.
}

_S = PeerState
_E = Event
_TRANSITIONS: dict[tuple[PeerState, Event], Callable[..., list[PeerAction]]] = {
    (_S.INIT, _E.HINT): Peer._start,
    # UDP4CONN
    (_S.INIT, _E.PUBLIC_ADDRESS): Peer._restart_with_public,
    (_S.WAITING, _E.PUBLIC_ADDRESS): Peer._restart_with_public,
    (_S.FAILED, _E.PUBLIC_ADDRESS): Peer._restart_with_public,
    (_S.PREPARING, _E.PUBLIC_ADDRESS): Peer._store_public_preparing,
    (_S.SYNCHRONIZING, _E.PUBLIC_ADDRESS): Peer._synchronized,
    (_S.CONNECTING, _E.PUBLIC_ADDRESS): Peer._store_public,
    (_S.CONNECTED, _E.PUBLIC_ADDRESS): Peer._store_public,
    # GENERAL/0. In INIT and WAITING it is dropped: entering PREPARING from
    # INIT keeps addresses, but the peer only sends it right after our
    # UDP4CONN, i.e. while we are in SYNCHRONIZING or CONNECTING.
    (_S.FAILED, _E.LAN_ADDRESS): Peer._restart_with_lan,
    (_S.PREPARING, _E.LAN_ADDRESS): Peer._store_lan,
    (_S.SYNCHRONIZING, _E.LAN_ADDRESS): Peer._store_lan,
    (_S.CONNECTING, _E.LAN_ADDRESS): Peer._store_lan,
    (_S.CONNECTED, _E.LAN_ADDRESS): Peer._store_lan,
    # STUN
    (_S.PREPARING, _E.OWN_PUBLIC_ADDRESS): Peer._own_public_known,
    # Heartbeats: ignored in INIT, WAITING and FAILED.
    (_S.PREPARING, _E.HEARTBEAT): Peer._heartbeat,
    (_S.SYNCHRONIZING, _E.HEARTBEAT): Peer._heartbeat,
    (_S.CONNECTING, _E.HEARTBEAT): Peer._heartbeat,
    (_S.CONNECTED, _E.HEARTBEAT): Peer._heartbeat_connected,
    # A late DELAY answer after the path went down must not resurrect an rtt.
    (_S.CONNECTED, _E.RTT): Peer._store_rtt,
    (_S.CONNECTED, _E.PATH_ECHO): Peer._path_echo,
}
