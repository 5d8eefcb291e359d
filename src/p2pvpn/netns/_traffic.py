"""Traffic through a network: a timestamped ping, and a TCP bulk receiver and sender."""

from __future__ import annotations

import itertools
import re
import signal
import time

from p2pvpn.netns._namespace import Namespace
from p2pvpn.netns._testbed import TestBed

__all__ = ["BULK_PORT", "BULK_RECEIVER", "BULK_SENDER", "PingLog"]

# A TCP bulk sender/receiver in plain Python, so nothing needs iperf3.
BULK_RECEIVER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    print("received", total, flush=True)
    conn.close()
"""
BULK_SENDER = """
import socket, sys, time
total = int(sys.argv[3])
started = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as conn:
    block = b"x" * 65536
    sent = 0
    while sent < total:
        conn.sendall(block[: total - sent])
        sent += min(len(block), total - sent)
print("sent", sent, "in", round(time.monotonic() - started, 3), flush=True)
"""
BULK_PORT = 7000

_PING_REPLY = re.compile(
    r"^\[(?P<when>\d+\.\d+)\] \d+ bytes from .*icmp_seq=(?P<seq>\d+).* time=(?P<rtt>[\d.]+) ms"
)
_PING_SEQ = re.compile(r"icmp_seq=(?P<seq>\d+)")


class PingLog:
    """``ping -D -O -i interval`` running in a namespace; its log is parsed on demand.

    Every reply has a wall-clock timestamp (``-D``), and ``-O`` reports the
    sequence numbers that got no answer, so `sent` counts those too.
    """

    def __init__(
        self, bed: TestBed, ns: Namespace, address: str, interval: float = 0.2, name: str = "ping"
    ) -> None:
        self.started = time.time()
        argv = ["ping", "-D", "-O", "-n", "-i", f"{interval:g}", "-W", "1", address]
        self.process = bed.start(ns, argv, name)

    def stop(self) -> None:
        if self.process.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(5)
            except Exception:
                self.process.terminate()

    def replies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Wall-clock times of the replies received in [since, until)."""
        times = []
        for line in self.process.log_text().splitlines():
            match = _PING_REPLY.match(line)
            if match:
                when = float(match["when"])
                if since <= when < until:
                    times.append(when)
        return times

    def rtts_ms(self, since: float = 0.0) -> list[float]:
        """Round-trip times of the replies received since ``since``."""
        rtts = []
        for line in self.process.log_text().splitlines():
            match = _PING_REPLY.match(line)
            if match and float(match["when"]) >= since:
                rtts.append(float(match["rtt"]))
        return rtts

    @property
    def sent(self) -> int:
        seqs = [int(m["seq"]) for m in _PING_SEQ.finditer(self.process.log_text())]
        return max(seqs, default=0)

    @property
    def received(self) -> int:
        return len(self.replies())

    def replies_after(self, moment: float, count: int = 1) -> bool:
        return len(self.replies(moment)) >= count

    def resumed_at(self, moment: float, streak: int = 5) -> float | None:
        """When replies resumed after ``moment``: the first reply of the first run of
        ``streak`` replies in a row spaced at most 1.5 s apart."""
        times = self.replies(moment)
        for i in range(len(times) - streak + 1):
            window = times[i : i + streak]
            if all(b - a <= 1.5 for a, b in itertools.pairwise(window)):
                return window[0]
        return None

    def max_gap(self, since: float, until: float) -> float:
        """The longest time without a reply in [since, until] (edges count)."""
        points = [since, *self.replies(since, until), until]
        return max(b - a for a, b in itertools.pairwise(points))
