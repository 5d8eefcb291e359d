"""Local control socket of a running client, and the `p2pvpn status` command.

The client node serves a snapshot of its state on a unix socket in its state
directory: the caller sends one line (``status``), the node answers one line of
JSON and closes. `p2pvpn status` is the synchronous other end; it prints the
snapshot as a table or as JSON. The socket is mode 0600 because the snapshot
shows the network's topology (peer addresses, public endpoints, routes).
"""

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "SOCKET_NAME",
    "ControlError",
    "ControlServer",
    "control_socket_path",
    "format_duration",
    "format_size",
    "format_status",
    "print_status",
    "query_status",
]

logger = logging.getLogger(__name__)

Snapshot = dict[str, object]

SOCKET_NAME = "control.sock"
DEFAULT_NAME = "default"
# A command is one short word: anything longer is garbage, not a request.
_REQUEST_LIMIT = 1024
# A client that connects and never sends its line must not hold a connection forever.
_REQUEST_TIMEOUT = 5.0
# Protects `status` from a runaway or hostile answer; real snapshots are a few KiB.
_MAX_RESPONSE = 16 * 1024 * 1024
# Probing whether a socket is alive must not make `status` feel slow.
_PROBE_TIMEOUT = 0.5
_LABEL_WIDTH = 10
_GAP = "  "


class ControlError(OSError):
    """The control socket cannot be served or queried; the message is for the user.

    An OSError so that the node, which already reports OSError from start-up
    as a clean exit with a message, needs no extra case.
    """


def control_socket_path(state_dir: Path) -> Path:
    """Where the client whose state directory is `state_dir` serves its control socket."""
    return state_dir / SOCKET_NAME


# --------------------------------------------------------------------------- server


