"""``p2pvpn bench local --tool iperf3``: iperf3 for throughput, ping for RTT.

The measurements of the old ``bench/e2e/run.py``, for comparing with
earlier results and with the own traffic generator on the same path. The
UDP search here is the same algorithm the own agent runs (`udp_search`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from typing import Any

from p2pvpn._stats import percentile
from p2pvpn.bench._traffic_wire import RateTrial, search_udp_rate
from p2pvpn.bench.local_net import LocalNet
from p2pvpn.bench.local_tools import LOSS_LIMIT, IntervalCallback, TrialCallback, interval_bps
from p2pvpn.bench.report import BenchError
from p2pvpn.netns import Namespace, Process

__all__ = ["IPERF_PORT", "Iperf3Tool", "iperf3_version", "parse_ping", "ping_argv", "tool_line"]

IPERF_PORT = 5201
UDP_WINDOW = "4M"
PING_INTERVAL = 0.05
IPERF_SLACK = 30.0  # seconds an iperf3 run may take beyond its duration
_INTERVAL_RE = re.compile(r"\]\s+\d+\.\d+-\d+\.\d+\s+sec")
_RTT_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


def iperf3_version() -> str:
    """``iperf 3.12``; BenchError when iperf3 is not installed."""
    path = shutil.which("iperf3")
    if path is None:
        raise BenchError("iperf3 is not installed (apt-get install iperf3), or use --tool own")
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "iperf3"


def tool_line() -> str:
    """The table's line that says who measured."""
    return f"tool: {iperf3_version()} (RTT: ping)"


def parse_ping(output: str, count: int) -> dict[str, Any]:
    rtts = [float(match.group(2)) for match in _RTT_RE.finditer(output)]
    return {
        "sent": count,
        "received": len(rtts),
        "p50_ms": percentile(rtts, 50),
        "p99_ms": percentile(rtts, 99),
        "max_ms": max(rtts) if rtts else None,
    }


def ping_argv(dst: str, count: int) -> list[str]:
    return ["ping", "-n", "-c", str(count), "-i", f"{PING_INTERVAL:g}", "-W", "1", dst]


def ping_rtt(ns: Namespace, dst: str, count: int) -> dict[str, Any]:
    result = ns.run(ping_argv(dst, count), check=False, timeout=count * PING_INTERVAL + 15)
    return parse_ping(result.stdout, count)


def _iperf_json(ns: Namespace, argv: list[str], timeout: float) -> dict[str, Any]:
    result = ns.run(argv, check=False, timeout=timeout)
    try:
        data: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"iperf3 gave no JSON (exit {result.returncode}): {result.stderr.strip()[:300]}"
        ) from None
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    return data


def _client_argv(dst: str, seconds: float) -> list[str]:
    # iperf3 reads -t as whole seconds: 0.5 became 0, which means "run for ever".
    whole = max(1, math.ceil(seconds))
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(whole)]
    return [*argv, "--connect-timeout", "5000"]


def iperf_udp(ns: Namespace, dst: str, rate: float, seconds: float, length: int) -> dict[str, Any]:
    # -w: 4 MiB socket buffers at both ends, else the receiving iperf3 drops
    # datagrams in scheduling hiccups long before any path is saturated.
    argv = [*_client_argv(dst, seconds), "-u", "-l", str(length), "-w", UDP_WINDOW]
    data = _iperf_json(ns, [*argv, "-b", str(int(rate)), "-J"], seconds + IPERF_SLACK)
    total = data["end"]["sum"]
    packets = int(total.get("packets") or 0)
    lost = int(total.get("lost_packets") or 0)
    secs = float(total.get("seconds") or seconds)
    return {
        "target_bps": rate,
        "sent_bps": packets * length * 8 / secs if secs else 0.0,
        "received_bps": (packets - lost) * length * 8 / secs if secs else 0.0,
        "loss_percent": float(total.get("lost_percent") or 0.0) if packets else 100.0,
        "jitter_ms": total.get("jitter_ms"),
        "packets": packets,
        "seconds": secs,
    }


