"""A control server on a background event loop, and a snapshot to serve, for the status tests."""

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2pvpn.client.control import client_control_server
from p2pvpn.control import ControlServer

NOW = 1764003720.0

EXAMPLE: dict[str, object] = {
    "name": "a",
    "interface": "p2pvpn-a",
    "address": "10.0.0.1/24",
    "version": "0.1.0",
    "dataplane": "pure",
    "pid": 1234,
    "started": NOW - 3720,
    "server": {
        "url": "ws://192.0.2.1:8080/",
        "state": "connected",
        "connected_since": NOW - 312,
        "reconnects": 0,
    },
    "relay": {"packets_out": 10, "bytes_out": 840, "packets_in": 10, "bytes_in": 840, "dropped": 0},
    "direct": {"packets_out": 0, "bytes_out": 0, "packets_in": 0, "bytes_in": 0},
    "peers": [
        {
            "tun_ip": "10.0.0.2",
            "state": "CONNECTED",
            "path": "direct 198.51.100.7:40123",
            "rtt_ms": 1.4,
            "packets_out": 5,
            "bytes_out": 420,
            "packets_in": 5,
            "bytes_in": 420,
            "state_seconds": 12.0,
            "retry_seconds": 30,
        }
    ],
    "routes": [{"destination": "10.0.0.3", "next_hop": "10.0.0.2", "delay_ms": 3}],
    "sysroutes": [{"network": "172.30.0.0/16", "nexthop": "10.0.0.9"}],
    "drops": {"authentication": 0},
}


class BackgroundLoop:
    """An event loop in a thread, so synchronous clients can talk to the server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def serving(
    path: Path,
    snapshot: Callable[[], dict[str, object]] = lambda: EXAMPLE,
    make_server: Callable[[Path, Callable[[], dict[str, object]]], ControlServer] = (
        client_control_server
    ),
) -> Iterator[ControlServer]:
    """`make_server(path, snapshot)` serving on a background loop (default: a client's)."""
    background = BackgroundLoop()
    server = make_server(path, snapshot)
    try:
        background.run(server.start())
        yield server
    finally:
        background.run(server.close())
        background.stop()


def raw_request(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed client leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


@contextlib.contextmanager
def short_tmp_dir() -> Iterator[Path]:
    """A fresh directory under /tmp, removed at the end.

    Not pytest's tmp_path: AF_UNIX paths are limited to 107 bytes and pytest's
    per-test directories (named after the test) can exceed that.
    """
    root = Path(tempfile.mkdtemp(prefix="p2c-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
