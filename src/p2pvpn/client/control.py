"""The local control socket of a running client.

The client node serves a snapshot of its state on a unix socket in its state
directory: the caller sends one line (``status``), the node answers one line of
JSON and closes. `p2pvpn.client.status` is the other end. The socket is mode
0600 because the snapshot shows the network's topology (peer addresses, public
endpoints, routes).
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from p2pvpn.client.store import prepare_state_directory

__all__ = [
    "SOCKET_NAME",
    "ControlError",
    "ControlServer",
    "Snapshot",
    "control_socket_path",
    "scrub_snapshot",
    "socket_answers",
]

logger = logging.getLogger(__name__)

Snapshot = dict[str, object]

SOCKET_NAME = "control.sock"
# A command is one short word: anything longer is garbage, not a request.
_REQUEST_LIMIT = 1024
# A client that connects and never sends its line must not hold a connection forever.
_REQUEST_TIMEOUT = 5.0
# Probing whether a socket is alive must not make `status` (or a start) feel slow.
_PROBE_TIMEOUT = 0.5


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
        # Raises StateDirectoryError (an OSError) for a directory that is not private.
        prepare_state_directory(self.path.parent)
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
        if await asyncio.to_thread(socket_answers, self.path):
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
            return _json_line(scrub_snapshot(self._snapshot()))
        except Exception:
            logger.exception("status snapshot failed")
            return _json_line({"error": "status snapshot failed (see the client's log)"})


def _json_line(value: Snapshot) -> bytes:
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