class ControlServer:
    """Serves `snapshot()` as one JSON line to each `status` request on a unix socket."""

    def __init__(self, path: Path, snapshot: Callable[[], Snapshot]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._server: asyncio.Server | None = None
        # (st_dev, st_ino) of the socket we bound: close() only removes that one,
        # never a socket a newer instance put at the same path.
        self._identity: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind and listen; raises ControlError when the socket cannot be served."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._remove_stale()
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=_REQUEST_LIMIT
            )
        except BaseException:
            sock.close()
            self._unlink_if_ours()
            raise
        logger.debug("control socket listening at %s", self.path)

    async def close(self) -> None:
        """Stop listening and remove the socket file. Safe to call more than once."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Unlink before waiting, so a restarted client can bind at once.
        self._unlink_if_ours()
        await server.wait_closed()

    async def __aenter__(self) -> "ControlServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            # Not ours to delete: a file the user put there by mistake stays.
            raise ControlError(
                f"cannot create control socket: {self.path} exists and is not a socket"
            )
        if await _socket_answers(self.path):
            raise ControlError(
                f"another p2pvpn client is already running with control socket {self.path}"
            )
        # Left behind by a client that did not exit cleanly (SIGKILL, crash).
        logger.debug("removing stale control socket %s", self.path)
        self.path.unlink(missing_ok=True)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(os.fspath(self.path))
            bound = True
            # chmod before listen(): nobody can connect until then, so there is no
            # window in which the socket is reachable with the umask's permissions.
            os.chmod(self.path, 0o600)
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        except OSError as exc:
            sock.close()
            if bound:
                self.path.unlink(missing_ok=True)
            reason = exc.strerror or str(exc)
            raise ControlError(f"cannot create control socket {self.path}: {reason}") from exc
        return sock

    def _unlink_if_ours(self) -> None:
        identity, self._identity = self._identity, None
        if identity is None:
            return
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == identity:
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT)
            if line:  # an empty read is a probe that connected and closed
                writer.write(self._reply(line))
                await writer.drain()
        except (OSError, ValueError) as exc:
            # ValueError: a line over _REQUEST_LIMIT; OSError includes the timeout.
            # Either way it is that caller's problem, not the server's.
            logger.debug("control client dropped: %r", exc)
        except Exception:
            logger.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _reply(self, line: bytes) -> bytes:
        command = line.decode("utf-8", "replace").strip()
        if command != "status":
            return _json_line({"error": "unknown command"})
        try:
            # default=str: the node may hand over IPv4Address and friends.
            return _json_line(_scrub_snapshot(self._snapshot()))
        except Exception:
            logger.exception("status snapshot failed")
            return _json_line({"error": "status snapshot failed (see the client's log)"})


def _json_line(value: Snapshot) -> bytes:
    return json.dumps(value, default=str, separators=(",", ":")).encode() + b"\n"


async def _socket_answers(path: Path) -> bool:
    try:
        connecting = asyncio.open_unix_connection(os.fspath(path))
        _, writer = await asyncio.wait_for(connecting, _PROBE_TIMEOUT)
    except TimeoutError:
        return True  # a full backlog still means somebody is listening
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# --------------------------------------------------------------------------- client


def query_status(path: Path, timeout: float = 3.0) -> Snapshot:
    """Ask the client serving `path` for its snapshot; raises ControlError."""
    name = path.parent.name or DEFAULT_NAME
    response = _request(path, b"status\n", timeout, name)
    try:
        answer = json.loads(response)
    except ValueError as exc:
        raise ControlError(f"client {name} sent a malformed answer on {path}") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"client {name} sent a malformed answer on {path}")
    if set(answer) == {"error"}:
        raise ControlError(f"client {name} answered: {answer['error']}")
    return _scrub_snapshot(answer)


def _request(path: Path, request: bytes, timeout: float, name: str) -> bytes:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError as exc:
            raise ControlError(
                f"no p2pvpn client running for {name} (no control socket at {path})"
            ) from exc
        except ConnectionRefusedError as exc:
            raise ControlError(
                f"no p2pvpn client running for {name} (stale control socket at {path})"
            ) from exc
        except PermissionError as exc:
            raise ControlError(
                f"permission denied on {path} (run as the user that started the client)"
            ) from exc
        except TimeoutError as exc:
            raise ControlError(
                f"client {name} did not accept within {timeout:g}s ({path})"
            ) from exc
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(request)
            return _read_line(sock, deadline, name)
        except ControlError:
            raise  # already worded for the user (and an OSError, like the cases below)
        except TimeoutError as exc:
            raise ControlError(
                f"client {name} did not answer within {timeout:g}s ({path})"
            ) from exc
        except OSError as exc:
            raise ControlError(
                f"connection to client {name} failed: {exc.strerror or exc}"
            ) from exc


def _read_line(sock: socket.socket, deadline: float, name: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > _MAX_RESPONSE:
            raise ControlError(f"client {name} sent an oversized answer")
    if not chunks:
        raise ControlError(f"client {name} closed the connection without answering")
    return b"".join(chunks)


def print_status(name: str | None, as_json: bool, state_root: Path) -> int:
    """`p2pvpn status`: print client `name`'s snapshot; returns the exit code."""
    try:
        snapshot = query_status(_resolve_socket(name, state_root))
    except ControlError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(format_status(snapshot))
    return 0


def _resolve_socket(name: str | None, state_root: Path) -> Path:
    if name is not None:
        if "/" in name or name in (".", ".."):
            raise ControlError(f"invalid client name {name!r}")
        return control_socket_path(state_root / (name or DEFAULT_NAME))
    found = _find_sockets(state_root)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        # Sockets of crashed clients linger: prefer the one client that is alive.
        alive = [path for path in found if _accepts(path)]
        if len(alive) == 1:
            return alive[0]
        names = ", ".join(path.parent.name for path in (alive or found))
        raise ControlError(
            f"several p2pvpn clients under {state_root} ({names}): choose one with --name"
        )
    return control_socket_path(state_root / DEFAULT_NAME)


