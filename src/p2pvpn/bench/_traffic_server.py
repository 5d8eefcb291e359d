"""`BenchServer`: answers bench tests on one port (TCP control and data, UDP), one at a time.

See `p2pvpn.bench.traffic` for the protocol and the rules against a hostile
member: bounded requests, one test at a time, datagrams sent only to the IP
of the control connection that asked, echoes no bigger than what came.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from p2pvpn import __version__
from p2pvpn.bench._traffic_io import (
    DRAIN_MAX,
    GRACE,
    JOIN_TIMEOUT,
    POLL,
    RECV_BUFFER,
    TCP_CHUNK,
    Lines,
    big_receive_buffer,
    bits_per_second,
    bulk_mode,
    close_gently,
    drain,
    join_all,
    send_line,
    send_paced,
)
from p2pvpn.bench._traffic_wire import (
    DEFAULT_PORT,
    ECHO,
    HELLO,
    UDP_DATA,
    IntervalMeter,
    Request,
    RequestError,
    UdpCounter,
    interval_json,
    parse_datagram,
    parse_request,
)
from p2pvpn.bench.report import BenchError

__all__ = ["BenchServer"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # for the first line of a connection
MAX_CONNECTIONS = 8


@dataclass
class _Test:
    """The one test the server runs; datagrams count only with its session and IP."""

    session: int
    client_ip: str
    request: Request
    counter: UdpCounter | None = None
    udp_peer: tuple[str, int] | None = None
    peer_known: threading.Event = field(default_factory=threading.Event)


class BenchServer:
    """Answers bench tests on ``address:port`` (TCP and UDP), one test at a time."""

    def __init__(
        self, address: str, port: int = DEFAULT_PORT, *, max_seconds: float = 60.0
    ) -> None:
        self._bind = (address, port)
        self.max_seconds = max_seconds
        self._tcp: socket.socket | None = None
        self._udp: socket.socket | None = None
        self._lock = threading.Lock()
        self._current: _Test | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handlers: set[threading.Thread] = set()
        self._connections: set[socket.socket] = set()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @property
    def address(self) -> tuple[str, int]:
        if self._tcp is None:
            return self._bind
        host, port = self._tcp.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind TCP and UDP on the same port and serve in daemon threads."""
        host, port = self._bind
        try:
            tcp = socket.create_server((host, port))
        except OSError as exc:
            raise BenchError(f"cannot listen for benchmarks on {host}:{port}: {exc}") from None
        udp = socket.socket(tcp.family, socket.SOCK_DGRAM)
        try:
            udp.bind((host, tcp.getsockname()[1]))
        except OSError as exc:
            tcp.close()
            udp.close()
            raise BenchError(f"cannot listen for benchmarks on {host}:{port}/udp: {exc}") from None
        big_receive_buffer(udp)
        tcp.settimeout(POLL)
        udp.settimeout(POLL)
        self._tcp, self._udp = tcp, udp
        for target, name in ((self._accept_loop, "accept"), (self._udp_loop, "udp")):
            thread = threading.Thread(target=target, name=f"bench-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("bench server listening on %s:%d (TCP and UDP)", *self.address)

    def stop(self) -> None:
        """Close every socket and join the threads (bounded); a second call does nothing."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            connections = list(self._connections)
            handlers = list(self._handlers)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        join_all(self._threads + handlers, JOIN_TIMEOUT)
        for sock in (self._tcp, self._udp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> BenchServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- accepting and datagrams ---------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                connection, peer = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(POLL)  # e.g. out of file descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                log.info("bench: too many connections, closing the one from %s", peer[0])
                connection.close()
                continue
            thread = threading.Thread(
                target=self._handle, args=(connection, str(peer[0])), daemon=True
            )
            with self._lock:
                self._connections.add(connection)
                self._handlers.add(thread)
            thread.start()

    def _udp_loop(self) -> None:
        assert self._udp is not None
        udp = self._udp
        buffer = bytearray(65536)
        view = memoryview(buffer)
        while not self._stopping.is_set():
            try:
                size, source = udp.recvfrom_into(buffer)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            now = time.monotonic()
            datagram = parse_datagram(view[:size])
            test = self._current
            if datagram is None or test is None or datagram.session != test.session:
                continue
            if source[0] != test.client_ip:
                continue  # never answer or count another address: no reflection
            if datagram.kind == UDP_DATA:
                with self._lock:
                    if test.counter is not None:
                        test.counter.feed(datagram, size, now)
            elif datagram.kind == ECHO:
                with contextlib.suppress(OSError):
                    udp.sendto(view[:size], source)
            elif datagram.kind == HELLO and test.udp_peer is None:
                test.udp_peer = (str(source[0]), int(source[1]))
                test.peer_known.set()

    # -- one connection --------------------------------------------------------------

    def _handle(self, connection: socket.socket, client_ip: str) -> None:
        lines = Lines(connection)
        try:
            request_line = lines.read(REQUEST_TIMEOUT)
            if request_line is None:
                return
            request = parse_request(request_line, max_seconds=self.max_seconds)
            self._serve(connection, lines, request, client_ip)
        except RequestError as exc:
            log.info("bench: refused a request from %s: %s", client_ip, exc)
            self._try_send(connection, {"error": str(exc)})
        except (OSError, BenchError) as exc:
            log.info("bench: the test of %s ended early: %s", client_ip, exc)
        finally:
            with self._lock:
                self._connections.discard(connection)
                self._handlers.discard(threading.current_thread())
            close_gently(connection)
            self._slots.release()

    @staticmethod
    def _try_send(connection: socket.socket, message: dict[str, Any]) -> None:
        try:
            connection.settimeout(1.0)
            send_line(connection, message)
        except OSError:
            pass

    def _serve(
        self, connection: socket.socket, lines: Lines, request: Request, client_ip: str
    ) -> None:
        if request.test == "hello":
            send_line(connection, {"version": __version__, "hostname": socket.gethostname()})
            return
        test = self._claim(request, client_ip)
        if test is None:
            log.info("bench: %s asked for %s while busy", client_ip, _describe(request))
            self._try_send(connection, {"error": "busy: another test is running, try later"})
            return
        log.info("bench: %s asked for %s", client_ip, _describe(request))
        try:
            connection.settimeout(GRACE)
            send_line(connection, {"ok": True, "session": test.session})
            outcome = self._run(connection, lines, test)
            log.info("bench: %s %s: %s", client_ip, _describe(request), outcome)
        finally:
            with self._lock:
                self._current = None

    def _claim(self, request: Request, client_ip: str) -> _Test | None:
        with self._lock:
            if self._current is not None:
                return None
            self._current = _Test(secrets.randbits(32), client_ip, request)
            return self._current

    def _run(self, connection: socket.socket, lines: Lines, test: _Test) -> str:
        request = test.request
        if request.test == "rtt":
            return self._serve_echo(lines, test)
        if request.test == "tcp":
            if request.reverse:
                return self._tcp_send(connection, lines, test)
            return self._tcp_receive(connection, lines, test)
        if request.reverse:
            return self._udp_send(connection, lines, test)
        return self._udp_receive(connection, lines, test)

    def _deadline(self, test: _Test) -> float:
        return time.monotonic() + test.request.seconds + GRACE

    def _serve_echo(self, lines: Lines, test: _Test) -> str:
        """Echo answers run in the UDP thread; this waits for the client to hang up."""
        deadline = self._deadline(test)
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                if lines.read(POLL) is None:
                    return "done"
            except TimeoutError:
                continue
        return "ended by the server"

    def _tcp_receive(self, connection: socket.socket, lines: Lines, test: _Test) -> str:
        meter = IntervalMeter()
        if rest := lines.take_rest():
            meter.add(time.monotonic(), rest)
        buffer = bytearray(RECV_BUFFER)
        deadline = self._deadline(test)
        reported = 0
        bulk_mode(connection, receive=POLL * 5, send=GRACE)
        while True:
            if time.monotonic() > deadline or self._stopping.is_set():
                raise RequestError("the client sent for longer than it asked for")
            try:
                size = connection.recv_into(buffer)
            except BlockingIOError:
                continue
            if not size:
                break
            meter.add(time.monotonic(), size)
            while reported < len(meter.done):
                send_line(connection, {"interval": interval_json(meter.done[reported])})
                reported += 1
        intervals = meter.finish()
        result = {"bytes": meter.total, "seconds": meter.seconds}
        send_line(
            connection, {"result": {**result, "intervals": [interval_json(i) for i in intervals]}}
        )
        return _mbit(bits_per_second(meter.total, meter.seconds))

    def _tcp_send(self, connection: socket.socket, lines: Lines, test: _Test) -> str:
        payload = bytes(TCP_CHUNK)
        end = time.monotonic() + test.request.seconds
        bulk_mode(connection, receive=GRACE, send=GRACE)
        while time.monotonic() < end and not self._stopping.is_set():
            connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        return self._client_report(lines)

    def _client_report(self, lines: Lines) -> str:
        """What the client measured (it sends a summary before it hangs up), for the log."""
        try:
            report = lines.read(GRACE + DRAIN_MAX)
        except TimeoutError:
            report = None
        result = report.get("result") if report else None
        if not isinstance(result, dict):
            return "the client reported nothing"
        return _summarize(result)

    def _udp_receive(self, connection: socket.socket, lines: Lines, test: _Test) -> str:
        counter = UdpCounter(test.session)
        with self._lock:
            test.counter = counter
        deadline = self._deadline(test)
        reported = 0
        while True:
            while reported < len(counter.meter.done):
                send_line(connection, {"interval": interval_json(counter.meter.done[reported])})
                reported += 1
            if time.monotonic() > deadline or self._stopping.is_set():
                raise RequestError("the client sent for longer than it asked for")
            try:
                message = lines.read(POLL)
            except TimeoutError:
                continue
            if message is None:
                return "the client hung up"
            break
        sent = message.get("sent")
        drain(lambda: counter.meter.last)
        with self._lock:
            test.counter = None
            summary = counter.summary()
        send_line(connection, {"result": summary})
        loss = counter.lost(sent if isinstance(sent, int) else None)
        return f"{counter.received} datagrams received, {loss} lost"

    def _udp_send(self, connection: socket.socket, lines: Lines, test: _Test) -> str:
        if not test.peer_known.wait(GRACE) or test.udp_peer is None:
            raise RequestError("no UDP hello from the client (is UDP blocked?)")
        send_line(connection, {"started": True})
        udp = self._udp
        assert udp is not None
        peer = test.udp_peer
        sent, seconds = send_paced(
            lambda data: udp.sendto(data, peer), test.request, test.session, self._stopping
        )
        send_line(connection, {"sent": sent, "seconds": seconds})
        return f"{sent} datagrams sent; {self._client_report(lines)}"


def _describe(request: Request) -> str:
    direction = " reverse" if request.reverse else ""
    if request.test == "udp":
        return (
            f"udp{direction} {request.rate / 1e6:g} Mbit/s x {request.length} B "
            f"for {request.seconds:g} s"
        )
    return f"{request.test}{direction} for {request.seconds:g} s"


def _mbit(value: object) -> str:
    return f"{value / 1e6:.1f} Mbit/s" if isinstance(value, int | float) else "?"


def _summarize(result: dict[str, Any]) -> str:
    """One log line's worth of a TCP or UDP result (its `to_json` or the server's own)."""
    if "loss_percent" in result:
        loss = result["loss_percent"]
        loss_text = f"{loss:.2f}" if isinstance(loss, int | float) else "?"
        return f"{_mbit(result.get('received_bps'))} received, loss {loss_text} %"
    return _mbit(result.get("bits_per_second"))
