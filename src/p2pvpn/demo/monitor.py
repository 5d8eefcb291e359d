"""Peer state changes, from successive `p2pvpn status` snapshots of every client.

`StateTracker` is pure: it is fed snapshots (the JSON of ``p2pvpn status
--json``, see `p2pvpn.client.node.ClientNode.snapshot`) with the time they were
taken, and answers what changed. `StatusPoller` asks the clients' control
sockets for those snapshots (a unix socket is a file, reachable from outside
the client's network namespace), at most every `POLL_INTERVAL` seconds.
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from p2pvpn.client.control import control_socket_path
from p2pvpn.client.status import query_status
from p2pvpn.control import ControlError, snapshot_number

__all__ = [
    "CONNECTED",
    "POLL_INTERVAL",
    "PeerView",
    "StateChange",
    "StateTracker",
    "StatusPoller",
    "peer_views",
]

CONNECTED = "CONNECTED"
POLL_INTERVAL = 0.5
QUERY_TIMEOUT = 2.0

Snapshot = Mapping[str, object]


@dataclass(frozen=True)
class PeerView:
    """What one client says about one peer."""

    state: str
    path: str | None = None
    rtt_ms: float | None = None
    relay_bytes_out: int = 0

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED


@dataclass(frozen=True)
class StateChange:
    client: str
    peer: str
    old: str | None  # None: the peer was not in the client's table before
    new: str
    path: str | None
    at: float

    def describe(self) -> str:
        states = self.new if self.old is None else f"{self.old} -> {self.new}"
        path = f" ({self.path})" if self.new == CONNECTED and self.path else ""
        return f"{self.client} -> {self.peer}: {states}{path}"


def peer_views(snapshot: Snapshot, names: Mapping[str, str]) -> dict[str, PeerView]:
    """The peers of one snapshot by client name; ``names`` maps tun ip -> name.

    Peers that are not demo clients, and malformed rows, are left out.
    """
    rows = snapshot.get("peers")
    views: dict[str, PeerView] = {}
    if not isinstance(rows, list):
        return views
    for row in rows:
        if not isinstance(row, dict):
            continue
        name = names.get(str(row.get("tun_ip")))
        state = row.get("state")
        if name is None or not isinstance(state, str):
            continue
        path = row.get("path")
        relay = snapshot_number(row.get("relay_bytes_out"))
        views[name] = PeerView(
            state=state,
            path=path if isinstance(path, str) else None,
            rtt_ms=snapshot_number(row.get("rtt_ms")),
            relay_bytes_out=int(relay) if relay is not None else 0,
        )
    return views


@dataclass
class _History:
    states: list[str] = field(default_factory=list)
    view: PeerView | None = None
    first_connected: float | None = None
    connected_path: str | None = None


class StateTracker:
    """Remembers every client's view of every peer and the chain of states it went through."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = dict(names)  # tun ip -> client name
        self._history: dict[tuple[str, str], _History] = {}

    def update(self, client: str, snapshot: Snapshot, now: float) -> list[StateChange]:
        """Feed ``client``'s snapshot taken at ``now``; returns the state changes it shows."""
        changes = []
        for peer, view in peer_views(snapshot, self._names).items():
            if peer == client:
                continue
            history = self._history.setdefault((client, peer), _History())
            old = history.view.state if history.view is not None else None
            history.view = view
            if view.connected and history.first_connected is None:
                history.first_connected = now
            if view.connected:
                history.connected_path = view.path
            if old != view.state:
                history.states.append(view.state)
                changes.append(StateChange(client, peer, old, view.state, view.path, now))
        return changes

    def view(self, client: str, peer: str) -> PeerView | None:
        history = self._history.get((client, peer))
        return history.view if history is not None else None

    def state(self, client: str, peer: str) -> str | None:
        view = self.view(client, peer)
        return view.state if view is not None else None

    def connected(self, client: str, peer: str) -> bool:
        view = self.view(client, peer)
        return view is not None and view.connected

    def first_connected(self, client: str, peer: str) -> float | None:
        """When ``client`` first saw ``peer`` CONNECTED (the ``now`` of that update)."""
        history = self._history.get((client, peer))
        return history.first_connected if history is not None else None

    def chain(self, client: str, peer: str) -> str:
        """``PREPARING -> CONNECTING -> CONNECTED (direct 203.0.113.12:40123)``, or ``-``."""
        history = self._history.get((client, peer))
        if history is None or not history.states:
            return "-"
        text = " -> ".join(history.states)
        if history.states[-1] == CONNECTED and history.connected_path:
            text += f" ({history.connected_path})"
        return text


class StatusPoller:
    """Polls every client's control socket and feeds a `StateTracker`."""

    def __init__(
        self,
        state_dirs: Mapping[str, Path],
        tracker: StateTracker,
        on_change: Callable[[StateChange], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        query: Callable[[Path], Snapshot] | None = None,
    ) -> None:
        self._sockets = {name: control_socket_path(path) for name, path in state_dirs.items()}
        self.tracker = tracker
        self._on_change = on_change
        self._clock = clock
        self._query = query or (lambda path: query_status(path, QUERY_TIMEOUT))
        self._last_poll: float | None = None
        self.snapshots: dict[str, Snapshot] = {}
        self.errors: dict[str, str] = {}

    def snapshot(self, client: str) -> Snapshot | None:
        """Ask one client now (no rate limit); None when it does not answer."""
        try:
            snapshot = self._query(self._sockets[client])
        except ControlError as exc:
            self.errors[client] = str(exc)
            return None
        self.errors.pop(client, None)
        self.snapshots[client] = snapshot
        return snapshot

    def poll(self, *, force: bool = False) -> list[StateChange]:
        """Poll every client unless the last poll was less than `POLL_INTERVAL` s ago."""
        now = self._clock()
        if not force and self._last_poll is not None and now - self._last_poll < POLL_INTERVAL:
            return []
        self._last_poll = now
        changes: list[StateChange] = []
        for client in self._sockets:
            snapshot = self.snapshot(client)
            if snapshot is not None:
                changes += self.tracker.update(client, snapshot, self._clock())
        for change in changes:
            self._on_change(change)
        return changes
