"""The traffic generator and receiver of every bench: TCP, UDP with loss, UDP echo for RTT.

`BenchServer` answers tests on one port number (TCP for control and TCP
data, UDP for datagrams and echo); `BenchClient` asks for them. Each test
starts with a JSON request line on a new TCP connection; the server answers
``{"ok": true, "session": N}`` or ``{"error": "..."}`` (e.g. "busy"). The
receiving side measures and, when it is the server, reports back over that
connection; the client returns when the server has hung up, so the next
test can start at once.

A member of the VPN may be hostile, so the server runs one test at a time,
bounds every request, sends (reverse tests, echo) only to the IP of the
control connection that asked, echoes never more than it got, and a bad
request closes only its own connection.

Blocking sockets and threads: the GIL is released in the socket calls, and
big buffers keep Python from being the bottleneck. Run as an agent with
``python -m p2pvpn.bench.traffic serve|tcp|udp|rtt|loaded-rtt|udp-search``
(JSON lines on stdout: ``{"interval": ...}`` as the test goes, ``{"trial":
...}`` per udp-search step, then ``{"result": ...}`` or ``{"error": ...}``).

The parts: `_traffic_wire` (the sans-I/O codec and receiver counting),
`_traffic_io` (control lines, pacing, socket timeouts), `_traffic_server`
(`BenchServer`); this module has the results, the client and the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pvpn._stats import percentile
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
    drain,
    send_line,
    send_paced,
)
from p2pvpn.bench._traffic_server import BenchServer
from p2pvpn.bench._traffic_wire import (
    DEFAULT_PORT,
    ECHO,
    HELLO,
    INTERVAL,
    MAX_LINE,
    MIN_LENGTH,
    Interval,
    IntervalMeter,
    RateTrial,
    Request,
    RequestError,
    UdpCounter,
    encode_line,
    interval_from_json,
    interval_json,
    pack_datagram,
    parse_datagram,
    search_udp_rate,
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

ECHO_LENGTH = MIN_LENGTH
ECHO_TIMEOUT = 1.0  # an echo answered later than this counts as lost
HELLO_EVERY = 0.1


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


def _tcp_result(sender: str, data: dict[str, Any]) -> TcpResult:
    """A TCP result from the receiver's report (a dict with bytes, seconds, intervals)."""
    try:
        total, seconds = int(data["bytes"]), float(data["seconds"])
        intervals = tuple(interval_from_json(item) for item in data["intervals"])
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"the bench server sent a bad TCP result: {data!r}") from None
    return TcpResult(sender, total, seconds, bits_per_second(total, seconds), intervals)


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
        sent_bps=bits_per_second(sent * request.length, seconds),
        received_bps=bits_per_second(received_bytes, seconds),
        seconds=seconds,
        jitter_ms=jitter_ms,
        intervals=intervals,
    )


# -- the client ----------------------------------------------------------------------