def _find_sockets(state_root: Path) -> list[Path]:
    try:
        candidates = sorted(state_root.glob(f"*/{SOCKET_NAME}"))
    except OSError:
        return []
    return [path for path in candidates if path.is_socket()]


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_PROBE_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            return True  # a full backlog still means somebody is listening
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- secrets


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and key.lower() == "password"


def _scrub(value: object) -> object:
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items() if not _is_secret(key)}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def _scrub_snapshot(snapshot: Snapshot) -> Snapshot:
    """A copy without any key named "password", however deep: status must never show it."""
    return {key: _scrub(value) for key, value in snapshot.items() if not _is_secret(key)}


# --------------------------------------------------------------------------- formatting


def format_size(size: float) -> str:
    """Bytes in binary units: ``840 B``, ``1.5 KiB``, ``12.0 MiB``."""
    if size < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Compare the rounded value, so 1023.99 KiB shows as 1.0 MiB, not 1024.0 KiB.
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Two most significant units: ``45s``, ``5m12s``, ``1h02m``, ``2d03h``."""
    # Negative spans come from clock steps between the client and us: show 0.
    total = max(0, int(seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _number(value: object) -> float | None:
    # bool is an int subclass, but True packets is nonsense: treat it as missing.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: object) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _text(value: object, default: str = "-") -> str:
    if value is None or value == "":
        return default
    # Non-printable characters could drive the terminal: never print them raw.
    return "".join(char if char.isprintable() else "?" for char in str(value))


def _mapping(value: object) -> Snapshot:
    return value if isinstance(value, dict) else {}


def _records(value: object) -> list[Snapshot]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _size_or_dash(value: object) -> str:
    number = _number(value)
    return "-" if number is None else format_size(number)


def _duration_or_dash(value: object) -> str:
    number = _number(value)
    return "-" if number is None else format_duration(number)


def _align(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns as wide as their content; rows may be ragged."""
    widths: list[int] = []
    for row in rows:
        for index, cell in enumerate(row):
            if index == len(widths):
                widths.append(0)
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[index]) for index, cell in enumerate(row)]
        lines.append((indent + _GAP.join(cells)).rstrip())
    return lines


def _labelled(label: str, lines: list[str]) -> list[str]:
    """Prefix the first line with `label` and indent the rest to match."""
    return [
        (label if index == 0 else "").ljust(_LABEL_WIDTH) + line for index, line in enumerate(lines)
    ]


def format_status(snapshot: Snapshot, now: float | None = None) -> str:
    """The human-readable `p2pvpn status`; tolerates missing and malformed keys."""
    now = time.time() if now is None else now
    snapshot = _scrub_snapshot(snapshot)
    lines = [_header_line(snapshot, now)]
    server = _mapping(snapshot.get("server"))
    if server:
        lines.append(_server_line(server, now))
    lines.extend(_labelled("traffic", _traffic_lines(snapshot)))
    lines.extend(_drops_lines(snapshot))
    lines.append("")
    lines.extend(_peer_lines(snapshot))
    lines.extend(_route_lines(snapshot))
    lines.extend(_sysroute_lines(snapshot))
    return "\n".join(lines)


def _header_line(snapshot: Snapshot, now: float) -> str:
    title = _text(snapshot.get("interface"), "") or _text(snapshot.get("name"), "") or "p2pvpn"
    parts = [title]
    address = _text(snapshot.get("address"), "")
    if address:
        parts.append(address)
    details = []
    dataplane = _text(snapshot.get("dataplane"), "")
    if dataplane:
        offloads = snapshot.get("udp_offloads")
        if isinstance(offloads, list) and offloads:
            dataplane += " udp " + "+".join(_text(offload) for offload in offloads)
        details.append(f"dataplane: {dataplane}")
    pid = _integer(snapshot.get("pid"))
    if pid is not None:
        details.append(f"pid {pid}")
    started = _number(snapshot.get("started"))
    if started is not None:
        details.append(f"up {format_duration(now - started)}")
    version = _text(snapshot.get("version"), "")
    if version:
        details.append(f"version {version}")
    if details:
        parts.append(f"({', '.join(details)})")
    return _GAP.join(parts)


