"""The traffic generator and receiver of every bench: TCP, UDP with loss, UDP echo for RTT.

`BenchServer` answers tests on one port number (TCP for control and TCP
data, UDP for datagrams and echo); `BenchClient` asks for them. Each test
starts with a JSON request line on a new TCP connection; the server answers
``{"ok": true, "session": N}`` or ``{"error": "..."}``. The receiving side
measures and, when it is the server, reports back over that connection.

A member of the VPN may be hostile, so the server runs one test at a time,
bounds every request (`parse_request`), sends (reverse tests, echo) only to
the IP of the control connection that asked, echoes never more than it got,
and a bad request closes only its own connection.

Blocking sockets and threads: the GIL is released in the socket calls, and
big buffers keep Python from being the bottleneck. Run as an agent with
``python -m p2pvpn.bench.traffic serve|tcp|udp|rtt|loaded-rtt|udp-search``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pvpn import __version__
from p2pvpn._stats import percentile
from p2pvpn.bench._traffic_wire import (
    ECHO,
    HELLO,
    INTERVAL,
    MAX_LINE,
    MIN_LENGTH,
    UDP_DATA,
    Interval,
    IntervalMeter,
    Request,
    RequestError,
    UdpCounter,
    decode_line,
    encode_line,
    interval_from_json,
    interval_json,
    pack_datagram,
    parse_datagram,
    parse_request,
)
from p2pvpn.bench.report import BenchError

__all__ = [
    "DEFAULT_PORT",
    "INTERVAL",
    "BenchClient",
    "BenchRefusedError",
    "BenchServer",
    "Interval",
    "RttResult",
    "SearchResult",
    "TcpResult",
    "UdpResult",
    "main",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 5301
TCP_CHUNK = 256 * 1024  # bytes per sendall: big enough for tens of Gbit/s, small for slow links
RECV_BUFFER = 1024 * 1024
UDP_BUFFER = 4 * 1024 * 1024  # asked for; the kernel caps it at net.core.[rw]mem_max
ECHO_LENGTH = MIN_LENGTH
ECHO_TIMEOUT = 1.0  # an echo answered later than this counts as lost
DRAIN_QUIET = 0.2  # the receiver stops waiting for late datagrams after this much quiet...
DRAIN_MAX = 1.0  # ...or this long after the sender said it is done
HELLO_EVERY = 0.1
POLL = 0.1
GRACE = 5.0  # seconds a test may take beyond the seconds it asked for
REQUEST_TIMEOUT = 5.0  # for the first line of a connection
MAX_CONNECTIONS = 8
JOIN_TIMEOUT = 2.0
MAX_BURST = 256  # datagrams sent back to back before the pacer looks at the clock again


class BenchRefusedError(BenchError):
    """Nobody answers benchmarks at the address and port (refused, unreachable, timed out)."""


# -- results -------------------------------------------------------------------------


def _intervals_json(intervals: tuple[Interval, ...]) -> list[dict[str, Any]]:
    return [interval_json(interval) for interval in intervals]


@dataclass(frozen=True)
class TcpResult:
    sender: str  # "client" | "server"
    bytes: int
    seconds: float
    bits_per_second: float
    intervals: tuple[Interval, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "bits_per_second": self.bits_per_second,
            "intervals": _intervals_json(self.intervals),
        }


@dataclass(frozen=True)
class UdpResult:
    sender: str
    target_bps: float
    length: int
    sent_packets: int
    received_packets: int
    lost_packets: int
    loss_percent: float
    sent_bps: float
    received_bps: float
    seconds: float
    jitter_ms: float | None
    intervals: tuple[Interval, ...]  # received bytes per interval

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["intervals"] = _intervals_json(self.intervals)
        return data


@dataclass(frozen=True)
class RttResult:
    sent: int
    received: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    rtts_ms: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["rtts_ms"] = list(self.rtts_ms)
        return data


@dataclass(frozen=True)
class SearchResult:
    best: UdpResult | None
    trials: tuple[UdpResult, ...]
    bits_per_second: float | None
    loss_percent: float | None
    sender_limited: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best.to_json() if self.best is not None else None,
            "trials": [trial.to_json() for trial in self.trials],
            "bits_per_second": self.bits_per_second,
            "loss_percent": self.loss_percent,
            "sender_limited": self.sender_limited,
        }


def _rate(count: int, seconds: float) -> float:
    return count * 8 / seconds if seconds > 0 else 0.0


def _tcp_result(sender: str, data: dict[str, Any]) -> TcpResult:
    """A TCP result from the receiver's report (a dict with bytes, seconds, intervals)."""
    try:
        total, seconds = int(data["bytes"]), float(data["seconds"])
        intervals = tuple(interval_from_json(item) for item in data["intervals"])
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"the bench server sent a bad TCP result: {data!r}") from None
    return TcpResult(sender, total, seconds, _rate(total, seconds), intervals)


