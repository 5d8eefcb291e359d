"""The bench traffic tool's wire format and receiver counting, without sockets or clocks.

Control (TCP): one JSON object per line, at most `MAX_LINE` bytes. The
client's first line is the request (`parse_request` checks it against the
server's bounds); every answer is a line too.

Datagrams (UDP): `HEADER` (magic, kind, session id, sequence number, the
sender's monotonic send time) then padding up to the test's length. A data
datagram counts for the current test, a hello tells the server the client's
UDP port, an echo is sent back unchanged.

`IntervalMeter` and `UdpCounter` are the receiving side's arithmetic (bytes
per `INTERVAL`, loss by sequence number, RFC 3550 jitter), fed with the time
of arrival so that the tests can drive them with made-up clocks.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_PORT",
    "ECHO",
    "HEADER",
    "HELLO",
    "INTERVAL",
    "MAX_LENGTH",
    "MAX_LINE",
    "MAX_RATE",
    "MIN_LENGTH",
    "SENT_FRACTION",
    "UDP_DATA",
    "Datagram",
    "Interval",
    "IntervalMeter",
    "RateTrial",
    "Request",
    "RequestError",
    "UdpCounter",
    "decode_line",
    "encode_line",
    "interval_from_json",
    "interval_json",
    "pack_datagram",
    "parse_datagram",
    "parse_request",
    "search_udp_rate",
]

DEFAULT_PORT = 5301  # TCP and UDP
INTERVAL = 0.5  # seconds per reported interval
MAX_LINE = 4096  # bytes of one control line, newline included
MIN_LENGTH = 64  # bytes of a datagram: room for the header and then some
MAX_LENGTH = 65507  # the largest UDP payload over IPv4
MAX_RATE = 100e9  # bit/s a request may ask for
MAGIC = b"P2VB"
UDP_DATA = 1
HELLO = 2
ECHO = 3
KINDS = (UDP_DATA, HELLO, ECHO)
TESTS = ("hello", "tcp", "udp", "rtt")
HEADER = struct.Struct("!4sB3xIQd")  # magic, kind, session, seq, send time


class RequestError(ValueError):
    """A control line that is not a valid request or answer; the message says what is wrong."""


@dataclass(frozen=True)
class Interval:
    start: float  # seconds since the test's start (the first byte received)
    end: float
    bytes: int

    @property
    def bits_per_second(self) -> float:
        seconds = self.end - self.start
        return self.bytes * 8 / seconds if seconds > 0 else 0.0

    @property
    def partial(self) -> bool:
        """The tail of a run, under half an INTERVAL: too short for a rate worth plotting
        (a few milliseconds of a burst would show as a spike)."""
        return self.end - self.start < INTERVAL / 2


@dataclass(frozen=True)
class Request:
    test: str  # "hello" | "tcp" | "udp" | "rtt"
    seconds: float = 0.0
    reverse: bool = False
    rate: float = 0.0  # bit/s (udp)
    length: int = 0  # bytes per datagram (udp)


@dataclass(frozen=True)
class Datagram:
    kind: int
    session: int
    seq: int
    sent: float  # the sender's time.monotonic() when it sent it


def encode_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """One control line as a JSON object; RequestError when it is anything else."""
    if len(line) > MAX_LINE:
        raise RequestError(f"line longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError("not a JSON line") from None
    if not isinstance(message, dict):
        raise RequestError("not a JSON object")
    return message


def _number(message: dict[str, Any], key: str, low: float, high: float) -> float:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{key} {value!r} out of range {low:g}..{high:g}")
    return float(value)


def parse_request(message: dict[str, Any], *, max_seconds: float) -> Request:
    """The client's first line (`decode_line`), checked against the server's bounds."""
    test = message.get("test")
    if test not in TESTS:
        raise RequestError(f"unknown test {test!r} (one of {', '.join(TESTS)})")
    if test == "hello":
        return Request("hello")
    seconds = _number(message, "seconds", 0.01, max_seconds)
    reverse = message.get("reverse", False)
    if not isinstance(reverse, bool):
        raise RequestError(f"reverse must be true or false, got {reverse!r}")
    if test != "udp":
        return Request(test, seconds, reverse)
    rate = _number(message, "rate", 1.0, MAX_RATE)
    length = _number(message, "length", MIN_LENGTH, MAX_LENGTH)
    if length != int(length):
        raise RequestError(f"length must be a whole number, got {length!r}")
    return Request(test, seconds, reverse, rate, int(length))


def pack_datagram(buffer: bytearray, kind: int, session: int, seq: int, sent: float) -> None:
    """Write the header into the first bytes of ``buffer`` (the rest is padding)."""
    HEADER.pack_into(buffer, 0, MAGIC, kind, session, seq, sent)


def parse_datagram(data: bytes | bytearray | memoryview) -> Datagram | None:
    """The header of a received datagram; None for anything that is not ours."""
    if len(data) < MIN_LENGTH:
        return None
    magic, kind, session, seq, sent = HEADER.unpack_from(data, 0)
    if magic != MAGIC or kind not in KINDS:
        return None
    return Datagram(kind, session, seq, sent)


@dataclass
class IntervalMeter:
    """Bytes per `INTERVAL` from the first byte on; completed intervals collect in ``done``."""

    start: float | None = None
    last: float | None = None
    total: int = 0
    done: list[Interval] = field(default_factory=list)
    _index: int = 0
    _bytes: int = 0

    def add(self, now: float, count: int) -> None:
        if self.start is None:
            self.start = now
        index = int((now - self.start) / INTERVAL)
        while self._index < index:
            start = self._index * INTERVAL
            self.done.append(Interval(start, start + INTERVAL, self._bytes))
            self._index += 1
            self._bytes = 0
        self._bytes += count
        self.total += count
        self.last = now

    @property
    def seconds(self) -> float:
        """From the first byte to the last."""
        if self.start is None or self.last is None:
            return 0.0
        return self.last - self.start

    def finish(self) -> tuple[Interval, ...]:
        """All intervals, the last one cut at the last byte; their bytes add up to ``total``."""
        if self.start is not None and (self._bytes or not self.done):
            start = self._index * INTERVAL
            self.done.append(Interval(start, max(start, self.seconds), self._bytes))
            self._bytes = 0
        return tuple(self.done)


@dataclass
class UdpCounter:
    """The receiver of one UDP test: packets, highest sequence number, jitter, intervals."""

    session: int
    received: int = 0
    max_seq: int = -1
    meter: IntervalMeter = field(default_factory=IntervalMeter)
    _jitter: float = 0.0  # seconds, RFC 3550 section 6.4.1
    _transit: float | None = None

    def feed(self, datagram: Datagram, size: int, now: float) -> bool:
        """Count one data datagram that arrived at ``now``; False if not of this test."""
        if datagram.kind != UDP_DATA or datagram.session != self.session:
            return False
        self.received += 1
        self.max_seq = max(self.max_seq, datagram.seq)
        transit = now - datagram.sent
        if self._transit is not None:
            self._jitter += (abs(transit - self._transit) - self._jitter) / 16
        self._transit = transit
        self.meter.add(now, size)
        return True

    def lost(self, sent: int | None = None) -> int:
        """Sent (when the sender said) or expected by sequence number, minus received."""
        expected = self.max_seq + 1 if sent is None else max(sent, self.max_seq + 1)
        return max(0, expected - self.received)

    @property
    def jitter_ms(self) -> float | None:
        return self._jitter * 1000 if self.received >= 2 else None

    def summary(self) -> dict[str, Any]:
        """What the receiving server reports back over the control connection."""
        return {
            "received_packets": self.received,
            "received_bytes": self.meter.total,
            "max_seq": self.max_seq,
            "jitter_ms": self.jitter_ms,
            "intervals": [interval_json(i) for i in self.meter.finish()],
        }


def interval_json(interval: Interval) -> dict[str, Any]:
    return {"start": interval.start, "end": interval.end, "bytes": interval.bytes}


def interval_from_json(data: Any) -> Interval:
    """An interval the other side sent; RequestError when it is not one."""
    try:
        return Interval(float(data["start"]), float(data["end"]), int(data["bytes"]))
    except (KeyError, TypeError, ValueError):
        raise RequestError(f"bad interval {data!r}") from None


# -- the UDP rate search ------------------------------------------------------------------

SENT_FRACTION = 0.95  # of the target: a sender below it was the limit, not the path


@dataclass(frozen=True)
class RateTrial:
    """What one UDP run at a target rate gave, as the search needs it."""

    target_bps: float
    sent_bps: float
    received_bps: float
    loss_percent: float

    @property
    def sender_limited(self) -> bool:
        return self.sent_bps < SENT_FRACTION * self.target_bps


def search_udp_rate(
    start_bps: float, steps: int, loss_limit: float, run: Callable[[float], RateTrial]
) -> tuple[int | None, list[RateTrial]]:
    """Highest UDP goodput with loss < ``loss_limit`` %, in at most ``steps`` calls of ``run``.

    A step at target rate R passes when the loss stays under the limit and the
    sender really sent at 95 % of R: R becomes the lower bound. Otherwise the
    rate actually sent is an upper bound (lossy there, or the sender's limit).
    From ``start_bps`` the rate doubles while steps pass, drops to 90 % of that
    upper bound (at least halving) while none has passed, then bisects until
    the bounds are 5 % apart. Returns the index of the best step under the loss
    limit (a sender-limited one counts: nothing was lost, the path was not the
    bottleneck) or None, and every step. The same search for the own tool and
    for iperf3, so their figures mean the same.
    """
    low: float | None = None
    high: float | None = None
    best: int | None = None
    rate: float | None = max(start_bps, 1e6)
    trials: list[RateTrial] = []
    while rate is not None and len(trials) < steps:
        trial = run(rate)
        trials.append(trial)
        lossless = trial.loss_percent < loss_limit
        if lossless and (best is None or trial.received_bps > trials[best].received_bps):
            best = len(trials) - 1
        if lossless and not trial.sender_limited:
            low = max(low or 0.0, rate)
        else:
            high = min(high if high is not None else math.inf, trial.sent_bps)
        rate = _next_rate(rate, low, high)
    return best, trials


def _next_rate(rate: float, low: float | None, high: float | None) -> float | None:
    """The search's next target rate; None when the bounds are 5 % apart."""
    if high is None:
        return rate * 2
    if low is None:
        return min(rate / 2, 0.9 * high)
    if high <= low * 1.05:
        return None
    return (low + high) / 2
