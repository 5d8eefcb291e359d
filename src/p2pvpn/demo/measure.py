"""Ping and throughput between namespaces: iperf3 when installed, else `p2pvpn.bench.traffic`."""

import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from p2pvpn.demo.output import DemoError
from p2pvpn.netns import CommandError, Namespace, Process, Tick, ping_argv, terminate_all, wait_for

__all__ = [
    "THROUGHPUT_PORT",
    "PingResult",
    "Throughput",
    "ThroughputMeter",
    "parse_iperf3",
    "parse_ping",
    "parse_traffic",
    "ping",
    "ping_many",
]

THROUGHPUT_PORT = 5201
LISTEN_TIMEOUT = 20.0
# How much longer than its duration a throughput run may take (start-up, a slow relay).
RUN_SLACK = 60.0

_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT_RE = re.compile(r"=\s*([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)\s*ms")


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    min_ms: float | None = None
    avg_ms: float | None = None
    max_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.received > 0


def parse_ping(output: str) -> PingResult | None:
    """The summary of iputils ``ping -q`` (None when there is none, e.g. unknown host)."""
    summary = _SUMMARY_RE.search(output)
    if summary is None:
        return None
    rtt = _RTT_RE.search(output)
    low, avg, high = (float(rtt.group(i)) for i in (1, 2, 3)) if rtt else (None, None, None)
    return PingResult(int(summary.group(1)), int(summary.group(2)), low, avg, high)


def _ping_timeout(count: int, interval: float, wait: int) -> float:
    return count * interval + wait + 10.0


def ping(
    ns: Namespace, address: IPv4Address, count: int = 1, *, interval: float = 0.2, wait: int = 1
) -> PingResult:
    """Ping ``address`` from ``ns``; a result with ``received == 0`` when nothing came back."""
    result = ns.run(
        ping_argv(address, count, interval=interval, wait=wait),
        check=False,
        timeout=_ping_timeout(count, interval, wait),
    )
    return parse_ping(result.stdout) or PingResult(count, 0)


def ping_many(
    jobs: Sequence[tuple[Namespace, IPv4Address]], count: int, *, interval: float = 0.2
) -> list[PingResult]:
    """Ping all at once (one ``ping`` per job, in parallel); results in the order of ``jobs``."""
    wait = 2
    running = []
    try:
        for ns, address in jobs:
            argv = ns.exec_argv(ping_argv(address, count, interval=interval, wait=wait))
            running.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        results = []
        for popen in running:
            try:
                output, _ = popen.communicate(timeout=_ping_timeout(count, interval, wait))
            except subprocess.TimeoutExpired:
                output = ""
            results.append(parse_ping(output) or PingResult(count, 0))
        return results
    finally:
        for popen in running:
            if popen.poll() is None:
                popen.kill()
                popen.wait()


@dataclass(frozen=True)
class Throughput:
    bits_per_second: float
    seconds: float
    tool: str


def parse_iperf3(text: str) -> Throughput:
    """The received rate from ``iperf3 -c ... -J``; ValueError with iperf3's own message."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("iperf3 printed no JSON result") from None
    if not isinstance(data, dict):
        raise ValueError("iperf3 printed an unexpected result")
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    try:
        received = data["end"]["sum_received"]
        return Throughput(float(received["bits_per_second"]), float(received["seconds"]), "iperf3")
    except (KeyError, TypeError, ValueError):
        raise ValueError("iperf3 result has no end.sum_received") from None


def parse_traffic(text: str) -> Throughput:
    """The last line of ``python -m p2pvpn.bench.traffic tcp`` (``{"result": {...}}``
    or ``{"error": "..."}``); ValueError with the tool's own message."""
    lines = text.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        raise ValueError(data["error"])
    try:
        result = data["result"]  # type: ignore[index]
        bits_per_second, seconds = float(result["bits_per_second"]), float(result["seconds"])
    except (TypeError, KeyError, ValueError):
        raise ValueError("the TCP transfer printed no result") from None
    if seconds <= 0 or bits_per_second <= 0:
        raise ValueError("the TCP transfer received nothing")
    return Throughput(bits_per_second, seconds, "p2pvpn traffic")


class ThroughputMeter:
    """One TCP throughput run between two namespaces through the VPN."""

    def __init__(
        self,
        *,
        iperf3: bool,
        log_dir: Path,
        on_start: Callable[[Process], None] | None = None,
    ) -> None:
        self.iperf3 = iperf3
        self.log_dir = log_dir
        self._on_start = on_start

    @property
    def tool(self) -> str:
        return "iperf3" if self.iperf3 else "the p2pvpn traffic tool"

    def _server_argv(self, duration: int) -> list[str]:
        if self.iperf3:
            return ["iperf3", "-s", "-1", "-p", str(THROUGHPUT_PORT)]
        return [
            sys.executable, "-m", "p2pvpn.bench.traffic", "serve", "0.0.0.0",
            "--port", str(THROUGHPUT_PORT), "--max-seconds", str(duration + 1),
        ]  # fmt: skip

    def _client_argv(self, address: IPv4Address, duration: int) -> list[str]:
        if self.iperf3:
            return [
                "iperf3", "-c", str(address), "-p", str(THROUGHPUT_PORT), "-t", str(duration), "-J",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "p2pvpn.bench.traffic", "tcp", str(address),
            "--port", str(THROUGHPUT_PORT), "--seconds", str(duration), "--timeout", "10",
        ]  # fmt: skip

    def measure(
        self,
        receiver: Namespace,
        sender: Namespace,
        address: IPv4Address,
        duration: int,
        *,
        label: str,
        tick: Tick,
    ) -> Throughput:
        """Send from ``sender`` to ``address`` (``receiver``'s VPN address) for ``duration`` s."""
        name = f"throughput-{label}"
        server = receiver.start(
            self._server_argv(duration), self.log_dir / f"{name}.log", name=name
        )
        if self._on_start is not None:
            self._on_start(server)
        try:

            def ready() -> bool:
                return not server.alive() or receiver.listening("tcp", THROUGHPUT_PORT)

            if not wait_for(ready, LISTEN_TIMEOUT, tick=tick) or not server.alive():
                raise DemoError(f"the {self.tool} receiver did not start", server.tail(5))
            timeout = duration + RUN_SLACK
            try:
                result = sender.run(
                    self._client_argv(address, duration), timeout=timeout, check=False
                )
            except CommandError:
                raise DemoError(f"{self.tool} did not finish within {timeout:g} s") from None
        finally:
            terminate_all([server], grace=2.0)
        try:
            if self.iperf3:
                return parse_iperf3(result.stdout)
            return parse_traffic(result.stdout)
        except ValueError as exc:
            details = (result.stderr.strip() or result.stdout.strip()).splitlines()[-5:]
            raise DemoError(str(exc), details) from None