def _udp_result(
    request: Request, sender: str, sent: int, seconds: float, summary: dict[str, Any]
) -> UdpResult:
    """A UDP result from the sender's count and the receiver's `UdpCounter.summary`."""
    try:
        received = int(summary["received_packets"])
        received_bytes = int(summary["received_bytes"])
        max_seq = int(summary["max_seq"])
        jitter = summary["jitter_ms"]
        jitter_ms = None if jitter is None else float(jitter)
        intervals = tuple(interval_from_json(item) for item in summary["intervals"])
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"the bench server sent a bad UDP result: {summary!r}") from None
    lost = max(0, max(sent, max_seq + 1) - received)
    return UdpResult(
        sender=sender,
        target_bps=request.rate,
        length=request.length,
        sent_packets=sent,
        received_packets=received,
        lost_packets=lost,
        loss_percent=100.0 * lost / sent if sent else 0.0,
        sent_bps=_rate(sent * request.length, seconds),
        received_bps=_rate(received_bytes, seconds),
        seconds=seconds,
        jitter_ms=jitter_ms,
        intervals=intervals,
    )


# -- socket helpers ------------------------------------------------------------------


class _Lines:
    """JSON lines from a socket, at most `MAX_LINE` bytes each; bytes after a line stay."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next line as a JSON object; None at EOF; TimeoutError after ``timeout``
        (what was read so far stays); RequestError when it is not a bounded JSON line."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return decode_line(line)
            if len(self._buffer) >= MAX_LINE:
                raise RequestError(f"line longer than {MAX_LINE} bytes")
            if timeout is not None:
                self._sock.settimeout(timeout)
            chunk = self._sock.recv(MAX_LINE)
            if not chunk:
                return None
            self._buffer += chunk

    def take_rest(self) -> int:
        """How many bytes after the last line were read already (they are data)."""
        count = len(self._buffer)
        self._buffer.clear()
        return count


def _send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_line(message))


def _send_paced(
    send: Callable[[bytearray], object],
    request: Request,
    session: int,
    stop: threading.Event,
) -> tuple[int, float]:
    """Send ``request.rate`` bit/s of ``request.length``-byte datagrams for
    ``request.seconds``: in bursts of what is due by the clock, sleeping the rest
    of the time. Returns (datagrams sent, seconds)."""
    clock = time.monotonic
    buffer = bytearray(request.length)
    per_second = request.rate / (8 * request.length)
    start = clock()
    sent = 0
    while not stop.is_set():
        elapsed = clock() - start
        if elapsed >= request.seconds:
            break
        due = int(elapsed * per_second) + 1
        if sent >= due:
            time.sleep(max(0.0, min(sent / per_second - elapsed, request.seconds - elapsed, 0.01)))
            continue
        for _ in range(min(due - sent, MAX_BURST)):
            pack_datagram(buffer, UDP_DATA, session, sent, clock())
            try:
                send(buffer)
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise
                break  # the queue is full: try again after a look at the clock
            sent += 1
    return sent, clock() - start


def _drain(last_arrival: Callable[[], float | None]) -> None:
    """Wait for late datagrams: until `DRAIN_QUIET` without one, at most `DRAIN_MAX`."""
    start = time.monotonic()
    while (now := time.monotonic()) < start + DRAIN_MAX:
        if now - max(start, last_arrival() or start) >= DRAIN_QUIET:
            return
        time.sleep(0.02)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


# -- the server ----------------------------------------------------------------------


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
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
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
        _join(self._threads + handlers, JOIN_TIMEOUT)
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
        lines = _Lines(connection)
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
            connection.close()
            self._slots.release()

    @staticmethod
    def _try_send(connection: socket.socket, message: dict[str, Any]) -> None:
        try:
            connection.settimeout(1.0)
            _send_line(connection, message)
        except OSError:
            pass

    def _serve(
        self, connection: socket.socket, lines: _Lines, request: Request, client_ip: str
    ) -> None:
        if request.test == "hello":
            _send_line(connection, {"version": __version__, "hostname": socket.gethostname()})
            return
        test = self._claim(request, client_ip)
        if test is None:
            log.info("bench: %s asked for %s while busy", client_ip, _describe(request))
            self._try_send(connection, {"error": "busy: another test is running, try later"})
            return
        log.info("bench: %s asked for %s", client_ip, _describe(request))
        try:
            connection.settimeout(GRACE)
            _send_line(connection, {"ok": True, "session": test.session})
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

    def _run(self, connection: socket.socket, lines: _Lines, test: _Test) -> str:
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

    def _serve_echo(self, lines: _Lines, test: _Test) -> str:
        """Echo answers run in the UDP thread; this waits for the client to hang up."""
        deadline = self._deadline(test)
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                if lines.read(POLL) is None:
                    return "done"
            except TimeoutError:
                continue
        return "ended by the server"

    def _tcp_receive(self, connection: socket.socket, lines: _Lines, test: _Test) -> str:
        meter = IntervalMeter()
        if rest := lines.take_rest():
            meter.add(time.monotonic(), rest)
        buffer = bytearray(RECV_BUFFER)
        deadline = self._deadline(test)
        reported = 0
        connection.settimeout(POLL * 5)
        while True:
            if time.monotonic() > deadline or self._stopping.is_set():
                raise RequestError("the client sent for longer than it asked for")
            try:
                size = connection.recv_into(buffer)
            except TimeoutError:
                continue
            if not size:
                break
            meter.add(time.monotonic(), size)
            while reported < len(meter.done):
                _send_line(connection, {"interval": interval_json(meter.done[reported])})
                reported += 1
        intervals = meter.finish()
        result = {"bytes": meter.total, "seconds": meter.seconds}
        _send_line(connection, {"result": {**result, "intervals": _intervals_json(intervals)}})
        return _mbit(_rate(meter.total, meter.seconds))

    def _tcp_send(self, connection: socket.socket, lines: _Lines, test: _Test) -> str:
        payload = bytes(TCP_CHUNK)
        end = time.monotonic() + test.request.seconds
        while time.monotonic() < end and not self._stopping.is_set():
            connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        return self._client_report(lines)

    def _client_report(self, lines: _Lines) -> str:
        """What the client measured (it sends a summary before it hangs up), for the log."""
        try:
            report = lines.read(GRACE + DRAIN_MAX)
        except TimeoutError:
            report = None
        result = report.get("result") if report else None
        if not isinstance(result, dict):
            return "the client reported nothing"
        return _summarize(result)

    def _udp_receive(self, connection: socket.socket, lines: _Lines, test: _Test) -> str:
        counter = UdpCounter(test.session)
        with self._lock:
            test.counter = counter
        deadline = self._deadline(test)
        reported = 0
        while True:
            while reported < len(counter.meter.done):
                _send_line(connection, {"interval": interval_json(counter.meter.done[reported])})
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
        _drain(lambda: counter.meter.last)
        with self._lock:
            test.counter = None
            summary = counter.summary()
        _send_line(connection, {"result": summary})
        loss = counter.lost(sent if isinstance(sent, int) else None)
        return f"{counter.received} datagrams received, {loss} lost"

    def _udp_send(self, connection: socket.socket, lines: _Lines, test: _Test) -> str:
        if not test.peer_known.wait(GRACE) or test.udp_peer is None:
            raise RequestError("no UDP hello from the client (is UDP blocked?)")
        _send_line(connection, {"started": True})
        udp = self._udp
        assert udp is not None
        peer = test.udp_peer
        sent, seconds = _send_paced(
            lambda data: udp.sendto(data, peer), test.request, test.session, self._stopping
        )
        _send_line(connection, {"sent": sent, "seconds": seconds})
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


# -- the client ----------------------------------------------------------------------


class _Control:
    """The lines the server sends while data flows the other way, read in a thread:
    intervals go to the callback, the last other message is kept."""

    def __init__(
        self, lines: _Lines, on_interval: Callable[[Interval], None] | None, key: str
    ) -> None:
        self._lines = lines
        self._on_interval = on_interval
        self._key = key
        self.answer: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-control", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (message := self._lines.read()) is not None:
                if "interval" in message:
                    if self._on_interval is not None:
                        self._on_interval(interval_from_json(message["interval"]))
                elif self._key in message or "error" in message:
                    self.answer = message
                    return
        except (OSError, RequestError) as exc:
            self.error = exc

    def wait(self, timeout: float, where: str) -> dict[str, Any]:
        """The server's answer under ``key``; BenchError if it gives none in time."""
        self._thread.join(timeout)
        answer = self.answer
        if answer is not None and "error" in answer:
            raise BenchError(f"the bench server at {where} stopped the test: {answer['error']}")
        if answer is None or not isinstance(answer.get(self._key), dict):
            reason = f": {self.error}" if self.error else ""
            raise BenchError(f"the bench server at {where} sent no {self._key}{reason}")
        result: dict[str, Any] = answer[self._key]
        return result


