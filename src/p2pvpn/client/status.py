"""`p2pvpn status`: ask a running client for its snapshot and print it.

The client answers on its control socket (`p2pvpn.control`, in its state
directory: `p2pvpn.client.control`) with one line of JSON; this prints it as
JSON or as a table. The directory given with ``--state-dir`` is either one
client's state directory (as given to ``run --state-dir``) or the root of
several clients' directories, one per name.
"""

import ipaddress
import json
import sys
import time
from pathlib import Path

from p2pvpn._format import format_duration, format_size, format_table
from p2pvpn.client.control import SOCKET_NAME, control_socket_path
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
    socket_answers,
)

__all__ = [
    "find_control_socket",
    "format_status",
    "print_status",
    "query_status",
]

DEFAULT_NAME = "default"
_LABEL_WIDTH = 10
_GAP = "  "


# --------------------------------------------------------------------------- asking


def query_status(path: Path, timeout: float = 3.0) -> Snapshot:
    """Ask the client serving `path` for its snapshot; raises ControlError."""
    name = path.parent.name or DEFAULT_NAME
    try:
        return query_snapshot(path, peer=f"client {name}", role="client", timeout=timeout)
    except NotListeningError as exc:
        raise ControlError(f"no p2pvpn client running for {name} ({exc.reason} at {path})") from exc


def print_status(name: str | None, as_json: bool, state_dir: Path) -> int:
    """`p2pvpn status`: print client `name`'s snapshot; returns the exit code."""
    try:
        snapshot = query_status(find_control_socket(name, state_dir))
    except ControlError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(format_status(snapshot))
    return 0


def find_control_socket(name: str | None, state_dir: Path) -> Path:
    """The control socket of client `name` (None: the only one there is) in `state_dir`.

    A `state_dir` that holds a control socket is one client's own directory
    (``run --state-dir``): its socket is the answer unless `name` has its own
    directory below it. Otherwise `state_dir` is the root of the clients'
    directories, one per name.
    """
    if name is not None and ("/" in name or name in (".", "..")):
        raise ControlError(f"invalid client name {name!r}")
    own = control_socket_path(state_dir)
    if name is not None:
        named = control_socket_path(state_dir / (name or DEFAULT_NAME))
        return own if own.is_socket() and not named.is_socket() else named
    if own.is_socket():
        return own
    found = _find_sockets(state_dir)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        # Sockets of crashed clients linger: prefer the one client that is alive.
        alive = [path for path in found if socket_answers(path)]
        if len(alive) == 1:
            return alive[0]
        names = ", ".join(path.parent.name for path in (alive or found))
        raise ControlError(
            f"several p2pvpn clients under {state_dir} ({names}): choose one with --name"
        )
    return control_socket_path(state_dir / DEFAULT_NAME)


def _find_sockets(state_root: Path) -> list[Path]:
    try:
        candidates = sorted(state_root.glob(f"*/{SOCKET_NAME}"))
    except OSError:
        return []
    return [path for path in candidates if path.is_socket()]


# --------------------------------------------------------------------------- formatting


def _mapping(value: object) -> Snapshot:
    return value if isinstance(value, dict) else {}


def _records(value: object) -> list[Snapshot]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _size_or_dash(value: object) -> str:
    number = snapshot_number(value)
    return "-" if number is None else format_size(number)


def _duration_or_dash(value: object) -> str:
    number = snapshot_number(value)
    return "-" if number is None else format_duration(number)


