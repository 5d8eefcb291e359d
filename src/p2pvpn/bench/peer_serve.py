"""`p2pvpn bench serve`, and the bench server that follows a client's VPN address.

A member answers `p2pvpn bench peer` from others only when it agreed to: it
runs `p2pvpn bench serve` next to its client, or its client has
``bench_server = true``. Either way the server listens on the VPN address
alone (never 0.0.0.0: the underlay and the LAN must not reach it), and moves
when the server hands the client another address.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from p2pvpn.bench.peer_server import FollowingBenchServer
from p2pvpn.bench.peer_status import ClientView, read_client
from p2pvpn.bench.report import BenchError

__all__ = ["serve_bench", "wait_for_address"]

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often `bench serve` asks the client whether its address moved
ADDRESS_POLL_SECONDS = 0.5  # while waiting for the first address


def wait_for_address(
    read: Callable[[], ClientView], timeout: float, stop: threading.Event
) -> str | None:
    """The client's VPN address, waiting up to ``timeout`` s for one; None when stopped."""
    deadline = time.monotonic() + timeout
    problem = "it has no VPN address yet"
    while not stop.is_set():
        try:
            client = read()
        except BenchError as exc:
            problem = str(exc)
        else:
            if client.address is not None:
                return str(client.address.ip)
        if time.monotonic() >= deadline:
            raise BenchError(f"no VPN address to serve on after {timeout:g} s: {problem}")
        stop.wait(ADDRESS_POLL_SECONDS)
    return None


def _current_address(read: Callable[[], ClientView]) -> str | None:
    """The client's address now; None when it has none or does not answer (keep serving)."""
    try:
        client = read()
    except BenchError as exc:
        logger.warning("cannot ask the client for its address: %s", exc)
        return None
    return None if client.address is None else str(client.address.ip)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _refuse_if_client_serves(client: ClientView, port: int) -> None:
    if client.bench_server is not None and client.bench_server.endswith(f":{port}"):
        raise BenchError(
            f"client {client.name or 'default'} already answers benchmarks on "
            f"{client.bench_server} (bench_server = true): `bench serve` is not needed"
        )


def serve_bench(
    name: str | None,
    state_dir: Path,
    port: int,
    wait: float,
    *,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``); 0 then. BenchError when it cannot start."""
    stop = stop if stop is not None else threading.Event()

    def read() -> ClientView:
        return read_client(name, state_dir)

    with _stop_on_signals(stop):
        address = wait_for_address(read, wait, stop)
        if address is None:
            return 0
        _refuse_if_client_serves(read(), port)
        server = FollowingBenchServer(port)
        try:
            server.follow(address)
            logger.info("answering `p2pvpn bench peer` on %s", server.endpoint)
            _follow_until_stopped(server, read, stop)
        finally:
            server.stop()
    logger.info("bench server stopped")
    return 0


def _follow_until_stopped(
    server: FollowingBenchServer, read: Callable[[], ClientView], stop: threading.Event
) -> None:
    while not stop.wait(POLL_SECONDS):
        address = _current_address(read)
        if address is None or address == server.address:
            continue
        logger.info("the client's address is now %s: moving the bench server", address)
        try:
            server.follow(address)
        except BenchError as exc:
            logger.error("%s (trying again in %g s)", exc, POLL_SECONDS)
        else:
            logger.info("answering `p2pvpn bench peer` on %s", server.endpoint)