class BenchClient:
    """Asks the `BenchServer` at ``address:port`` for tests; one connection per test."""

    def __init__(self, address: str, port: int = DEFAULT_PORT, *, timeout: float = 5.0) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"

    def _connect(self) -> socket.socket:
        try:
            return socket.create_connection((self.address, self.port), timeout=self.timeout)
        except TimeoutError:
            reason = f"no answer within {self.timeout:g} s"
        except ConnectionRefusedError:
            reason = "connection refused"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        raise BenchRefusedError(f"nobody answers benchmarks at {self.where} ({reason})")

    def _open(self, request: dict[str, Any]) -> tuple[socket.socket, _Lines, dict[str, Any]]:
        """A connection whose request the server accepted, and its answer."""
        sock = self._connect()
        lines = _Lines(sock)
        try:
            _send_line(sock, request)
            answer = lines.read(self.timeout)
        except (OSError, RequestError) as exc:
            sock.close()
            raise BenchError(f"the bench server at {self.where} did not answer: {exc}") from None
        if answer is None or "error" in answer:
            sock.close()
            error = "it hung up" if answer is None else answer["error"]
            raise BenchError(f"the bench server at {self.where} refused {request['test']}: {error}")
        return sock, lines, answer

    def _session(self, answer: dict[str, Any]) -> int:
        session = answer.get("session")
        if not isinstance(session, int):
            raise BenchError(f"the bench server at {self.where} sent no session: {answer!r}")
        return session

    def _udp_socket(self, control: socket.socket) -> socket.socket:
        """A UDP socket connected to the server's port on the control connection's IP."""
        udp = socket.socket(control.family, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
        udp.connect((control.getpeername()[0], self.port))
        return udp

    def hello(self) -> dict[str, Any]:
        """The server's version and hostname; BenchRefusedError if nobody answers."""
        sock, _, answer = self._open({"test": "hello"})
        sock.close()
        return answer

    # -- TCP -------------------------------------------------------------------------

    def tcp(
        self,
        seconds: float,
        *,
        reverse: bool = False,
        on_interval: Callable[[Interval], None] | None = None,
    ) -> TcpResult:
        """Send (or with ``reverse`` receive) for ``seconds``; measured at the receiver."""
        return self._tcp(seconds, reverse, on_interval, None)

    def _tcp(
        self,
        seconds: float,
        reverse: bool,
        on_interval: Callable[[Interval], None] | None,
        on_session: Callable[[int, str], None] | None,
    ) -> TcpResult:
        request = {"test": "tcp", "seconds": seconds, "reverse": reverse}
        sock, lines, answer = self._open(request)
        with sock:
            if on_session is not None:
                on_session(self._session(answer), str(sock.getpeername()[0]))
            sock.settimeout(max(self.timeout, GRACE))
            try:
                if reverse:
                    result = self._tcp_receive(sock, lines, seconds, on_interval)
                else:
                    result = self._tcp_send(sock, lines, seconds, on_interval)
            except OSError as exc:
                raise BenchError(f"the TCP test with {self.where} broke off: {exc}") from None
            _wait_closed(sock)
            return result

    def _tcp_send(
        self,
        sock: socket.socket,
        lines: _Lines,
        seconds: float,
        on_interval: Callable[[Interval], None] | None,
    ) -> TcpResult:
        control = _Control(lines, on_interval, "result")
        payload = bytes(TCP_CHUNK)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return _tcp_result("client", control.wait(GRACE + self.timeout, self.where))

    def _tcp_receive(
        self,
        sock: socket.socket,
        lines: _Lines,
        seconds: float,
        on_interval: Callable[[Interval], None] | None,
    ) -> TcpResult:
        meter = IntervalMeter()
        if rest := lines.take_rest():
            meter.add(time.monotonic(), rest)
        buffer = bytearray(RECV_BUFFER)
        deadline = time.monotonic() + seconds + GRACE + self.timeout
        reported = 0
        while size := sock.recv_into(buffer):
            meter.add(time.monotonic(), size)
            while reported < len(meter.done):
                if on_interval is not None:
                    on_interval(meter.done[reported])
                reported += 1
            if time.monotonic() > deadline:
                raise BenchError(f"the bench server at {self.where} sent for too long")
        intervals = meter.finish()
        if on_interval is not None:
            for interval in intervals[reported:]:
                on_interval(interval)
        result = TcpResult(
            "server", meter.total, meter.seconds, _rate(meter.total, meter.seconds), intervals
        )
        _report_back(sock, result.to_json())
        return result

    # -- UDP -------------------------------------------------------------------------

    def udp(
        self,
        rate_bps: float,
        seconds: float,
        *,
        length: int = 1400,
        reverse: bool = False,
        on_interval: Callable[[Interval], None] | None = None,
    ) -> UdpResult:
        """``rate_bps`` of ``length``-byte datagrams for ``seconds``; loss and jitter
        measured at the receiver."""
        message = {
            "test": "udp", "seconds": seconds, "reverse": reverse,
            "rate": rate_bps, "length": length,
        }  # fmt: skip
        request = Request("udp", seconds, reverse, rate_bps, length)
        sock, lines, answer = self._open(message)
        session = self._session(answer)
        with sock, self._udp_socket(sock) as udp:
            sock.settimeout(max(self.timeout, GRACE))
            try:
                if reverse:
                    result = self._udp_receive(sock, lines, udp, request, session, on_interval)
                else:
                    result = self._udp_send(sock, lines, udp, request, session, on_interval)
            except OSError as exc:
                raise BenchError(f"the UDP test with {self.where} broke off: {exc}") from None
            _wait_closed(sock)
            return result

    def _udp_send(  # noqa: PLR0917 - one test's sockets and what it asked for
        self,
        sock: socket.socket,
        lines: _Lines,
        udp: socket.socket,
        request: Request,
        session: int,
        on_interval: Callable[[Interval], None] | None,
    ) -> UdpResult:
        control = _Control(lines, on_interval, "result")
        sent, seconds = _send_paced(udp.send, request, session, threading.Event())
        _send_line(sock, {"sent": sent, "seconds": seconds})
        summary = control.wait(DRAIN_MAX + GRACE + self.timeout, self.where)
        return _udp_result(request, "client", sent, seconds, summary)

    def _udp_receive(  # noqa: PLR0917 - one test's sockets and what it asked for
        self,
        sock: socket.socket,
        lines: _Lines,
        udp: socket.socket,
        request: Request,
        session: int,
        on_interval: Callable[[Interval], None] | None,
    ) -> UdpResult:
        receiver = _UdpReceiver(udp, UdpCounter(session))
        try:
            self._say_hello(lines, udp, session)
            done = self._wait_sent(lines, receiver, request, on_interval)
            _drain(lambda: receiver.counter.meter.last)
        finally:
            receiver.stop()
        sent, seconds = done
        summary = receiver.counter.summary()
        reported = len(receiver.reported)
        if on_interval is not None:
            for item in summary["intervals"][reported:]:
                on_interval(interval_from_json(item))
        result = _udp_result(request, "server", sent, seconds, summary)
        _report_back(sock, result.to_json())
        return result

    def _say_hello(self, lines: _Lines, udp: socket.socket, session: int) -> None:
        """Hello datagrams until the server says it has started sending to us."""
        hello = bytearray(MIN_LENGTH)
        deadline = time.monotonic() + GRACE + self.timeout
        while time.monotonic() < deadline:
            pack_datagram(hello, HELLO, session, 0, time.monotonic())
            with contextlib.suppress(ConnectionRefusedError):
                udp.send(hello)  # refused: an ICMP error of an earlier hello; try again
            try:
                message = lines.read(HELLO_EVERY)
            except TimeoutError:
                continue
            if message is None or "error" in message:
                error = "it hung up" if message is None else message["error"]
                raise BenchError(f"the bench server at {self.where} stopped the test: {error}")
            if message.get("started"):
                return
        raise BenchError(
            f"the bench server at {self.where} did not get our UDP hello (is UDP blocked?)"
        )

    def _wait_sent(
        self,
        lines: _Lines,
        receiver: _UdpReceiver,
        request: Request,
        on_interval: Callable[[Interval], None] | None,
    ) -> tuple[int, float]:
        """Intervals as they complete, until the server says how much it sent."""
        deadline = time.monotonic() + request.seconds + GRACE + self.timeout
        while time.monotonic() < deadline:
            receiver.report(on_interval)
            try:
                message = lines.read(POLL)
            except TimeoutError:
                continue
            if message is None:
                break
            sent, seconds = message.get("sent"), message.get("seconds")
            if isinstance(sent, int) and isinstance(seconds, int | float):
                return sent, float(seconds)
        raise BenchError(f"the bench server at {self.where} did not say how much it sent")

    # -- RTT -------------------------------------------------------------------------

    def rtt(self, count: int, *, interval: float = 0.05) -> RttResult:
        """``count`` UDP echoes, one per ``interval``; lost after `ECHO_TIMEOUT`."""
        seconds = count * interval + ECHO_TIMEOUT + 1.0
        sock, _, answer = self._open({"test": "rtt", "seconds": seconds})
        with sock:
            result = self._echo(sock.getpeername()[0], self._session(answer), count, interval)
            _wait_closed(sock)
            return result

    def _echo(self, server_ip: str, session: int, count: int, interval: float) -> RttResult:
        family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((server_ip, self.port))
            sent_at: dict[int, float] = {}
            rtts: dict[int, float] = {}
            stop = threading.Event()
            thread = threading.Thread(
                target=_collect_echoes, args=(udp, session, sent_at, rtts, stop), daemon=True
            )
            thread.start()
            try:
                last = _send_echoes(udp, session, count, interval, sent_at)
                while len(rtts) < count and time.monotonic() < last + ECHO_TIMEOUT:
                    time.sleep(0.01)
            finally:
                stop.set()
                thread.join(JOIN_TIMEOUT)
        values = tuple(rtts[seq] for seq in sorted(rtts))
        return RttResult(
            count,
            len(values),
            percentile(values, 50),
            percentile(values, 99),
            max(values) if values else None,
            values,
        )

    def loaded_rtt(
        self, seconds: float, *, interval: float = 0.05, reverse: bool = False
    ) -> tuple[RttResult, TcpResult]:
        """Echoes while a TCP test runs (the bufferbloat the load causes)."""
        started = threading.Event()
        session: list[tuple[int, str]] = []
        outcome: list[TcpResult | BaseException] = []

        def on_session(number: int, server_ip: str) -> None:
            session.append((number, server_ip))
            started.set()

        def run_tcp() -> None:
            try:
                outcome.append(self._tcp(seconds, reverse, None, on_session))
            except BaseException as exc:  # handed to the caller below
                outcome.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=run_tcp, name="bench-loaded-tcp", daemon=True)
        thread.start()
        started.wait(self.timeout + GRACE)
        rtt = None
        if session:
            settle = min(0.5, seconds / 4)  # let the TCP run fill the queues first
            time.sleep(settle)
            count = max(1, int((seconds - settle - ECHO_TIMEOUT / 2) / interval))
            rtt = self._echo(session[0][1], session[0][0], count, interval)
        thread.join(seconds + 2 * GRACE + self.timeout)
        if not outcome:
            raise BenchError(f"the TCP test with {self.where} did not finish")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        assert rtt is not None
        return rtt, outcome[0]

    # -- UDP search ------------------------------------------------------------------

    def udp_search(
        self,
        start_bps: float,
        *,
        seconds: float,
        steps: int,
        length: int = 1400,
        reverse: bool = False,
        loss_limit: float = 1.0,
        on_trial: Callable[[UdpResult], None] | None = None,
    ) -> SearchResult:
        """Highest UDP goodput with loss < ``loss_limit`` %, in at most ``steps`` runs.

        A step at target rate R passes when the loss stays under the limit and
        the sender really sent at 95 % of R: R becomes the lower bound.
        Otherwise the rate actually sent is an upper bound (lossy there, or the
        sender's limit). From ``start_bps`` the rate doubles while steps pass,
        drops to 90 % of that upper bound (at least halving) while none has
        passed, then bisects. The result is the best goodput of any step under
        the loss limit (a sender-limited step counts: nothing was lost, the path
        was not the bottleneck; ``sender_limited`` says so).
        """
        low: float | None = None
        high: float | None = None
        best: UdpResult | None = None
        rate = max(start_bps, 1e6)
        trials: list[UdpResult] = []
        for _ in range(steps):
            trial = self.udp(rate, seconds, length=length, reverse=reverse)
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
            lossless = trial.loss_percent < loss_limit
            passed = lossless and trial.sent_bps >= 0.95 * rate
            if lossless and (best is None or trial.received_bps > best.received_bps):
                best = trial
            if passed:
                low = max(low or 0.0, rate)
            else:
                high = min(high or math.inf, trial.sent_bps)
            if high is None:
                rate = rate * 2
            elif low is None:
                rate = min(rate / 2, 0.9 * high)
            elif high <= low * 1.05:
                break
            else:
                rate = (low + high) / 2
        return SearchResult(
            best,
            tuple(trials),
            best.received_bps if best else None,
            best.loss_percent if best else None,
            best.sent_bps < 0.95 * best.target_bps if best else None,
        )