def _aligned(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns as wide as their content; the first row is the heading."""
    return format_table(rows[0], rows[1:]) if rows else []


def _labelled(label: str, lines: list[str]) -> list[str]:
    """Prefix the first line with `label` and indent the rest to match."""
    return [
        (label if index == 0 else "").ljust(_LABEL_WIDTH) + line for index, line in enumerate(lines)
    ]


def format_status(snapshot: Snapshot, now: float | None = None) -> str:
    """The human-readable `p2pvpn status`; tolerates missing and malformed keys."""
    now = time.time() if now is None else now
    snapshot = scrub_snapshot(snapshot)
    lines = [_header_line(snapshot, now)]
    server = _mapping(snapshot.get("server"))
    if server:
        lines.append(_server_line(server, now))
    bench_server = snapshot_text(snapshot.get("bench_server"), "")
    if bench_server:
        # Others can measure the link to us (`p2pvpn bench peer`) while this is on.
        lines.append(f"bench server: on {bench_server}")
    lines.extend(_exit_lines(_mapping(snapshot.get("exit")), now))
    lines.extend(_name_lines(snapshot))
    lines.extend(_exit_node_lines(_mapping(snapshot.get("exit_node"))))
    lines.extend(_labelled("traffic", _traffic_lines(snapshot)))
    lines.extend(_drops_lines(snapshot))
    lines.append("")
    lines.extend(_peer_lines(snapshot))
    lines.extend(_names_table_lines(snapshot))
    lines.extend(_route_lines(snapshot))
    lines.extend(_sysroute_lines(snapshot))
    lines.extend(_refused_sysroute_lines(snapshot))
    return "\n".join(lines)


def _exit_lines(exit_use: Snapshot, now: float) -> list[str]:
    """``exit  gw (10.0.0.7) active for 5m, 1 fallback``; nothing when `exit` is not set."""
    target = snapshot_text(exit_use.get("target"), "")
    if not target:
        return []
    state = snapshot_text(exit_use.get("state"))
    address = snapshot_text(exit_use.get("address"), "")
    shown = f"{target} ({address})" if address and address != target else target
    since = exit_use.get("since")
    if state == "active":
        text = f"exit: {shown}, all traffic through it"
    else:
        text = f"exit: {shown} not available: this machine's default route"
    if isinstance(since, int | float) and not isinstance(since, bool):
        text += f" (since {format_duration(max(0.0, now - since))} ago)"
    fallbacks = exit_use.get("fallbacks")
    if isinstance(fallbacks, int) and not isinstance(fallbacks, bool) and fallbacks:
        text += f", {fallbacks} fallback{'s' if fallbacks != 1 else ''}"
    return [text]


def _exit_node_lines(exit_node: Snapshot) -> list[str]:
    """One line while this client offers itself as an exit node; none otherwise."""
    if exit_node.get("offering") is not True:
        return []
    masquerade = snapshot_text(exit_node.get("masquerade"), "")
    return [
        f"exit node: offering, masquerading {masquerade}" if masquerade else "exit node: offering"
    ]


def _header_line(snapshot: Snapshot, now: float) -> str:
    title = (
        snapshot_text(snapshot.get("interface"), "")
        or snapshot_text(snapshot.get("name"), "")
        or "p2pvpn"
    )
    parts = [title]
    address = snapshot_text(snapshot.get("address"), "")
    if address:
        parts.append(address)
    details = []
    dataplane = snapshot_text(snapshot.get("dataplane"), "")
    if dataplane:
        for kind in ("udp", "tun"):
            offloads = snapshot.get(f"{kind}_offloads")
            if isinstance(offloads, list) and offloads:
                dataplane += f" {kind} " + "+".join(snapshot_text(offload) for offload in offloads)
        details.append(f"dataplane: {dataplane}")
    details += process_details(snapshot, now)
    if details:
        parts.append(f"({', '.join(details)})")
    return _GAP.join(parts)


def _server_line(server: Snapshot, now: float) -> str:
    state = snapshot_text(server.get("state"), "unknown")
    connected = state == "connected"
    since = snapshot_number(server.get("connected_since"))
    # connected_since may be left over from an earlier connection: only a live
    # connection has a meaningful "for".
    if connected and since is not None:
        state += f" for {format_duration(now - since)}"
    url = display_url(snapshot_text(server.get("url")))  # also from a client that did not redact it
    index, count = snapshot_integer(server.get("index")), snapshot_integer(server.get("servers"))
    if index is not None and count is not None and count > 1:
        url += f" ({index} of {count})"
    line = "server".ljust(_LABEL_WIDTH) + f"{url}{_GAP}{state}"
    notes = [] if connected else _retry_notes(server, now)
    reconnects = snapshot_integer(server.get("reconnects"))
    if reconnects is not None:
        notes.append(f"reconnects: {reconnects}")
    switches = snapshot_integer(server.get("switches"))
    if switches:
        notes.append(f"server switches: {switches}")
    if notes:
        line += f"{_GAP}({'; '.join(notes)})"
    return line


def _retry_notes(server: Snapshot, now: float) -> list[str]:
    """How long and how often a client without a server has been trying to reach it."""
    failed = snapshot_integer(server.get("failed_attempts"))
    if not failed:
        return []
    attempts = f"{failed} failed attempt{'' if failed == 1 else 's'}"
    since = snapshot_number(server.get("retrying_since"))
    if since is None:
        return [attempts]
    return [f"retrying for {format_duration(now - since)}, {attempts}"]


def _counters(counters: Snapshot, direction: str) -> str:
    packets = snapshot_integer(counters.get(f"packets_{direction}"))
    count = "-" if packets is None else str(packets)
    return f"{direction} {count} pkts / {_size_or_dash(counters.get(f'bytes_{direction}'))}"


def _traffic_lines(snapshot: Snapshot) -> list[str]:
    rows = []
    for kind in ("relay", "direct"):
        counters = _mapping(snapshot.get(kind))
        if not counters:
            continue
        row = [kind, _counters(counters, "out"), _counters(counters, "in")]
        dropped = snapshot_integer(counters.get("dropped"))
        if dropped:
            row.append(f"dropped {dropped}")
        rows.append(row)
    return _aligned(rows)


def _drops_lines(snapshot: Snapshot) -> list[str]:
    counted = []
    for reason, value in _mapping(snapshot.get("drops")).items():
        count = snapshot_integer(value)
        if count:
            counted.append(f"{snapshot_text(reason)} {count}")
    return _labelled("drops", [", ".join(counted)]) if counted else []


def _ip_order(value: object) -> tuple[int, int, str]:
    """Sort key: addresses numerically, anything unparsable after them."""
    text = snapshot_text(value, "")
    try:
        return (0, int(ipaddress.IPv4Address(text)), text)
    except ValueError:
        return (1, 0, text)


def _rtt(value: object) -> str:
    rtt = snapshot_number(value)
    if rtt is None:
        return "-"
    return f"{rtt:.1f} ms" if rtt < 100 else f"{rtt:.0f} ms"


def _peer_lines(snapshot: Snapshot) -> list[str]:
    peers = sorted(_records(snapshot.get("peers")), key=lambda peer: _ip_order(peer.get("tun_ip")))
    if not peers:
        return ["no peers yet"]
    # The NAME column only from a client that knows names (issue 16).
    named = any(snapshot_text(peer.get("name"), "") for peer in peers)
    rows = [["PEER", *(["NAME"] if named else []), "STATE", "PATH", "RTT", "OUT", "IN"]]
    rows[0] += ["IN STATE", "RETRY"]
    for peer in peers:
        name = [snapshot_text(peer.get("name"), "") or "-"] if named else []
        rows.append(
            [
                snapshot_text(peer.get("tun_ip")),
                *name,
                snapshot_text(peer.get("state")),
                snapshot_text(peer.get("path")),
                _rtt(peer.get("rtt_ms")),
                _size_or_dash(peer.get("bytes_out")),
                _size_or_dash(peer.get("bytes_in")),
                _duration_or_dash(peer.get("state_seconds")),
                _duration_or_dash(peer.get("retry_seconds")),
            ]
        )
    return _aligned(rows)


def _name_lines(snapshot: Snapshot) -> list[str]:
    """``name  laptop.vpn`` and how DNS answers for the domain (issue 16)."""
    hostname = snapshot_text(snapshot.get("hostname"), "")
    if not hostname:
        return []
    domain = snapshot_text(snapshot.get("domain"), "")
    lines = ["name".ljust(_LABEL_WIDTH) + (f"{hostname}.{domain}" if domain else hostname)]
    dns = _mapping(snapshot.get("dns"))
    if dns:
        lines.append("dns".ljust(_LABEL_WIDTH) + _dns_text(dns))
    return lines


def _dns_text(dns: Snapshot) -> str:
    listening = snapshot_text(dns.get("listening"), "")
    parts = [f"on {listening}" if listening else "off"]
    resolved = snapshot_text(dns.get("resolved"), "")
    if resolved:
        parts.append(f"systemd-resolved: {resolved}")
    counts = [
        f"{snapshot_integer(dns.get(key)) or 0} {key}"
        for key in ("queries", "answered", "nxdomain", "refused")
    ]
    return _GAP.join(parts) + f"{_GAP}({', '.join(counts)})"


def _names_table_lines(snapshot: Snapshot) -> list[str]:
    names = sorted(_records(snapshot.get("names")), key=lambda item: _ip_order(item.get("address")))
    if not names:
        return []
    rows = [["ADDRESS", "NAME", "EXIT NODE", "SOURCE"]]
    rows.extend(
        [
            snapshot_text(item.get("address")),
            snapshot_text(item.get("name")),
            "yes" if item.get("exit_node") is True else "-",
            snapshot_text(item.get("source"))
            + ("" if item.get("p2pvpn") is not False else " (candy)"),
        ]
        for item in names
    )
    return ["", *_aligned(rows)]


def _route_lines(snapshot: Snapshot) -> list[str]:
    routes = sorted(
        _records(snapshot.get("routes")), key=lambda route: _ip_order(route.get("destination"))
    )
    if not routes:
        return []
    rows = [["ROUTE", "NEXT HOP", "DELAY"]]
    for route in routes:
        delay = snapshot_integer(route.get("delay_ms"))
        rows.append(
            [
                snapshot_text(route.get("destination")),
                snapshot_text(route.get("next_hop")),
                "-" if delay is None else f"{delay} ms",
            ]
        )
    return ["", *_aligned(rows)]


def _sysroute_lines(snapshot: Snapshot) -> list[str]:
    sysroutes = _records(snapshot.get("sysroutes"))
    if not sysroutes:
        return []
    rows = [["SYSROUTE", "NEXT HOP"]]
    rows.extend(
        [snapshot_text(item.get("network")), snapshot_text(item.get("nexthop"))]
        for item in sysroutes
    )
    return ["", *_aligned(rows)]


def _refused_sysroute_lines(snapshot: Snapshot) -> list[str]:
    refused = _records(snapshot.get("sysroutes_refused"))
    if not refused:
        return []
    rows = [["REFUSED SYSROUTE", "NEXT HOP", "REASON"]]
    rows.extend(
        [
            snapshot_text(item.get("network")),
            snapshot_text(item.get("nexthop")),
            snapshot_text(item.get("reason")),
        ]
        for item in refused
    )
    return ["", *_aligned(rows)]
