"""What `p2pvpn bench peer` reads from the local client: its status, the peer's row, its CPU.

The local client's control socket (the one `p2pvpn status` asks) says which
address we have, which process the client is (for its CPU time) and, per
peer, the path the traffic takes. Everything here turns those into the
figures and the errors of the peer bench; nothing here sends traffic.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pvpn.bench.report import BenchError
from p2pvpn.client.status import find_control_socket, query_status
from p2pvpn.control import ControlError, snapshot_number

__all__ = [
    "ClientView",
    "PeerTarget",
    "cpu_seconds",
    "find_peer",
    "not_member_error",
    "path_kind",
    "read_client",
    "resolve_target",
]

# The kinds of path `p2pvpn status` names in a peer row's "path", in its own words.
PATH_KINDS = ("direct", "lan", "relay client", "relay server")


@dataclass(frozen=True)
class ClientView:
    """The local client as one status snapshot shows it."""

    name: str
    address: ipaddress.IPv4Interface | None  # None while the client has no VPN address
    pid: int | None
    peers: tuple[dict[str, Any], ...]
    bench_server: str | None  # "ADDRESS:PORT" while the client answers benchmarks itself
    dataplane: str | None

    def peer_addresses(self) -> list[str]:
        return [str(row.get("tun_ip")) for row in self.peers]


@dataclass(frozen=True)
class PeerTarget:
    """Whom the bench measures: the peer's VPN address, and its name when status has one."""

    address: str
    name: str | None
    row: dict[str, Any] | None  # the peer's status row; None: the client has not seen it yet


def read_client(name: str | None, state_dir: Path) -> ClientView:
    """The local client's status, as `p2pvpn status -n NAME --state-dir DIR` would ask it."""
    try:
        snapshot = query_status(find_control_socket(name, state_dir))
    except ControlError as exc:
        raise BenchError(
            f"{exc}: `p2pvpn bench` measures through a running client "
            "(start it with `p2pvpn run`, or name it with -n/--state-dir)"
        ) from exc
    return client_view(snapshot)


def client_view(snapshot: dict[str, Any]) -> ClientView:
    """A snapshot's facts the bench uses; tolerates missing and malformed keys."""
    address: ipaddress.IPv4Interface | None
    try:
        address = ipaddress.IPv4Interface(str(snapshot.get("address")))
    except ValueError:
        address = None
    pid = snapshot_number(snapshot.get("pid"))
    peers = snapshot.get("peers")
    rows = tuple(row for row in peers if isinstance(row, dict)) if isinstance(peers, list) else ()
    bench_server = snapshot.get("bench_server")
    dataplane = snapshot.get("dataplane")
    return ClientView(
        name=str(snapshot.get("name") or ""),
        address=address,
        pid=None if pid is None else int(pid),
        peers=rows,
        bench_server=bench_server if isinstance(bench_server, str) else None,
        dataplane=dataplane if isinstance(dataplane, str) else None,
    )


def find_peer(client: ClientView, target: str) -> dict[str, Any] | None:
    """The status row of the peer ``target`` names: its VPN address, or its ``name`` field."""
    for row in client.peers:
        if row.get("tun_ip") == target:
            return row
    for row in client.peers:
        # Names come with issue 16; a row without one never matches.
        if isinstance(row.get("name"), str) and row.get("name") == target:
            return row
    return None


def resolve_target(client: ClientView, target: str) -> PeerTarget:
    """Whom ``target`` (NAME or ADDRESS) means; a BenchError when it cannot be a member.

    An address without a status row may still be a member the client has not
    exchanged a packet with yet: the caller sends one (the bench's hello) and
    asks again before calling it a stranger (`not_member_error`).
    """
    if client.address is None:
        raise BenchError(
            f"client {client.name or 'default'} has no VPN address yet "
            "(not logged in to its server): try again when `p2pvpn status` shows one"
        )
    row = find_peer(client, target)
    if row is not None:
        name = row.get("name")
        return PeerTarget(str(row.get("tun_ip")), name if isinstance(name, str) else None, row)
    try:
        address = ipaddress.IPv4Address(target)
    except ValueError:
        raise BenchError(
            f"no peer named {target!r} (peers: {_listing(client)}): give its VPN address"
        ) from None
    if address == client.address.ip:
        raise BenchError(f"{target} is this client's own address: name another member")
    if address not in client.address.network:
        raise not_member_error(target, client)
    return PeerTarget(str(address), None, None)


def not_member_error(target: str, client: ClientView) -> BenchError:
    # Our own packets to a stranger give it a row: it is not one of the peers.
    return BenchError(
        f"{target} is not a member of the network (peers: {_listing(client, target)})"
    )


def _listing(client: ClientView, exclude: str | None = None) -> str:
    peers = [address for address in client.peer_addresses() if address != exclude]
    return ", ".join(peers) or "none seen yet"


def path_kind(path: str | None) -> str:
    """A status path ("direct 1.2.3.4:5", "lan ...", "via 10.0.0.3", "relay server") as a kind."""
    if not path:
        return "unknown"
    if path.startswith("via "):
        return "relay client"
    for kind in PATH_KINDS:
        if path == kind or path.startswith(f"{kind} "):
            return kind
    return "unknown"


def describe_path(path: str | None) -> str:
    """The path as the table shows it: the kind first, status's details after it."""
    kind = path_kind(path)
    if kind == "relay client":
        return f"relay client {path.removeprefix('via ') if path else ''}".rstrip()
    return path or "unknown"


def cpu_seconds(pid: int | None, proc: Path = Path("/proc")) -> float | None:
    """User + system CPU seconds of process ``pid``, all its threads; None when unreadable.

    /proc/PID/stat sums the threads' times (fields 14 and 15, in clock ticks).
    A client in another PID namespace (a container) has a pid that means
    another process here: a process whose command line does not name p2pvpn
    is not taken for the client.
    """
    if pid is None:
        return None
    try:
        if b"p2pvpn" not in (proc / str(pid) / "cmdline").read_bytes():
            return None
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15 of the line
    except (IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")
