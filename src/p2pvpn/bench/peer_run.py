"""The measurements of `p2pvpn bench peer`: what runs in which order, and the CPU it cost.

Per direction (upload: we send; download: the peer sends): TCP, then UDP at a
rate taken from that TCP figure (tried again lower when most of it was lost;
or ``--udp-rate``, or a short search), then
the RTT while a TCP run loads the link. The idle RTT comes first, on the quiet
link. The local client's CPU time is read around every test, so each
direction gets its own CPU seconds per GB.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from p2pvpn._format import format_rate
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import BenchError, Series
from p2pvpn.bench.traffic import (
    BenchClient,
    Interval,
    RttResult,
    SearchResult,
    TcpResult,
    UdpResult,
)

__all__ = [
    "DIRECTIONS",
    "DirectionResult",
    "PeerMeasurement",
    "PeerOptions",
    "measure_peer",
    "planned_seconds",
]

logger = logging.getLogger(__name__)

DIRECTIONS = ("upload", "download")
# Without --udp-rate, UDP runs a little below what TCP carried: near the link's
# capacity, where loss shows, but not so far above it that the loss is only the
# sender outrunning the link.
UDP_FRACTION_OF_TCP = 0.9
RETRY_LOSS = 5.0  # percent: above it, the default rate gets a second try at what arrived
UDP_FALLBACK_BPS = 10e6  # when the TCP run failed and gave no figure
UDP_MIN_BPS = 1e6
SEARCH_STEPS = 3
RTT_INTERVAL = 0.05
BUSY_WAIT = 3.0  # seconds to keep asking a bench server that says it is busy
BUSY_RETRY = 0.2

T = TypeVar("T")


@dataclass(frozen=True)
class PeerOptions:
    seconds: float
    udp_rate: float | None  # bits/s; None: a fraction of TCP
    udp_search: bool = False  # search for the rate with little loss instead

    def udp_rate_source(self) -> str:
        if self.udp_search:
            return f"search ({SEARCH_STEPS} steps from the TCP figure)"
        if self.udp_rate is not None:
            return "--udp-rate"
        return (
            f"{UDP_FRACTION_OF_TCP:.0%} of TCP; over {RETRY_LOSS:g} % loss, "
            f"again at {UDP_FRACTION_OF_TCP:.0%} of what arrived"
        )

    def rtt_count(self) -> int:
        return max(10, min(100, round(self.seconds / RTT_INTERVAL)))


@dataclass
class DirectionResult:
    direction: str  # "upload" | "download"
    tcp: TcpResult | None = None
    udp: UdpResult | None = None
    udp_rate_bps: float | None = None
    udp_first_try: UdpResult | None = None  # the default rate's lossy first try
    search: SearchResult | None = None
    loaded_rtt: RttResult | None = None
    loaded_tcp: TcpResult | None = None
    cpu_seconds: float | None = 0.0  # None: the client's CPU time could not be read
    bytes_moved: int = 0  # through the local client during this direction's tests
    errors: list[str] = field(default_factory=list)


@dataclass
class PeerMeasurement:
    rtt_idle: RttResult | None = None
    directions: dict[str, DirectionResult] = field(default_factory=dict)
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def planned_seconds(options: PeerOptions) -> float:
    """What the progress bar counts: the idle RTT and three tests per direction."""
    udp = options.seconds * (SEARCH_STEPS if options.udp_search else 1)
    return options.rtt_count() * RTT_INTERVAL + len(DIRECTIONS) * (2 * options.seconds + udp)


class _CpuMeter:
    """Adds the client's CPU seconds during each test to its direction."""

    def __init__(self, read_cpu: Callable[[], float | None]) -> None:
        self._read_cpu = read_cpu

    def run(self, result: DirectionResult, test: Callable[[], T]) -> T:
        before = self._read_cpu()
        try:
            return test()
        finally:
            after = self._read_cpu()
            if before is None or after is None or result.cpu_seconds is None:
                result.cpu_seconds = None
            else:
                result.cpu_seconds += after - before