class _UdpReceiver:
    """Counts the datagrams of a reverse UDP test in a thread."""

    def __init__(self, udp: socket.socket, counter: UdpCounter) -> None:
        self._udp = udp
        self.counter = counter
        self.reported: list[Interval] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-udp-rx", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = bytearray(65536)
        view = memoryview(buffer)
        self._udp.settimeout(POLL)
        while not self._stop.is_set():
            try:
                size = self._udp.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError:
                continue  # ICMP errors of our hellos
            datagram = parse_datagram(view[:size])
            if datagram is not None:
                self.counter.feed(datagram, size, time.monotonic())

    def report(self, on_interval: Callable[[Interval], None] | None) -> None:
        done = self.counter.meter.done
        while len(self.reported) < len(done):
            interval = done[len(self.reported)]
            self.reported.append(interval)
            if on_interval is not None:
                on_interval(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT)


def _send_echoes(
    udp: socket.socket, session: int, count: int, interval: float, sent_at: dict[int, float]
) -> float:
    """One echo request per ``interval``; returns when the last went out."""
    buffer = bytearray(ECHO_LENGTH)
    start = time.monotonic()
    now = start
    for seq in range(count):
        wait = start + seq * interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        pack_datagram(buffer, ECHO, session, seq, now)
        sent_at[seq] = now
        with contextlib.suppress(OSError):
            udp.send(buffer)  # failed: an ICMP error or a full queue, this one is lost
    return now


