"""`p2pvpn server status`: ask the running server for its snapshot and print it.

The server answers on its control socket (`p2pvpn.control`, served by
`ServerRuntime`) with one line of JSON: this server, its sessions, its
counters and, with ``cluster``, what it knows of NATS and the other servers.
This prints it as JSON or as tables.
"""

import ipaddress
import json
import sys
import time
from pathlib import Path

from p2pvpn._format import format_duration, format_size, format_table
from p2pvpn.config import display_url
from p2pvpn.control import (
    ControlError,
    NotListeningError,
    Snapshot,
    process_details,
    query_snapshot,
    scrub_snapshot,
    snapshot_integer,
    snapshot_number,
    snapshot_text,
)

__all__ = ["format_server_status", "print_server_status", "query_server_status"]

_LABEL_WIDTH = 10
_GAP = "  "


def query_server_status(path: Path, timeout: float = 3.0) -> Snapshot:
    """Ask the server serving `path` for its snapshot; raises ControlError."""
    try:
        return query_snapshot(path, peer="server", role="server", timeout=timeout)
    except NotListeningError as exc:
        raise ControlError(
            f"no p2pvpn server answers on {path} ({exc.reason}): start one with "
            "`p2pvpn server -c FILE`, or name the socket of the running one with "
            "--control-socket PATH (or -c with its config file)"
        ) from exc


def print_server_status(path: Path, *, as_json: bool) -> int:
    """`p2pvpn server status`: print the snapshot of the server at `path`; the exit code."""
    try:
        snapshot = query_server_status(path)
    except ControlError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(format_server_status(snapshot))
    return 0


# --------------------------------------------------------------------------- formatting


def _mapping(value: object) -> Snapshot:
    return value if isinstance(value, dict) else {}


def _records(value: object) -> list[Snapshot]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _age(value: object, now: float, suffix: str = "") -> str:
    """How long ago the Unix time `value` was; "-" when it is missing."""
    then = snapshot_number(value)
    return "-" if then is None else format_duration(now - then) + suffix


def _yes_no(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-"


def _count_and_size(record: Snapshot, kind: str) -> str:
    """``12 / 1.5 KiB``: frames and bytes of `kind` (relayed, delivered)."""
    frames = snapshot_integer(record.get(f"frames_{kind}"))
    size = snapshot_number(record.get(f"bytes_{kind}"))
    shown_frames = "-" if frames is None else str(frames)
    return f"{shown_frames} / {'-' if size is None else format_size(size)}"


def _address_order(record: Snapshot) -> tuple[int, int, str]:
    """Sort key: addresses numerically, anything unparsable after them."""
    text = snapshot_text(record.get("address"), "")
    try:
        return (0, int(ipaddress.IPv4Address(text)), text)
    except ValueError:
        return (1, 0, text)


def format_server_status(snapshot: Snapshot, now: float | None = None) -> str:
    """The human-readable `p2pvpn server status`; tolerates missing and malformed keys."""
    now = time.time() if now is None else now
    snapshot = scrub_snapshot(snapshot)
    sessions = _records(snapshot.get("sessions"))
    lines = [_header_line(_mapping(snapshot.get("server")), len(sessions), now)]
    cluster = snapshot.get("cluster")
    if isinstance(cluster, dict):
        lines.extend(_cluster_lines(cluster, now))
    lines.append("")
    lines.extend(_session_lines(sessions, now))
    if isinstance(cluster, dict):
        lines.extend(_server_lines(cluster, now))
    return "\n".join(lines)


def _header_line(server: Snapshot, sessions: int, now: float) -> str:
    url = display_url(snapshot_text(server.get("websocket"), "?"))
    details = [f"TLS {_yes_no(server.get('tls'))}"]
    listening = snapshot_text(server.get("listening"), "")
    if listening and listening != url:
        details.append(f"listening on {listening}")
    details += process_details(server, now)
    noun = "session" if sessions == 1 else "sessions"
    return _GAP.join(["p2pvpn server", url, f"{sessions} {noun}", f"({', '.join(details)})"])


def _nats_state(cluster: Snapshot, now: float) -> str:
    state = snapshot_text(cluster.get("state"), "unknown")
    if state == "refused":
        return f"refused: {snapshot_text(cluster.get('refused'), 'no reason given')}"
    since = snapshot_number(cluster.get("connected_since"))
    # connected_since may be left from an earlier connection: only "joined" has a "for".
    if state == "joined" and since is not None:
        state += f" for {format_duration(now - since)}"
    return state


def _cluster_lines(cluster: Snapshot, now: float) -> list[str]:
    url = display_url(snapshot_text(cluster.get("nats_url")))
    network = snapshot_text(cluster.get("network"))
    notes = [f"network {network}"]
    outages = snapshot_integer(cluster.get("outages"))
    if outages is not None:
        notes.append(f"outages: {outages}")
    for kind in ("published", "received"):
        frames = snapshot_integer(cluster.get(f"frames_{kind}"))
        if frames is not None:
            notes.append(f"frames {kind}: {frames}")
    line = f"{_nats_state(cluster, now)}{_GAP}{url}{_GAP}({', '.join(notes)})"
    return ["nats".ljust(_LABEL_WIDTH) + line]


def _session_lines(sessions: list[Snapshot], now: float) -> list[str]:
    if not sessions:
        return ["no sessions"]
    rows = [
        [
            snapshot_text(session.get("address")),
            snapshot_text(session.get("name")),
            snapshot_text(session.get("vmac")),
            snapshot_text(session.get("remote")),
            _age(session.get("since"), now),
            _count_and_size(session, "relayed"),
            _count_and_size(session, "delivered"),
            _yes_no(session.get("tls")),
        ]
        for session in sorted(sessions, key=_address_order)
    ]
    headers = ["ADDRESS", "NAME", "VMAC", "REMOTE", "SINCE", "RELAYED", "DELIVERED", "TLS"]
    return format_table(headers, rows, right=(5, 6))


def _server_lines(cluster: Snapshot, now: float) -> list[str]:
    servers = _records(cluster.get("servers"))
    if not servers:
        return ["", "no servers known in the cluster"]
    rows = []
    for server in sorted(servers, key=lambda record: snapshot_text(record.get("name"), "")):
        sessions = snapshot_integer(server.get("sessions"))
        rows.append(
            [
                "*" if server.get("self") is True else "",
                snapshot_text(server.get("name")),
                snapshot_text(server.get("id")),
                display_url(snapshot_text(server.get("websocket"))),
                "-" if sessions is None else str(sessions),
                _age(server.get("updated"), now, " ago"),
            ]
        )
    headers = ["", "SERVER", "ID", "WEBSOCKET", "SESSIONS", "UPDATED"]
    return ["", *format_table(headers, rows, right=(4,)), "(* this server)"]