class _Runner:
    def __init__(
        self,
        bench: BenchClient,
        options: PeerOptions,
        progress: Progress,
        read_cpu: Callable[[], float | None],
    ) -> None:
        self.bench, self.options, self.progress = bench, options, progress
        self.cpu = _CpuMeter(read_cpu)
        self.measurement = PeerMeasurement()
        self._planned = 0.0  # where the bar stands at the end of the current test

    def _test(self, name: str, seconds: float, test: Callable[[], T]) -> T | None:
        """One test: shown as a step, its error recorded instead of ending the run."""
        self.progress.step(name)
        start, self._planned = self._planned, self._planned + seconds
        try:
            return self._retrying_busy(test)
        except BenchError as exc:
            logger.debug("%s failed: %s", name, exc)
            self.measurement.errors.append(f"{name}: {exc}")
            return None
        finally:
            self.progress.update(done=max(self._planned, start))

    @staticmethod
    def _retrying_busy(test: Callable[[], T]) -> T:
        """``test()``, again after a moment while the server says it is busy.

        The server may still be closing our previous test when the next
        request comes; another member's test would keep it busy for longer.
        """
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                return test()
            except BenchError as exc:
                if "busy" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(BUSY_RETRY)

    def _tracker(self, label: str) -> Callable[[Interval], None]:
        series = Series(label, "Mbit/s")

        def on_interval(interval: Interval) -> None:
            bps = interval.bits_per_second
            self.progress.advance(interval.end - interval.start, f"{label} {format_rate(bps)}")
            if interval.partial:
                return
            if not series.points:  # not before: a refused try leaves no empty series
                self.measurement.series.append(series)
            series.points.append((round(interval.end, 3), round(bps / 1e6, 3)))

        return on_interval

    def idle_rtt(self) -> None:
        count = self.options.rtt_count()
        self.measurement.rtt_idle = self._test(
            "idle RTT", count * RTT_INTERVAL, lambda: self.bench.rtt(count, interval=RTT_INTERVAL)
        )

    def direction(self, direction: str) -> DirectionResult:
        result = DirectionResult(direction)
        self.measurement.directions[direction] = result
        reverse = direction == "download"
        seconds = self.options.seconds
        result.tcp = self._test(
            f"{direction} TCP",
            seconds,
            lambda: self.cpu.run(
                result,
                lambda: self.bench.tcp(
                    seconds, reverse=reverse, on_interval=self._tracker(f"{direction} TCP")
                ),
            ),
        )
        if result.tcp is not None:
            result.bytes_moved += result.tcp.bytes
        self._udp(result, reverse)
        loaded = self._test(
            f"{direction} loaded RTT",
            seconds,
            lambda: self.cpu.run(
                result,
                lambda: self.bench.loaded_rtt(seconds, interval=RTT_INTERVAL, reverse=reverse),
            ),
        )
        if loaded is not None:
            result.loaded_rtt, result.loaded_tcp = loaded
            result.bytes_moved += loaded[1].bytes
        return result

    def _udp(self, result: DirectionResult, reverse: bool) -> None:
        options, direction = self.options, result.direction
        tcp_bps = result.tcp.bits_per_second if result.tcp is not None else None
        if options.udp_search:
            result.search = self._test(
                f"{direction} UDP search",
                options.seconds * SEARCH_STEPS,
                lambda: self.cpu.run(result, lambda: self._search(tcp_bps, reverse)),
            )
            result.udp = result.search.best if result.search is not None else None
            result.udp_rate_bps = result.udp.target_bps if result.udp is not None else None
            if result.search is not None:
                result.bytes_moved += sum(udp_bytes(trial) for trial in result.search.trials)
            return
        self._udp_at(result, udp_rate(options, tcp_bps), reverse)
        first = result.udp
        if options.udp_rate is None and first is not None and first.loss_percent > RETRY_LOSS:
            # Far above what the path carries, the loss only says the sender outran
            # it (UDP has no TSO/GRO to batch like TCP): try again at what arrived.
            result.udp_first_try = first
            if self.progress.total is not None:
                self.progress.total += options.seconds  # the bar keeps its meaning
            self._udp_at(
                result, max(first.received_bps * UDP_FRACTION_OF_TCP, UDP_MIN_BPS), reverse
            )

    def _udp_at(self, result: DirectionResult, rate: float, reverse: bool) -> None:
        """One UDP test at ``rate``; it becomes the direction's UDP figure."""
        label = f"{result.direction} UDP {format_rate(rate)}"
        result.udp_rate_bps = rate
        result.udp = self._test(
            label,
            self.options.seconds,
            lambda: self.cpu.run(
                result,
                lambda: self.bench.udp(
                    rate, self.options.seconds, reverse=reverse, on_interval=self._tracker(label)
                ),
            ),
        )
        if result.udp is not None:
            result.bytes_moved += udp_bytes(result.udp)

    def _search(self, tcp_bps: float | None, reverse: bool) -> SearchResult:
        def on_trial(trial: UdpResult) -> None:
            detail = f"UDP {format_rate(trial.target_bps)}: {trial.loss_percent:.2f} % loss"
            self.progress.advance(self.options.seconds, detail)

        return self.bench.udp_search(
            max(tcp_bps or UDP_FALLBACK_BPS, UDP_MIN_BPS),
            seconds=self.options.seconds,
            steps=SEARCH_STEPS,
            reverse=reverse,
            on_trial=on_trial,
        )


def udp_rate(options: PeerOptions, tcp_bps: float | None) -> float:
    """The UDP rate of one direction: ``--udp-rate``, else a fraction of its TCP figure."""
    if options.udp_rate is not None:
        return options.udp_rate
    if not tcp_bps:
        return UDP_FALLBACK_BPS
    return max(tcp_bps * UDP_FRACTION_OF_TCP, UDP_MIN_BPS)


def udp_bytes(result: UdpResult) -> int:
    """What one UDP test moved through the local client.

    Uploads: every datagram sent was encrypted here, lost or not. Downloads:
    only the datagrams that arrived were decrypted here.
    """
    packets = result.sent_packets if result.sender == "client" else result.received_packets
    return packets * result.length


def measure_peer(
    bench: BenchClient,
    options: PeerOptions,
    progress: Progress,
    read_cpu: Callable[[], float | None],
) -> PeerMeasurement:
    """Idle RTT, then per direction TCP, UDP and the loaded RTT."""
    runner = _Runner(bench, options, progress, read_cpu)
    runner.idle_rtt()
    for direction in DIRECTIONS:
        runner.direction(direction)
    return runner.measurement