def _collect_echoes(
    udp: socket.socket,
    session: int,
    sent_at: dict[int, float],
    rtts: dict[int, float],
    stop: threading.Event,
) -> None:
    buffer = bytearray(ECHO_LENGTH + 1)
    udp.settimeout(POLL)
    while not stop.is_set():
        try:
            size = udp.recv_into(buffer)
        except OSError:
            continue
        now = time.monotonic()
        datagram = parse_datagram(memoryview(buffer)[:size])
        if datagram is None or datagram.kind != ECHO or datagram.session != session:
            continue
        sent = sent_at.get(datagram.seq)
        if sent is not None and datagram.seq not in rtts and now - sent <= ECHO_TIMEOUT:
            rtts[datagram.seq] = (now - sent) * 1000


def _wait_closed(sock: socket.socket) -> None:
    """Until the server hangs up (it has ended the test then, so the next one is not
    refused as busy); bounded, whatever it still sends is dropped."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + GRACE
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(MAX_LINE):
                return


def _report_back(sock: socket.socket, result: dict[str, Any]) -> None:
    """The client's measurement, for the server's log; the test is over either way."""
    result.pop("intervals", None)
    result.pop("rtts_ms", None)
    with contextlib.suppress(OSError):
        _send_line(sock, {"result": result})


# -- the agent -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m p2pvpn.bench.traffic",
        description="The p2pvpn bench traffic agent: serve, or run one test and print JSON lines.",
    )
    parser.add_argument(
        "action", choices=("serve", "tcp", "udp", "rtt", "loaded-rtt", "udp-search")
    )
    parser.add_argument("address", help="serve: the address to listen on; else the server's")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reverse", action="store_true", help="the server sends")
    parser.add_argument("--rate", type=float, default=100e6, help="UDP bit/s (search: start)")
    parser.add_argument("--length", type=int, default=1400, help="UDP datagram bytes")
    parser.add_argument("--count", type=int, default=20, help="rtt: echoes")
    parser.add_argument("--interval", type=float, default=0.05, help="rtt: seconds between")
    parser.add_argument("--steps", type=int, default=6, help="udp-search: trials at most")
    parser.add_argument("--loss-limit", type=float, default=1.0, help="udp-search: percent")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="serve: longest test")
    return parser


def _print_json(message: dict[str, Any]) -> None:
    print(encode_line(message).decode(), end="", flush=True)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = BenchServer(args.address, args.port, max_seconds=args.max_seconds)
    server.start()
    host, port = server.address
    print(f"listening {host} {port}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


def _run_test(args: argparse.Namespace) -> dict[str, Any]:
    client = BenchClient(args.address, args.port, timeout=args.timeout)

    def on_interval(interval: Interval) -> None:
        _print_json({"interval": interval_json(interval)})

    if args.action == "tcp":
        return client.tcp(args.seconds, reverse=args.reverse, on_interval=on_interval).to_json()
    if args.action == "udp":
        return client.udp(
            args.rate, args.seconds, length=args.length, reverse=args.reverse,
            on_interval=on_interval,
        ).to_json()  # fmt: skip
    if args.action == "rtt":
        return client.rtt(args.count, interval=args.interval).to_json()
    if args.action == "loaded-rtt":
        rtt, tcp = client.loaded_rtt(args.seconds, interval=args.interval, reverse=args.reverse)
        return {"rtt": rtt.to_json(), "tcp": tcp.to_json()}
    return client.udp_search(
        args.rate, seconds=args.seconds, steps=args.steps, length=args.length,
        reverse=args.reverse, loss_limit=args.loss_limit,
        on_trial=lambda trial: _print_json({"trial": trial.to_json()}),
    ).to_json()  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The agent: ``serve`` until SIGTERM/SIGINT, or one test printed as JSON lines."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "serve":
            return _serve(args)
        _print_json({"result": _run_test(args)})
    except BenchError as exc:
        _print_json({"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
