"""The local control socket of a running client or server, both ends.

A running process (`p2pvpn run` or `p2pvpn server`) serves a snapshot of its
state on a unix socket: the caller sends one line (``status``), the process
answers one line of JSON and closes. The socket is mode 0600 because the
snapshot shows the network's topology (addresses, public endpoints, routes),
and no key named "password" ever leaves it (`scrub_snapshot`).

`ControlServer` is the serving end, `query_snapshot` the asking end;
`p2pvpn.client.control` and `p2pvpn.server.status` say where each socket is
and word the errors for their users.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from p2pvpn._format import format_duration

__all__ = [
    "ControlError",
    "ControlInUseError",
    "ControlServer",
    "NotListeningError",
    "Snapshot",
    "make_parent_directory",
    "process_details",
    "query_snapshot",
    "scrub_snapshot",
    "snapshot_integer",
    "snapshot_number",
    "snapshot_text",
    "socket_answers",
]

logger = logging.getLogger(__name__)

Snapshot = dict[str, object]

# A command is one short word: anything longer is garbage, not a request.
_REQUEST_LIMIT = 1024
# A caller that connects and never sends its line must not hold a connection forever.
_REQUEST_TIMEOUT = 5.0
# Probing whether a socket is alive must not make `status` (or a start) feel slow.
_PROBE_TIMEOUT = 0.5
# Protects `status` from a runaway or hostile answer; real snapshots are a few KiB.
_MAX_RESPONSE = 16 * 1024 * 1024
_DIRECTORY_MODE = 0o700


class ControlError(OSError):
    """The control socket cannot be served or queried; the message is for the user.

    An OSError so that the node and the server, which already report OSError
    from start-up as a clean exit with a message, need no extra case.
    """


class ControlInUseError(ControlError):
    """Another live process already serves the socket's path."""


class NotListeningError(ControlError):
    """Nothing listens on the socket: no file there, or a stale one (`stale`).

    The caller knows what should be listening and says how to start it.
    """

    def __init__(self, path: Path, *, stale: bool) -> None:
        self.path = path
        self.stale = stale
        # For the caller's own message: "... (no control socket at PATH)".
        self.reason = "stale control socket" if stale else "no control socket"
        super().__init__(f"nothing answers on {path} ({self.reason})")


def make_parent_directory(path: Path) -> None:
    """Create the socket's directory, private (0700), when it does not exist yet.

    An existing directory ($XDG_RUNTIME_DIR, /tmp, one the user chose) is left as
    it is: the socket's own mode 0600 keeps others out.
    """
    path.parent.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)


# --------------------------------------------------------------------------- serving


class ControlServer:
    """Serves `snapshot()` as one JSON line to each `status` request on a unix socket.

    ``role`` ("client", "server") names the process in messages; ``prepare``
    readies the socket's directory before binding and may raise an OSError.
    """

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], Snapshot],
        *,
        role: str,
        prepare: Callable[[Path], None] = make_parent_directory,
    ) -> None:
        self.path = path
        self.role = role
        self._snapshot = snapshot
        self._prepare = prepare
        self._server: asyncio.Server | None = None
        # (st_dev, st_ino) of the socket we bound: close() only removes that one,
        # never a socket a newer instance put at the same path.
        self._identity: tuple[int, int] | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Bind and listen; raises ControlError when the socket cannot be served."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        self._prepare(self.path)
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
        # Unlink before waiting, so a restarted process can bind at once.
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
        if await asyncio.to_thread(socket_answers, self.path):
            raise ControlInUseError(
                f"another p2pvpn {self.role} is already running with control socket {self.path}"
            )
        # Left behind by a process that did not exit cleanly (SIGKILL, crash).
        logger.debug("removing stale control socket %s", self.path)
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            # Another user's socket in a shared directory such as /tmp.
            reason = exc.strerror or str(exc)
            raise ControlError(
                f"cannot remove the stale control socket {self.path}: {reason}"
            ) from exc

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
            # Either way it is that caller's problem, not this process's.
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
            return _json_line(scrub_snapshot(self._snapshot()))
        except Exception:
            logger.exception("status snapshot failed")
            return _json_line({"error": f"status snapshot failed (see the {self.role}'s log)"})


