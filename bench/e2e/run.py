#!/usr/bin/env python3
"""End-to-end benchmark: iperf3 and ping through p2pvpn between two namespaces.

Run as root from the repository root (see bench/e2e/README.md)::

    sudo python3 bench/e2e/run.py            # full run, about 5-6 minutes
    sudo python3 bench/e2e/run.py --quick    # smoke run, under 2 minutes

One run builds a NAT-free topology in network namespaces (a server and two
clients on one bridge segment, 198.51.100.0/24, which exists only inside the
namespaces) and measures, one after the other:

* ``raw``: iperf3/ping between the two client namespaces' segment addresses;
* ``pure``: p2pvpn direct path (``-s stun://...``), ``--dataplane pure``;
* ``fast-no-offload``: the same with ``--dataplane fast --offload off`` (a
  plain TUN device, one IP packet per read and write; "unavailable" when the
  compiled data plane is not built);
* ``fast``: ``--dataplane fast`` with the default ``--offload auto`` (TUN
  offloads: 64 KB TCP super-packets between the kernel and the data plane);
* ``relay``: clients without ``-s``, every packet through the server,
  ``--dataplane auto`` (the table says which data plane ran).

Per path: iperf3 TCP (median of N runs), the highest iperf3 UDP rate with
loss under 1 % (a short search), ping RTT p50/p99 idle and under TCP load,
CPU seconds of all p2pvpn processes per GB moved, and their peak RSS. The
table shows absolute numbers and ratios against ``raw`` from the same run,
then the targets of issue 13 (fast against fast-no-offload and raw) with
their verdicts; JSON goes to ``bench/e2e/results-<timestamp>.json`` (or
``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pvpn._format import format_table
from p2pvpn._stats import percentile
from p2pvpn.netns import (
    CommandError,
    Namespace,
    Process,
    TestBed,
    missing_requirements,
    p2pvpn_argv,
    process_env,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("raw", "pure", "fast-no-offload", "fast", "fast-base", "relay")
# Run by default; fast-base only with --baseline-src.
DEFAULT_VARIANTS = ("raw", "pure", "fast-no-offload", "fast", "relay")
SEGMENT = "198.51.100.0/24"
SERVER_ADDR, C1_ADDR, C2_ADDR = "198.51.100.1/24", "198.51.100.2/24", "198.51.100.3/24"
TUN1, TUN2 = "10.77.0.1", "10.77.0.2"
TUN_PREFIX = 24
POOL = "10.77.0.0/24"
WS_PORT = 8080
STUN_PORT = 3478
IPERF_PORT = 5201
PASSWORD = "bench-e2e-password"

LOSS_LIMIT = 1.0  # percent
UDP_HEADERS = 28  # IPv4 + UDP
UDP_WINDOW = "4M"
PING_INTERVAL = 0.05
IDLE_PINGS = 100
STARTUP_TIMEOUT = 40.0
PATH_TIMEOUT = 40.0
IPERF_SLACK = 30.0  # seconds an iperf3 run may take beyond its duration
CLK_TCK = os.sysconf("SC_CLK_TCK")

_INTERVAL_RE = re.compile(r"\]\s+\d+\.\d+-\d+\.\d+\s+sec")
_RTT_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")
_UNAVAILABLE_RE = re.compile(r"DataPlaneUnavailable|does not provide a data plane|not available")


class BenchError(RuntimeError):
    """A measurement failed; the variant is reported as failed, the run goes on."""


class UnavailableError(BenchError):
    """The variant cannot run on this build (e.g. no compiled data plane)."""


# --------------------------------------------------------------------------
# small helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _command_output(argv: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_description() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    info: dict[str, Any] = {
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "openssl_cli": _command_output(["openssl", "version"]),
        "iperf3": _command_output(["iperf3", "--version"]),
        "loadavg_start": _read("/proc/loadavg").split()[:3],
    }
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl import backend

        info["cryptography_openssl"] = backend.openssl_version_text()
    with contextlib.suppress(Exception):
        import p2pvpn

        info["p2pvpn"] = p2pvpn.__version__
    info["fastpath_libcrypto"] = _fastpath_libcrypto()
    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain"])
    info["git"] = f"{commit}{'+dirty' if dirty else ''}" if commit else None
    return info


def _fastpath_libcrypto() -> str | None:
    """The OpenSSL version of the libcrypto the compiled extension links against."""
    try:
        import ctypes

        import p2pvpn._fastpath as fastpath
    except Exception:
        return None
    ldd = subprocess.run(
        ["ldd", str(fastpath.__file__)], capture_output=True, text=True, check=False
    )
    match = re.search(r"libcrypto\S*\s+=>\s+(\S+)", ldd.stdout)
    if not match:
        return None
    try:
        lib = ctypes.CDLL(match.group(1))
        lib.OpenSSL_version.restype = ctypes.c_char_p
        lib.OpenSSL_version.argtypes = [ctypes.c_int]
        return f"{lib.OpenSSL_version(0).decode()} ({match.group(1)})"
    except (OSError, AttributeError):
        return match.group(1)


# --------------------------------------------------------------------------
# /proc: CPU time and peak RSS


def _descendants(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            queue.extend(int(child) for child in _read(str(task)).split())
    return pids


def cpu_ticks(pid: int) -> int:
    """utime + stime (clock ticks) of ``pid`` and its descendants, all threads."""
    total = 0
    for member in _descendants(pid):
        stat = _read(f"/proc/{member}/stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def peak_rss_kib(pid: int) -> int | None:
    match = re.search(r"^VmHWM:\s+(\d+) kB", _read(f"/proc/{pid}/status"), re.MULTILINE)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------
# iperf3 and ping


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


def iperf_tcp(ns: Namespace, dst: str, duration: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
    argv += ["--connect-timeout", "5000"]
    data = _iperf_json(ns, argv, duration + IPERF_SLACK)
    received, sent = data["end"]["sum_received"], data["end"]["sum_sent"]
    return {
        "bits_per_second": received["bits_per_second"],
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "retransmits": sent.get("retransmits"),
    }


def iperf_udp(ns: Namespace, dst: str, rate: float, seconds: float, length: int) -> dict[str, Any]:
    # -w: 4 MiB socket buffers at both ends, else the receiving iperf3 drops
    # datagrams in scheduling hiccups long before any path is saturated.
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-u", "-l", str(length), "-w", UDP_WINDOW]
    argv += ["-b", str(int(rate)), "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000"]
    data = _iperf_json(ns, argv, seconds + IPERF_SLACK)
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
    ns: Namespace, dst: str, start_bps: float, *, seconds: float, steps: int, length: int
) -> dict[str, Any]:
    """Highest UDP goodput with loss < LOSS_LIMIT, in at most ``steps`` iperf3 runs.

    A step at target rate R passes when the loss stays under the limit and
    iperf3 really sent at 95 % of R: R becomes the lower bound. Otherwise the
    rate iperf3 did send is an upper bound (lossy there, or the sender's
    limit). From ``start_bps`` the rate doubles while steps pass, drops to 90 %
    of that upper bound (at least halving) while none has passed, then
    bisects. The result is the best goodput of any step under the loss limit
    (a sender-limited step counts: nothing was lost, the path was not the
    bottleneck; ``sender_limited`` says so).
    """
    low: float | None = None
    high: float | None = None
    best: dict[str, Any] | None = None
    rate = max(start_bps, 1e6)
    trials = []
    for _ in range(steps):
        trial = iperf_udp(ns, dst, rate, seconds, length)
        lossless = trial["loss_percent"] < LOSS_LIMIT
        trial["sender_limited"] = trial["sent_bps"] < 0.95 * rate
        trial["passed"] = lossless and not trial["sender_limited"]
        trials.append(trial)
        verdict = "ok" if trial["passed"] else "sender limit" if lossless else "too fast"
        log(
            f"    udp {rate / 1e6:9.1f} Mbit/s: loss {trial['loss_percent']:.2f} %, "
            f"sent {trial['sent_bps'] / 1e6:.1f} Mbit/s -> {verdict}"
        )
        if lossless and (best is None or trial["received_bps"] > best["received_bps"]):
            best = trial
        if trial["passed"]:
            low = max(low or 0.0, rate)
        else:
            high = min(high or math.inf, trial["sent_bps"])
        if high is None:
            rate = rate * 2
        elif low is None:
            rate = min(rate / 2, 0.9 * high)
        elif high <= low * 1.05:
            break
        else:
            rate = (low + high) / 2
    return {
        "best": best,
        "bits_per_second": best["received_bps"] if best else None,
        "loss_percent": best["loss_percent"] if best else None,
        "sender_limited": best["sender_limited"] if best else None,
        "trials": trials,
    }


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


def ping_under_load(bed: TestBed, ns: Namespace, dst: str, duration: float) -> dict[str, Any]:
    """Ping while an iperf3 TCP run (``duration`` s) is under way."""
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-i", "0.5"]
    load = bed.start(ns, [*argv, "--forceflush", "--connect-timeout", "5000"], "iperf3-load")
    try:
        # Ping from the first reported interval until ~1 s before the load ends.
        load.wait_for_log(_INTERVAL_RE, timeout=15)
        count = max(10, int((duration - 1.5) / PING_INTERVAL))
        result = ping_rtt(ns, dst, count)
        load.wait(timeout=duration + IPERF_SLACK)
    finally:
        load.terminate()
    if load.returncode != 0:
        raise BenchError(f"iperf3 load run failed: {load.tail(5)}")
    return result


# --------------------------------------------------------------------------
# the network


@dataclass
class Node:
    name: str
    ns: Namespace
    segment_ip: str
    tun_ip: str | None = None
    process: Process | None = None


@dataclass
class Bench:
    bed: TestBed
    work: Path
    server: Node
    c1: Node
    c2: Node
    iperf_server: Process | None = None
    runs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, bed: TestBed, work: Path) -> Bench:
        server_ns, c1_ns, c2_ns = (bed.namespace(n) for n in ("srv", "c1", "c2"))
        bed.segment(
            "wan",
            SEGMENT,
            [server_ns, c1_ns, c2_ns],
            addresses=[SERVER_ADDR, C1_ADDR, C2_ADDR],
        )
        ip = [address.split("/")[0] for address in (SERVER_ADDR, C1_ADDR, C2_ADDR)]
        return cls(
            bed,
            work,
            Node("server", server_ns, ip[0]),
            Node("c1", c1_ns, ip[1], TUN1),
            Node("c2", c2_ns, ip[2], TUN2),
        )

    def _name(self, base: str) -> str:
        self.runs[base] = self.runs.get(base, 0) + 1
        return f"{base}-{self.runs[base]}"

    # iperf3 server

    def start_iperf_server(self) -> None:
        self.stop_iperf_server()
        self.iperf_server = self.bed.start(
            self.c2.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], self._name("iperf3-server")
        )
        self._wait_listening(self.c2.ns, f"-ltn sport = :{IPERF_PORT}", self.iperf_server)

    def stop_iperf_server(self) -> None:
        if self.iperf_server is not None:
            self.iperf_server.terminate()
            self.iperf_server = None

    def _wait_listening(self, ns: Namespace, ss_filter: str, process: Process) -> None:
        def listening() -> bool:
            if not process.alive():
                raise BenchError(f"{process.name} exited: {process.tail(10)}")
            out = ns.run(["sh", "-c", f"ss -H {ss_filter}"], check=False).stdout
            return bool(out.strip())

        wait_until(listening, timeout=STARTUP_TIMEOUT, message=f"{process.name} never listened")

    # p2pvpn processes

    def start_vpn(
        self, dataplane: str, stun: bool, source: Path | None = None, offload: str | None = None
    ) -> None:
        """Server and clients; from the `source` tree (a ``src`` folder with its
        extension built in place) instead of this one, for a same-run A/B.
        ``offload``: the clients' ``--offload`` (None: their default, auto)."""
        self.stop_vpn()
        env = {"PYTHONPATH": str(source)} if source else None
        server_argv = ["server", "-w", f"ws://0.0.0.0:{WS_PORT}/", "-p", PASSWORD]
        server_argv += ["--stun-port", str(STUN_PORT), "--dhcp", POOL]
        self.server.process = self.bed.start(
            self.server.ns, p2pvpn_argv(*server_argv), self._name("server"), env=env
        )
        self._wait_listening(self.server.ns, f"-ltn sport = :{WS_PORT}", self.server.process)
        for node in (self.c1, self.c2):
            assert node.tun_ip is not None
            argv = ["run", "-w", f"ws://{self.server.segment_ip}:{WS_PORT}/", "-p", PASSWORD]
            argv += ["-n", node.name, "--state-dir", str(self.state_dir(node))]
            argv += ["-t", f"{node.tun_ip}/{TUN_PREFIX}", "--dataplane", dataplane]
            if stun:
                argv += ["-s", f"stun://{self.server.segment_ip}:{STUN_PORT}"]
            if offload is not None:
                argv += ["--offload", offload]
            node.process = self.bed.start(
                node.ns, p2pvpn_argv(*argv), self._name(node.name), env=env
            )
        for node in (self.c1, self.c2):
            self._wait_client_up(node)

    def stop_vpn(self) -> None:
        for node in (self.c1, self.c2, self.server):
            if node.process is not None:
                node.process.terminate()
                node.process = None

    def vpn_nodes(self) -> list[Node]:
        return [n for n in (self.server, self.c1, self.c2) if n.process is not None]

    def state_dir(self, node: Node) -> Path:
        return self.work / "state" / node.name

    def status(self, node: Node) -> dict[str, Any]:
        # `run --state-dir` names the client's own directory, `status` their parent.
        argv = p2pvpn_argv("status", "--json", "--state-dir", str(self.state_dir(node).parent))
        result = node.ns.run([*argv, "-n", node.name], check=False, timeout=15)
        if result.returncode != 0:
            raise BenchError(f"status of {node.name}: {result.stderr.strip()[:300]}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def peer_row(self, node: Node, tun_ip: str) -> dict[str, Any] | None:
        for row in self.status(node).get("peers", []):
            if row.get("tun_ip") == tun_ip:
                return dict(row)
        return None

    def _check_alive(self, node: Node) -> None:
        process = node.process
        if process is None or process.alive():
            return
        # The last line that says so (after a traceback: the exception's message).
        for line in reversed(process.log_text().splitlines()):
            if _UNAVAILABLE_RE.search(line):
                raise UnavailableError(line.strip())
        raise BenchError(f"{node.name} exited with status {process.returncode}: {process.tail(8)}")

    def _wait_client_up(self, node: Node) -> None:
        def up() -> bool:
            self._check_alive(node)
            try:
                status = self.status(node)
            except (BenchError, json.JSONDecodeError):
                return False
            return bool(status.get("address") and status.get("dataplane"))

        self._wait(up, STARTUP_TIMEOUT, f"{node.name}: VPN interface never came up")

    def _wait(self, predicate: Callable[[], Any], timeout: float, message: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for node in self.vpn_nodes():
                self._check_alive(node)
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                logs = "\n".join(n.process.tail(15) for n in self.vpn_nodes() if n.process)
                raise BenchError(f"timed out after {timeout:g} s: {message}\n{logs}")
            time.sleep(0.2)

    def wait_path(self, kind: str) -> dict[str, dict[str, Any]]:
        """Ping until both clients show the expected path to each other; returns the rows."""
        pairs = ((self.c1, TUN2), (self.c2, TUN1))

        def settled() -> dict[str, dict[str, Any]] | None:
            if not self.c1.ns.ping(TUN2, count=1, timeout=1.0):
                return None
            rows = {node.name: self.peer_row(node, peer) for node, peer in pairs}
            if all(row is not None and path_matches(row, kind) for row in rows.values()):
                return rows  # type: ignore[return-value]
            return None

        expected = "CONNECTED + direct" if kind == "direct" else "relay server"
        rows: dict[str, dict[str, Any]] = self._wait(
            settled, PATH_TIMEOUT, f"clients never reached the {expected} path"
        )
        return rows


def path_matches(row: dict[str, Any], kind: str) -> bool:
    path = str(row.get("path") or "")
    if kind == "direct":
        return row.get("state") == "CONNECTED" and path.startswith("direct ")
    # Without STUN the peers settle in FAILED (or WAITING) and use the server.
    return path == "relay server" and row.get("state") in ("FAILED", "WAITING")


# --------------------------------------------------------------------------
# one variant


@dataclass(frozen=True)
class Options:
    variants: tuple[str, ...]
    duration: float
    runs: int
    udp: bool
    udp_seconds: float
    udp_steps: int
    udp_len: int
    loaded_duration: float
    baseline_src: Path | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    dataplane: str | None  # None: no VPN
    path: str | None  # "direct" | "relay"
    baseline: bool = False  # run the code of --baseline-src
    offload: str | None = None  # the clients' --offload; None: their default (auto)
    # What `status --json` "tun_offloads" must say before measuring: True
    # non-empty, False empty, None not checked (the baseline code may not know it).
    tun_offloads: bool | None = None


VARIANT_SPECS = {
    "raw": Variant("raw", "raw veth", None, None),
    "pure": Variant("pure", "direct, pure", "pure", "direct", tun_offloads=False),
    "fast-no-offload": Variant(
        "fast-no-offload",
        "direct, fast, TUN offloads off",
        "fast",
        "direct",
        offload="off",
        tun_offloads=False,
    ),
    "fast": Variant("fast", "direct, fast, TUN offloads", "fast", "direct", tun_offloads=True),
    "fast-base": Variant("fast-base", "direct, fast, baseline code", "fast", "direct", True),
    "relay": Variant("relay", "relay server", "auto", "relay"),
}


def measure_tcp(bench: Bench, dst: str, options: Options) -> dict[str, Any]:
    runs, cpu_ticks_total, moved = [], 0, 0
    per_process: dict[str, int] = {}
    for index in range(options.runs):
        before = {n.name: cpu_ticks(n.process.pid) for n in bench.vpn_nodes() if n.process}
        run = iperf_tcp(bench.c1.ns, dst, options.duration)
        after = {n.name: cpu_ticks(n.process.pid) for n in bench.vpn_nodes() if n.process}
        for name, ticks in after.items():
            per_process[name] = per_process.get(name, 0) + ticks - before[name]
            cpu_ticks_total += ticks - before[name]
        moved += run["bytes"]
        runs.append(run)
        log(f"    tcp run {index + 1}/{options.runs}: {run['bits_per_second'] / 1e6:.1f} Mbit/s")
    result: dict[str, Any] = {
        "bits_per_second": statistics.median(r["bits_per_second"] for r in runs),
        "runs": runs,
        "bytes_total": moved,
    }
    if per_process:
        seconds = cpu_ticks_total / CLK_TCK
        result["cpu_seconds"] = seconds
        result["cpu_seconds_by_process"] = {k: v / CLK_TCK for k, v in per_process.items()}
        result["cpu_seconds_per_gb"] = seconds / (moved / 1e9) if moved else None
    return result


def run_variant(bench: Bench, spec: Variant, options: Options) -> dict[str, Any]:
    loadavg = _read("/proc/loadavg").split()[:3]
    result: dict[str, Any] = {"label": spec.label, "status": "ok", "loadavg_before": loadavg}
    if spec.dataplane is None:
        dst = bench.c2.segment_ip
    else:
        dst = TUN2
        start_vpn_variant(bench, spec, options, result)
    bench.start_iperf_server()
    log("  ping idle")
    result["ping_idle"] = ping_rtt(bench.c1.ns, dst, IDLE_PINGS)
    log("  iperf3 TCP")
    result["tcp"] = measure_tcp(bench, dst, options)
    if options.udp:
        log("  iperf3 UDP search")
        result["udp"] = udp_search(
            bench.c1.ns,
            dst,
            result["tcp"]["bits_per_second"],
            seconds=options.udp_seconds,
            steps=options.udp_steps,
            length=options.udp_len,
        )
    log("  ping under TCP load")
    result["ping_loaded"] = ping_under_load(bench.bed, bench.c1.ns, dst, options.loaded_duration)
    if spec.dataplane is not None:
        finish_vpn_variant(bench, spec, result)
    bench.stop_iperf_server()
    return result


def start_vpn_variant(
    bench: Bench, spec: Variant, options: Options, result: dict[str, Any]
) -> None:
    """Server and clients up, the path settled, and the data plane and TUN
    offloads the ones asked for, before anything is measured."""
    assert spec.dataplane is not None
    flags = f"--dataplane {spec.dataplane}" + (f" --offload {spec.offload}" if spec.offload else "")
    log(f"  starting server and clients ({flags})")
    source = options.baseline_src if spec.baseline else None
    bench.start_vpn(spec.dataplane, stun=spec.path == "direct", source=source, offload=spec.offload)
    rows = bench.wait_path("direct" if spec.path == "direct" else "relay")
    status = bench.status(bench.c1)
    result["dataplane"] = status.get("dataplane")
    result["path"] = rows["c1"]["path"]
    result["peer_state"] = rows["c1"]["state"]
    result["counters_before"] = {"relay": status["relay"], "direct": status["direct"]}
    result["udp_offloads"] = status.get("udp_offloads")
    result["tun_offloads"] = {
        n.name: bench.status(n).get("tun_offloads") for n in (bench.c1, bench.c2)
    }
    log(
        f"  path: {result['path']} ({result['peer_state']}), {result['dataplane']} data plane, "
        f"TUN offloads {result['tun_offloads']}"
    )
    if spec.dataplane != "auto" and result["dataplane"] != spec.dataplane:
        raise BenchError(f"asked for {spec.dataplane}, status says {result['dataplane']}")
    check_tun_offloads(spec, result["tun_offloads"])


def check_tun_offloads(spec: Variant, offloads: dict[str, Any]) -> None:
    """Both clients' `status --json` "tun_offloads" as the variant needs them: a
    variant that measured the other configuration would make the targets lie."""
    if spec.tun_offloads is None:
        return
    for name, value in offloads.items():
        if not isinstance(value, list):
            raise BenchError(f"{name}: status --json has no tun_offloads list (got {value!r})")
        if spec.tun_offloads and not value:
            raise BenchError(
                f"{name}: TUN offloads are off (status tun_offloads []); "
                "the kernel refused them, see the client log"
            )
        if not spec.tun_offloads and value:
            raise BenchError(f"{name}: TUN offloads are on ({'+'.join(value)}), asked for off")


def finish_vpn_variant(bench: Bench, spec: Variant, result: dict[str, Any]) -> None:
    """Peak RSS, the path after the load (it must not have changed), counters."""
    result["peak_rss_kib"] = {
        n.name: peak_rss_kib(n.process.pid) for n in bench.vpn_nodes() if n.process
    }
    row = bench.peer_row(bench.c1, TUN2) or {}
    status = bench.status(bench.c1)
    result["path_after"] = row.get("path")
    result["counters_after"] = {"relay": status["relay"], "direct": status["direct"]}
    result["tun_mtu"] = _mtu(bench.c1.ns, f"p2pvpn-{bench.c1.name}")
    if not path_matches(row, "direct" if spec.path == "direct" else "relay"):
        result["status"] = "path changed"
        result["error"] = f"path after the measurements: {row.get('state')} {row.get('path')}"
    bench.stop_vpn()


def _mtu(ns: Namespace, ifname: str) -> int | None:
    info = ns.link_info(ifname)
    return int(info["mtu"]) if info and "mtu" in info else None


# --------------------------------------------------------------------------
# report


def _mbit(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:,.0f}" if bps >= 1e8 else f"{bps / 1e6:,.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _get(result: dict[str, Any], *keys: str) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tcp", ("tcp", "bits_per_second")),
    ("udp", ("udp", "bits_per_second")),
    ("rtt_idle_p50", ("ping_idle", "p50_ms")),
    ("rtt_idle_p99", ("ping_idle", "p99_ms")),
    ("rtt_loaded_p50", ("ping_loaded", "p50_ms")),
    ("rtt_loaded_p99", ("ping_loaded", "p99_ms")),
)


@dataclass(frozen=True)
class Target:
    """Issue 13's targets: ``variant``'s metric over ``base``'s, against ``bound``."""

    key: str
    label: str
    metric: tuple[str, ...]
    variant: str
    base: str
    at_least: bool  # True: ratio >= bound; False: ratio <= bound
    bound: float

    def evaluate(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        value = ratio(
            _measured(results, self.variant, self.metric),
            _measured(results, self.base, self.metric),
        )
        met = (
            None if value is None else value >= self.bound if self.at_least else value <= self.bound
        )
        return {
            "key": self.key,
            "label": self.label,
            "ratio": value,
            "target": f"{'>=' if self.at_least else '<='} {self.bound:g}",
            "met": met,
        }


TARGETS = (
    Target(
        "fast_vs_no_offload_tcp",
        "fast / fast-no-offload TCP throughput",
        ("tcp", "bits_per_second"),
        "fast",
        "fast-no-offload",
        True,
        2.0,
    ),
    Target(
        "fast_vs_no_offload_cpu_per_gb",
        "fast / fast-no-offload CPU s per GB",
        ("tcp", "cpu_seconds_per_gb"),
        "fast",
        "fast-no-offload",
        False,
        0.5,
    ),
    Target(
        "fast_vs_no_offload_loaded_rtt_p99",
        "fast / fast-no-offload loaded RTT p99 (no worse)",
        ("ping_loaded", "p99_ms"),
        "fast",
        "fast-no-offload",
        False,
        1.0,
    ),
    Target(
        "fast_vs_raw_tcp",
        "fast / raw veth TCP throughput",
        ("tcp", "bits_per_second"),
        "fast",
        "raw",
        True,
        0.30,
    ),
)


def _measured(results: dict[str, dict[str, Any]], variant: str, metric: tuple[str, ...]) -> Any:
    """A variant's metric, or None when the variant did not run or failed."""
    result = results.get(variant, {})
    if result.get("status") not in ("ok", "path changed"):
        return None
    return _get(result, *metric)


def compute_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = results.get("raw", {})
    ratios: dict[str, Any] = {}
    for name, result in results.items():
        if name == "raw" or result.get("status") not in ("ok", "path changed"):
            continue
        ratios[name] = {
            metric: ratio(_get(result, *keys), _get(raw, *keys)) for metric, keys in METRICS
        }
    ratios["fast_vs_pure_tcp"] = ratio(
        _get(results.get("fast", {}), "tcp", "bits_per_second"),
        _get(results.get("pure", {}), "tcp", "bits_per_second"),
    )
    ratios["fast_vs_baseline_tcp"] = ratio(
        _get(results.get("fast", {}), "tcp", "bits_per_second"),
        _get(results.get("fast-base", {}), "tcp", "bits_per_second"),
    )
    ratios["targets"] = [target.evaluate(results) for target in TARGETS]
    return ratios


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The names on the left, the numbers right-aligned."""
    return "\n".join(format_table(header, rows, right=range(1, len(header)), rule=True))


def _dataplane_cell(result: dict[str, Any]) -> str:
    """ "fast", or "fast tun csum+tso4+uso4" when c1's TUN offloads are on."""
    offloads = (result.get("tun_offloads") or {}).get("c1")
    dataplane = str(result.get("dataplane") or "-")
    return f"{dataplane} tun {'+'.join(offloads)}" if offloads else dataplane


def _absolute_row(name: str, result: dict[str, Any]) -> list[str]:
    status = result.get("status", "ok")
    if status not in ("ok", "path changed"):
        return [name, status, *["-"] * 9]
    idle, loaded = result.get("ping_idle") or {}, result.get("ping_loaded") or {}
    rss = result.get("peak_rss_kib") or {}
    udp_loss = _get(result, "udp", "loss_percent")
    return [
        name + ("" if status == "ok" else " (!)"),
        _dataplane_cell(result),
        _mbit(_get(result, "tcp", "bits_per_second")),
        _mbit(_get(result, "udp", "bits_per_second"))
        + ("*" if _get(result, "udp", "sender_limited") else ""),
        _num(udp_loss),
        f"{_num(idle.get('p50_ms'), '{:.3f}')}/{_num(idle.get('p99_ms'), '{:.3f}')}",
        f"{_num(loaded.get('p50_ms'), '{:.2f}')}/{_num(loaded.get('p99_ms'), '{:.2f}')}",
        _num(_get(result, "tcp", "cpu_seconds_per_gb"), "{:.1f}"),
        *(_num(rss[k] / 1024, "{:.1f}") if rss.get(k) else "-" for k in ("server", "c1", "c2")),
    ]


def format_report(report: dict[str, Any]) -> str:
    machine = report["machine"]
    results: dict[str, dict[str, Any]] = report["results"]
    out = [
        f"machine: {machine['cpu_model']}, {machine['cpus']} CPUs, kernel {machine['kernel']}",
        f"         Python {machine['python']} ({machine['python_ssl']}); "
        f"cryptography: {machine.get('cryptography_openssl')}; "
        f"_fastpath libcrypto: {machine.get('fastpath_libcrypto')}",
        f"         {machine.get('iperf3')}; p2pvpn {machine.get('p2pvpn')} "
        f"(git {machine.get('git')}); load average at start {' '.join(machine['loadavg_start'])}",
        f"options: {report['options']}",
        "",
    ]
    header = ["variant", "dataplane", "TCP Mbit/s", "UDP Mbit/s", "loss %"]
    header += ["idle RTT p50/p99 ms", "loaded RTT p50/p99 ms", "CPU s/GB"]
    header += ["RSS MiB srv", "c1", "c2"]
    out.append(_table(header, [_absolute_row(n, r) for n, r in results.items()]))
    ratios = report["ratios"]
    ratio_rows = [
        [name, *(_num(values.get(metric), "{:.3f}") for metric, _ in METRICS)]
        for name, values in ratios.items()
        if isinstance(values, dict)
    ]
    if ratio_rows:
        out += ["", "ratio vs raw veth (same run; throughput: higher is better, RTT: lower)"]
        out.append(
            _table(
                ["variant", "TCP", "UDP", "idle p50", "idle p99", "loaded p50", "loaded p99"],
                ratio_rows,
            )
        )
    if ratios.get("fast_vs_pure_tcp") is not None:
        out.append(f"\nfast / pure TCP throughput: {ratios['fast_vs_pure_tcp']:.2f}x")
    if ratios.get("fast_vs_baseline_tcp") is not None:
        out.append(
            f"fast / fast on the baseline code TCP throughput: "
            f"{ratios['fast_vs_baseline_tcp']:.3f}x"
        )
    out += _target_lines(ratios.get("targets", []))
    out += _notes(results)
    out += _fragment_note(report)
    if any(_get(r, "udp", "sender_limited") for r in results.values()):
        out.append(
            "*: iperf3's sender limit, with no loss (the path was not the bottleneck; "
            "that ratio understates the path's headroom)"
        )
    out.append(f"\nelapsed {report['elapsed_seconds']:.0f} s; JSON: {report.get('json_path')}")
    return "\n".join(out)


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            target["label"],
            _num(target["ratio"], "{:.3f}"),
            target["target"],
            "-" if target["met"] is None else "met" if target["met"] else "MISSED",
        ]
        for target in targets
    ]
    if all(row[1] == "-" for row in rows):
        return []
    title = "targets of issue 13 (same run; '-': a variant of the pair did not run or failed)"
    return ["", title, _table(["ratio", "value", "target", "verdict"], rows)]


def _fragment_note(report: dict[str, Any]) -> list[str]:
    options, results = report["options"], report["results"]
    if not options.get("udp"):
        return []
    length = int(options["udp_len"])
    mtus = {r["tun_mtu"] for r in results.values() if r.get("tun_mtu")}
    small = sorted(m for m in mtus if length + UDP_HEADERS > m)
    if not small:
        return []
    return [
        f"note: {length}-byte UDP payloads make {length + UDP_HEADERS}-byte IP packets, more "
        f"than the TUN MTU ({small[0]}): each datagram crosses the tunnel as 2 IP fragments "
        f"(use --udp-len {small[0] - UDP_HEADERS} for unfragmented datagrams)"
    ]


def _notes(results: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for name, result in results.items():
        if result.get("status") not in ("ok",):
            notes.append(f"{name}: {result.get('status')}: {result.get('error', '')}".rstrip())
        if name != "raw" and result.get("path"):
            notes.append(f"{name}: path {result['path']} ({result.get('peer_state')})")
    return ["", *notes] if notes else []


# --------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="p2pvpn end-to-end benchmark (root; network namespaces; iperf3)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: TCP 3 s, 1 run, no UDP")
    parser.add_argument(
        "--only",
        help=f"comma-separated variants of {', '.join(VARIANTS)} "
        f"(default {','.join(DEFAULT_VARIANTS)}, and fast-base with --baseline-src)",
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="the src folder of another checkout, extension built in place: "
        "variant fast-base runs its code, for a same-run A/B against this code",
    )
    parser.add_argument("--duration", type=float, help="seconds per TCP run (10; 3 with --quick)")
    parser.add_argument("--runs", type=int, help="TCP runs per variant, median taken (3; 1)")
    parser.add_argument("--udp-seconds", type=float, default=3.0, help="seconds per UDP step (3)")
    parser.add_argument("--udp-steps", type=int, default=6, help="UDP search steps at most (6)")
    parser.add_argument(
        "--udp-len", type=int, default=1400, help="UDP datagram payload bytes (1400)"
    )
    parser.add_argument("--no-udp", action="store_true", help="skip the UDP search")
    parser.add_argument("--json", type=Path, help="where to write the JSON results")
    parser.add_argument("--keep-logs", action="store_true", help="keep process logs and state")
    args = parser.parse_args(argv)
    default = (*DEFAULT_VARIANTS, "fast-base") if args.baseline_src else DEFAULT_VARIANTS
    only = args.only if args.only is not None else ",".join(default)
    variants = tuple(v.strip() for v in only.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--only: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    args.variants = tuple(v for v in VARIANTS if v in variants)  # raw first, always
    if "fast-base" in args.variants:
        if args.baseline_src is None:
            parser.error("--only fast-base needs --baseline-src")
        if not (args.baseline_src / "p2pvpn" / "__init__.py").is_file():
            parser.error(f"--baseline-src {args.baseline_src}: no p2pvpn package in it")
    if args.duration is not None and not 1 <= args.duration <= 120:
        parser.error("--duration: 1..120 seconds")
    return args


def options_from(args: argparse.Namespace) -> Options:
    duration = args.duration or (3.0 if args.quick else 10.0)
    return Options(
        variants=args.variants,
        duration=duration,
        runs=args.runs or (1 if args.quick else 3),
        udp=not (args.quick or args.no_udp),
        udp_seconds=args.udp_seconds,
        udp_steps=args.udp_steps,
        udp_len=args.udp_len,
        loaded_duration=max(duration, 3.0),
        baseline_src=args.baseline_src.resolve() if args.baseline_src else None,
    )


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT (also when inherited as ignored, e.g. from ``cmd &``), SIGTERM and SIGHUP
    end the run with KeyboardInterrupt, so the ``finally`` blocks remove the namespaces."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_all(options: Options, work: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    bed = TestBed(work / "logs")
    try:
        bench = Bench.build(bed, work)
        for name in options.variants:
            spec = VARIANT_SPECS[name]
            log(f"variant {name}: {spec.label}")
            started = time.monotonic()
            try:
                results[name] = run_variant(bench, spec, options)
            except UnavailableError as exc:
                log(f"  unavailable: {exc}")
                results[name] = {"label": spec.label, "status": "unavailable", "error": str(exc)}
            except (BenchError, AssertionError, CommandError, subprocess.SubprocessError) as exc:
                log(f"  FAILED: {exc}")
                results[name] = {"label": spec.label, "status": "failed", "error": str(exc)}
            finally:
                bench.stop_iperf_server()
                bench.stop_vpn()
            results[name]["seconds"] = round(time.monotonic() - started, 1)
    finally:
        # A second Ctrl-C must not cut the cleanup short (it is bounded: 5 s grace).
        with _signals_ignored():
            bed.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    for tool, package in (("iperf3", "iperf3"), ("ping", "iputils-ping"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            missing.append(f"the {tool} command (apt-get install {package})")
    if missing:
        print("bench/e2e: this machine lacks " + "; ".join(missing), file=sys.stderr)
        return 2
    options = options_from(args)
    started, stamp = time.monotonic(), time.strftime("%Y%m%d-%H%M%S")
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="p2pvpn-bench-"))
    process_env()  # fail early if p2pvpn cannot be found
    ok = False
    try:
        with _signals_as_interrupt():
            results = run_all(options, work)
        ok = all(r.get("status") in ("ok", "unavailable") for r in results.values())
    except KeyboardInterrupt:
        print("\ninterrupted; namespaces removed", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs or not ok:
            print(f"process logs: {work / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    json_path = args.json or Path(__file__).resolve().parent / f"results-{stamp}.json"
    report: dict[str, Any] = {
        "timestamp": stamp,
        "machine": machine,
        "options": {k: v for k, v in vars(options).items()},
        "results": results,
        "ratios": compute_ratios(results),
        "elapsed_seconds": time.monotonic() - started,
        "json_path": str(json_path),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(format_report(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