def _server_line(server: Snapshot, now: float) -> str:
    state = _text(server.get("state"), "unknown")
    since = _number(server.get("connected_since"))
    # connected_since may be left over from an earlier connection: only a live
    # connection has a meaningful "for".
    if state == "connected" and since is not None:
        state += f" for {format_duration(now - since)}"
    line = "server".ljust(_LABEL_WIDTH) + f"{_text(server.get('url'))}{_GAP}{state}"
    reconnects = _integer(server.get("reconnects"))
    if reconnects is not None:
        line += f"{_GAP}(reconnects: {reconnects})"
    return line


def _counters(counters: Snapshot, direction: str) -> str:
    packets = _integer(counters.get(f"packets_{direction}"))
    count = "-" if packets is None else str(packets)
    return f"{direction} {count} pkts / {_size_or_dash(counters.get(f'bytes_{direction}'))}"


def _traffic_lines(snapshot: Snapshot) -> list[str]:
    rows = []
    for kind in ("relay", "direct"):
        counters = _mapping(snapshot.get(kind))
        if not counters:
            continue
        row = [kind, _counters(counters, "out"), _counters(counters, "in")]
        dropped = _integer(counters.get("dropped"))
        if dropped:
            row.append(f"dropped {dropped}")
        rows.append(row)
    return _align(rows)


def _drops_lines(snapshot: Snapshot) -> list[str]:
    counted = []
    for reason, value in _mapping(snapshot.get("drops")).items():
        count = _integer(value)
        if count:
            counted.append(f"{_text(reason)} {count}")
    return _labelled("drops", [", ".join(counted)]) if counted else []


def _ip_order(value: object) -> tuple[int, int, str]:
    """Sort key: addresses numerically, anything unparsable after them."""
    text = _text(value, "")
    try:
        return (0, int(ipaddress.IPv4Address(text)), text)
    except ValueError:
        return (1, 0, text)


def _rtt(value: object) -> str:
    rtt = _number(value)
    if rtt is None:
        return "-"
    return f"{rtt:.1f} ms" if rtt < 100 else f"{rtt:.0f} ms"


def _peer_lines(snapshot: Snapshot) -> list[str]:
    peers = sorted(_records(snapshot.get("peers")), key=lambda peer: _ip_order(peer.get("tun_ip")))
    if not peers:
        return ["no peers yet"]
    rows = [["PEER", "STATE", "PATH", "RTT", "OUT", "IN", "IN STATE", "RETRY"]]
    for peer in peers:
        rows.append(
            [
                _text(peer.get("tun_ip")),
                _text(peer.get("state")),
                _text(peer.get("path")),
                _rtt(peer.get("rtt_ms")),
                _size_or_dash(peer.get("bytes_out")),
                _size_or_dash(peer.get("bytes_in")),
                _duration_or_dash(peer.get("state_seconds")),
                _duration_or_dash(peer.get("retry_seconds")),
            ]
        )
    return _align(rows)


def _route_lines(snapshot: Snapshot) -> list[str]:
    routes = sorted(
        _records(snapshot.get("routes")), key=lambda route: _ip_order(route.get("destination"))
    )
    if not routes:
        return []
    rows = [["ROUTE", "NEXT HOP", "DELAY"]]
    for route in routes:
        delay = _integer(route.get("delay_ms"))
        rows.append(
            [
                _text(route.get("destination")),
                _text(route.get("next_hop")),
                "-" if delay is None else f"{delay} ms",
            ]
        )
    return ["", *_align(rows)]


def _sysroute_lines(snapshot: Snapshot) -> list[str]:
    sysroutes = _records(snapshot.get("sysroutes"))
    if not sysroutes:
        return []
    rows = [["SYSROUTE", "NEXT HOP"]]
    rows.extend([_text(item.get("network")), _text(item.get("nexthop"))] for item in sysroutes)
    return ["", *_align(rows)]
