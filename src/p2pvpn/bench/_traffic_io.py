"""The socket side the bench traffic server and client share: control lines, pacing, timeouts."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from p2pvpn.bench._traffic_wire import (
    MAX_LINE,
    UDP_DATA,
    Request,
    RequestError,
    decode_line,
    encode_line,
    pack_datagram,
)

__all__ = [
    "DRAIN_MAX",
    "GRACE",
    "JOIN_TIMEOUT",
    "POLL",
    "RECV_BUFFER",
    "TCP_CHUNK",
    "Lines",
    "big_receive_buffer",
    "bits_per_second",
    "bulk_mode",
    "close_gently",
    "drain",
    "join_all",
    "send_line",
    "send_paced",
]

TCP_CHUNK = 256 * 1024  # bytes per sendall: big enough for tens of Gbit/s, small for slow links
RECV_BUFFER = 1024 * 1024
UDP_BUFFER = 4 * 1024 * 1024  # bytes of datagrams the receiver may fall behind by
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's; Python has it from 3.12
DRAIN_QUIET = 0.2  # the receiver stops waiting for late datagrams after this much quiet...
DRAIN_MAX = 1.0  # ...or this long after the sender said it is done
POLL = 0.1
GRACE = 5.0  # seconds a test may take beyond the seconds it asked for
JOIN_TIMEOUT = 2.0
MAX_BURST = 256  # datagrams sent back to back before the pacer looks at the clock again


def bits_per_second(count: int, seconds: float) -> float:
    """``count`` bytes in ``seconds``; 0 when no time passed."""
    return count * 8 / seconds if seconds > 0 else 0.0


class Lines:
    """JSON lines from a socket, at most `MAX_LINE` bytes each; bytes after a line stay."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next line as a JSON object; None at EOF; TimeoutError when it is not
        complete after ``timeout`` seconds (None: the socket's own timeout per read;
        what was read so far stays); RequestError when it is not a bounded JSON line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return decode_line(line)
            if len(self._buffer) >= MAX_LINE:
                raise RequestError(f"line longer than {MAX_LINE} bytes")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no complete line in time")
                self._sock.settimeout(left)
            chunk = self._sock.recv(MAX_LINE)
            if not chunk:
                return None
            self._buffer += chunk

    def take_rest(self) -> int:
        """How many bytes after the last line were read already (they are data)."""
        count = len(self._buffer)
        self._buffer.clear()
        return count


def big_receive_buffer(udp: socket.socket) -> None:
    """`UDP_BUFFER` bytes to receive into: past net.core.rmem_max when we may (root),
    so that a moment without the CPU does not drop a burst of datagrams."""
    try:
        udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_BUFFER)
    except OSError:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)


def bulk_mode(sock: socket.socket, *, receive: float, send: float) -> None:
    """Blocking with the kernel's own timeouts, one per direction: no poll() before
    every call as with Python's timeouts (it costs throughput), and a thread reading
    control lines with a short timeout no longer shortens another one's sendall.
    A timed-out call raises BlockingIOError."""
    sock.settimeout(None)
    for option, seconds in ((socket.SO_RCVTIMEO, receive), (socket.SO_SNDTIMEO, send)):
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, option, timeval)


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_line(message))


def send_paced(
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


def drain(last_arrival: Callable[[], float | None]) -> None:
    """Wait for late datagrams: until `DRAIN_QUIET` without one, at most `DRAIN_MAX`."""
    start = time.monotonic()
    while (now := time.monotonic()) < start + DRAIN_MAX:
        if now - max(start, last_arrival() or start) >= DRAIN_QUIET:
            return
        time.sleep(0.02)


def close_gently(sock: socket.socket) -> None:
    """Close after reading what the other side still sends (briefly): closing with
    unread bytes resets the connection, and the reset can overtake the last answer."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(RECV_BUFFER):
                break
    sock.close()


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
