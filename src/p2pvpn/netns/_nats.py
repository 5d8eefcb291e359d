"""A NATS server (with JetStream) for relay clusters: on loopback or in a namespace.

The tests, the demo and the load benchmark start their own ``nats-server``
(Debian's package), never a system service: `LocalNatsServer` on a free
loopback port of this machine, `nats_server_argv` for a `TestBed` process in
a namespace. Its JetStream store lives in a directory the caller owns, so a
restart on the same directory keeps the key-value buckets, as a real
deployment's would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "NATS_PORT",
    "NATS_SERVER",
    "LocalNatsServer",
    "free_tcp_port",
    "nats_server_argv",
]

NATS_SERVER = "nats-server"
NATS_PORT = 4222
# nats-server with JetStream answers within a second here; a loaded CI machine is slower.
_START_TIMEOUT = 20.0
_STOP_GRACE = 5.0


def nats_server_argv(
    store_dir: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = NATS_PORT,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a JetStream-enabled nats-server listening on ``host:port``.

    ``extra``: more options, e.g. ``["--user", "u", "--pass", "p"]``.
    """
    return [NATS_SERVER, "-a", host, "-p", str(port), "-js", "-sd", str(store_dir), *extra]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class LocalNatsServer:
    """``nats-server -js`` on a free loopback port of this machine, stopped on exit.

    ``url`` is what ``p2pvpn server --cluster`` takes. `stop` and `start` on
    the same object keep port and store, for outage tests.
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra: Sequence[str] = (),
    ) -> None:
        if shutil.which(NATS_SERVER) is None:
            raise FileNotFoundError(
                f"{NATS_SERVER} is not installed (Debian: apt-get install nats-server)"
            )
        self.host = host
        self.port = port or free_tcp_port(host)
        self.store_dir = Path(store_dir)
        self.log_path = self.store_dir / "nats-server.log"
        self._extra = tuple(extra)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The nats-server process while it runs (for its CPU time and memory)."""
        return self._process.pid if self.running() and self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start and wait until it accepts connections; raises RuntimeError naming its log."""
        if self.running():
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = nats_server_argv(
            self.store_dir / "jetstream", host=self.host, port=self.port, extra=self._extra
        )
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while not _accepts(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server on {self.url} did not start:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalNatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