def udp_search(
    ns: Namespace,
    dst: str,
    start_bps: float,
    *,
    seconds: float,
    steps: int,
    length: int,
    on_trial: TrialCallback,
) -> dict[str, Any]:
    """Highest UDP goodput with loss < LOSS_LIMIT in at most ``steps`` iperf3 runs,
    by the own tool's search (`search_udp_rate`)."""
    trials: list[dict[str, Any]] = []

    def run(rate: float) -> RateTrial:
        trial = iperf_udp(ns, dst, rate, seconds, length)
        verdict = RateTrial(rate, trial["sent_bps"], trial["received_bps"], trial["loss_percent"])
        trial["sender_limited"] = verdict.sender_limited
        trial["passed"] = trial["loss_percent"] < LOSS_LIMIT and not verdict.sender_limited
        trials.append(trial)
        on_trial(trial)
        return verdict

    index, _ = search_udp_rate(start_bps, steps, LOSS_LIMIT, run)
    best = trials[index] if index is not None else None
    return {
        "best": best,
        "bits_per_second": best["received_bps"] if best else None,
        "loss_percent": best["loss_percent"] if best else None,
        "sender_limited": best["sender_limited"] if best else None,
        "trials": trials,
    }


def _intervals(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"start": s["start"], "end": s["end"], "bytes": s["bytes"]}
        for s in (interval.get("sum") or {} for interval in data.get("intervals", []))
        if "end" in s
    ]


class Iperf3Tool:
    """``iperf3 -s`` in c2's namespace, ``iperf3 -c`` and ping in c1's."""

    name = "iperf3"

    def __init__(self, net: LocalNet) -> None:
        self.net = net
        self.server: Process | None = None

    def start_server(self, address: str) -> None:
        self.stop_server()
        argv = ["iperf3", "-s", "-B", address, "-p", str(IPERF_PORT)]
        self.server = self.net.bed.start(self.net.c2.ns, argv, self.net.name("iperf3-server"))
        self.net.wait_listening(self.net.c2.ns, IPERF_PORT, self.server)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server = None

    def tcp(self, dst: str, seconds: float, on_interval: IntervalCallback) -> dict[str, Any]:
        argv = [*_client_argv(dst, seconds), "-i", "0.5", "-J"]
        data = _iperf_json(self.net.c1.ns, argv, seconds + IPERF_SLACK)
        received, sent = data["end"]["sum_received"], data["end"]["sum_sent"]
        intervals = _intervals(data)
        for interval in intervals:  # iperf3 -J reports them only at the end
            on_interval(float(interval["end"]), interval_bps(interval))
        return {
            "bits_per_second": received["bits_per_second"],
            "bytes": received["bytes"],
            "seconds": received["seconds"],
            "retransmits": sent.get("retransmits"),
            "intervals": intervals,
        }

    def udp_search(
        self,
        dst: str,
        start_bps: float,
        *,
        seconds: float,
        steps: int,
        length: int,
        on_trial: TrialCallback,
    ) -> dict[str, Any]:
        return udp_search(
            self.net.c1.ns,
            dst,
            start_bps,
            seconds=seconds,
            steps=steps,
            length=length,
            on_trial=on_trial,
        )

    def rtt(self, dst: str, count: int) -> dict[str, Any]:
        return ping_rtt(self.net.c1.ns, dst, count)

    def loaded_rtt(self, dst: str, seconds: float, on_interval: IntervalCallback) -> dict[str, Any]:
        """Ping while an iperf3 TCP run (``seconds``) is under way."""
        argv = [*_client_argv(dst, seconds), "-i", "0.5", "--forceflush"]
        load = self.net.bed.start(self.net.c1.ns, argv, self.net.name("iperf3-load"))
        try:
            # Ping from the first reported interval until ~1 s before the load ends.
            load.wait_for_log(_INTERVAL_RE, timeout=15)
            count = max(10, int((seconds - 1.5) / PING_INTERVAL))
            result = ping_rtt(self.net.c1.ns, dst, count)
            on_interval(seconds - 1.0, 0.0)
            load.wait(timeout=seconds + IPERF_SLACK)
        finally:
            load.terminate()
        if load.returncode != 0:
            raise BenchError(f"iperf3 load run failed: {load.tail(5)}")
        return result