def _json_line(value: Snapshot) -> bytes:
    # default=str: a snapshot may hold IPv4Address and friends.
    return json.dumps(value, default=str, separators=(",", ":")).encode() + b"\n"


def socket_answers(path: Path) -> bool:
    """Whether a process listens on the unix socket `path` (a stale one refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_PROBE_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            return True  # a full backlog still means somebody is listening
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- asking


def query_snapshot(path: Path, *, peer: str, role: str, timeout: float = 3.0) -> Snapshot:
    """Ask the process serving `path` for its snapshot.

    ``peer`` names it in messages ("client a", "server"), ``role`` says who
    started it ("client", "server"). Raises NotListeningError when nothing
    listens there, ControlError for everything else.
    """
    response = _request(path, b"status\n", timeout, peer, role)
    try:
        answer = json.loads(response)
    except ValueError as exc:
        raise ControlError(f"{peer} sent a malformed answer on {path}") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"{peer} sent a malformed answer on {path}")
    if set(answer) == {"error"}:
        raise ControlError(f"{peer} answered: {answer['error']}")
    return scrub_snapshot(answer)


def _connect(sock: socket.socket, path: Path, timeout: float, peer: str, role: str) -> None:
    try:
        sock.connect(os.fspath(path))
    except FileNotFoundError as exc:
        raise NotListeningError(path, stale=False) from exc
    except ConnectionRefusedError as exc:
        raise NotListeningError(path, stale=True) from exc
    except PermissionError as exc:
        raise ControlError(
            f"permission denied on {path} (run as the user that started the {role})"
        ) from exc
    except TimeoutError as exc:
        raise ControlError(f"{peer} did not accept within {timeout:g}s ({path})") from exc
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from exc


def _request(path: Path, request: bytes, timeout: float, peer: str, role: str) -> bytes:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path, timeout, peer, role)
        try:
            sock.sendall(request)
            return _read_line(sock, deadline, peer)
        except ControlError:
            raise  # already worded for the user (and an OSError, like the cases below)
        except TimeoutError as exc:
            raise ControlError(f"{peer} did not answer within {timeout:g}s ({path})") from exc
        except OSError as exc:
            raise ControlError(f"connection to {peer} failed: {exc.strerror or exc}") from exc


def _read_line(sock: socket.socket, deadline: float, peer: str) -> bytes:
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
            raise ControlError(f"{peer} sent an oversized answer")
    if not chunks:
        raise ControlError(f"{peer} closed the connection without answering")
    return b"".join(chunks)


# --------------------------------------------------------------------------- secrets


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and key.lower() == "password"


def _scrub(value: object) -> object:
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items() if not _is_secret(key)}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def scrub_snapshot(snapshot: Snapshot) -> Snapshot:
    """A copy without any key named "password", however deep: status must never show it."""
    return {key: _scrub(value) for key, value in snapshot.items() if not _is_secret(key)}


# --------------------------------------------------------------------------- reading


def snapshot_number(value: object) -> float | None:
    """A finite number of a snapshot as a float; None for anything else (missing, odd)."""
    # bool is an int subclass, but True packets is nonsense: treat it as missing.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def snapshot_integer(value: object) -> int | None:
    """A snapshot number as an int (counters, pids); None when missing or odd."""
    number = snapshot_number(value)
    return None if number is None else int(number)


def process_details(snapshot: Snapshot, now: float) -> list[str]:
    """``pid N``, ``up 2h05m``, ``version V`` of a client's or server's snapshot, as known."""
    details = []
    pid = snapshot_integer(snapshot.get("pid"))
    if pid is not None:
        details.append(f"pid {pid}")
    started = snapshot_number(snapshot.get("started"))
    if started is not None:
        details.append(f"up {format_duration(now - started)}")
    version = snapshot_text(snapshot.get("version"), "")
    if version:
        details.append(f"version {version}")
    return details


def snapshot_text(value: object, default: str = "-") -> str:
    """A snapshot value for a terminal: `default` when missing, no raw control characters."""
    if value is None or value == "":
        return default
    # Non-printable characters could drive the terminal: never print them raw.
    return "".join(char if char.isprintable() else "?" for char in str(value))