class _Control:
    """The lines the server sends while data flows the other way, read in a thread
    until ``deadline``: intervals go to the callback, the answer under ``key`` is kept."""

    def __init__(
        self,
        lines: Lines,
        on_interval: Callable[[Interval], None] | None,
        key: str,
        deadline: float,
    ) -> None:
        self._lines = lines
        self._on_interval = on_interval
        self._key = key
        self._deadline = deadline
        self.reported = 0  # intervals handed to on_interval
        self.answer: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-control", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while time.monotonic() < self._deadline:
                try:
                    message = self._lines.read()  # the socket is in `bulk_mode`
                except BlockingIOError:
                    continue  # nothing arrives while nothing is received, e.g. all lost
                if message is None:
                    return
                if "interval" in message:
                    self._interval(interval_from_json(message["interval"]))
                elif self._key in message or "error" in message:
                    self.answer = message
                    return
        except (OSError, RequestError) as exc:
            self.error = exc

    def _interval(self, interval: Interval) -> None:
        self.reported += 1
        if self._on_interval is not None:
            self._on_interval(interval)

    def wait(self, where: str) -> dict[str, Any]:
        """The server's answer under ``key``; BenchError if it gives none in time."""
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + POLL * 5)
        answer = self.answer
        if answer is not None and "error" in answer:
            raise BenchError(f"the bench server at {where} stopped the test: {answer['error']}")
        if answer is None or not isinstance(answer.get(self._key), dict):
            reason = f": {self.error}" if self.error else ""
            raise BenchError(f"the bench server at {where} sent no {self._key}{reason}")
        result: dict[str, Any] = answer[self._key]
        return result

    def finish(self, intervals: tuple[Interval, ...]) -> None:
        """The result's intervals the server did not send one by one (the last one)."""
        for interval in intervals[self.reported :]:
            self._interval(interval)


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

    def _open(self, request: dict[str, Any]) -> tuple[socket.socket, Lines, dict[str, Any]]:
        """A connection whose request the server accepted, and its answer."""
        sock = self._connect()
        lines = Lines(sock)
        try:
            send_line(sock, request)
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
        big_receive_buffer(udp)
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
        lines: Lines,
        seconds: float,
        on_interval: Callable[[Interval], None] | None,
    ) -> TcpResult:
        end = time.monotonic() + seconds
        bulk_mode(sock, receive=POLL * 5, send=GRACE + self.timeout)
        control = _Control(lines, on_interval, "result", end + GRACE + self.timeout)
        payload = bytes(TCP_CHUNK)
        try:
            while time.monotonic() < end:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            control.wait(self.where)  # raises the server's reason when it gave one
            raise
        result = _tcp_result("client", control.wait(self.where))
        control.finish(result.intervals)
        return result

    def _tcp_receive(
        self,
        sock: socket.socket,
        lines: Lines,
        seconds: float,
        on_interval: Callable[[Interval], None] | None,
    ) -> TcpResult:
        meter = IntervalMeter()
        if rest := lines.take_rest():
            meter.add(time.monotonic(), rest)
        buffer = bytearray(RECV_BUFFER)
        deadline = time.monotonic() + seconds + GRACE + self.timeout
        reported = 0
        bulk_mode(sock, receive=GRACE + self.timeout, send=GRACE)
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
            "server",
            meter.total,
            meter.seconds,
            bits_per_second(meter.total, meter.seconds),
            intervals,
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
        lines: Lines,
        udp: socket.socket,
        request: Request,
        session: int,
        on_interval: Callable[[Interval], None] | None,
    ) -> UdpResult:
        deadline = time.monotonic() + request.seconds + DRAIN_MAX + GRACE + self.timeout
        bulk_mode(sock, receive=POLL * 5, send=GRACE + self.timeout)
        control = _Control(lines, on_interval, "result", deadline)
        sent, seconds = send_paced(udp.send, request, session, threading.Event())
        send_line(sock, {"sent": sent, "seconds": seconds})
        result = _udp_result(request, "client", sent, seconds, control.wait(self.where))
        control.finish(result.intervals)
        return result

    def _udp_receive(  # noqa: PLR0917 - one test's sockets and what it asked for
        self,
        sock: socket.socket,
        lines: Lines,
        udp: socket.socket,
        request: Request,
        session: int,
        on_interval: Callable[[Interval], None] | None,
    ) -> UdpResult:
        receiver = _UdpReceiver(udp, UdpCounter(session))
        try:
            self._say_hello(lines, udp, session)
            done = self._wait_sent(lines, receiver, request, on_interval)
            drain(lambda: receiver.counter.meter.last)
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

    def _say_hello(self, lines: Lines, udp: socket.socket, session: int) -> None:
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
        lines: Lines,
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

        def run(rate: float) -> RateTrial:
            trial = self.udp(rate, seconds, length=length, reverse=reverse)
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
            return RateTrial(rate, trial.sent_bps, trial.received_bps, trial.loss_percent)

        trials: list[UdpResult] = []
        index, steps_taken = search_udp_rate(start_bps, steps, loss_limit, run)
        best = trials[index] if index is not None else None
        return SearchResult(
            best,
            tuple(trials),
            best.received_bps if best else None,
            best.loss_percent if best else None,
            steps_taken[index].sender_limited if index is not None else None,
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
    udp.settimeout(0.02)  # the caller joins this thread when it has all answers
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
        send_line(sock, {"result": result})


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
