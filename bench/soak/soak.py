#!/usr/bin/env python3
"""Soak test: a flapping p2pvpn network under traffic, watched for resource growth.

Builds a server and two clients behind NAT routers in network namespaces (the
test bed of `p2pvpn.netns`), pushes ping and iperf3 (or a Python TCP sender
when iperf3 is missing) through the tunnel for ``--duration`` seconds, and
flaps the peer-to-peer path every ``--flap-interval`` seconds:

* ``cut`` (default): nftables drops the UDP between the two NATs for
  ``--cut-seconds`` (the peers fall back to the relay, then punch again);
* ``restart``: client b is SIGKILLed and started again;
* ``none``: no flaps.

Every ``--sample-interval`` seconds it reads RSS, open fds and threads of every
p2pvpn process from /proc, and reports the growth from the first sample after
``--warmup`` to the last one, and the maximum, as a table and as JSON. It exits
1 when growth exceeds a bound (``--max-rss-mb``, ``--max-fds``,
``--max-threads``) or traffic did not flow, 2 when it cannot run (needs root,
/dev/net/tun, ip, nft).

    sudo python3 bench/soak/soak.py                      # 10 minutes
    sudo python3 bench/soak/soak.py --duration 120 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pvpn._format import format_table
from p2pvpn.netns import (
    BULK_RECEIVER,
    RUN_PREFIX,
    Client,
    NatSite,
    PingLog,
    Process,
    Resources,
    TestBed,
    VpnNetwork,
    block_udp_between,
    first_change,
    missing_requirements,
    nat_client,
    process_resources,
    python_argv,
    unblock,
    wait_connected,
)

WAN = "198.51.100.0/24"
"""The "internet": a documentation range that exists only inside the namespaces."""
A_IP, B_IP = "10.77.0.11", "10.77.0.12"
IPERF_PORT = 5201
BULK_PORT = 7001
TRAFFIC_CHUNK_SECONDS = 20.0

# A rate-limited TCP sender for machines without iperf3: argv host port seconds bits/s.
RATE_SENDER = """
import socket, sys, time
host, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
block = b"x" * 16384
sent = 0
start = time.monotonic()
with socket.create_connection((host, port), timeout=30) as conn:
    while (elapsed := time.monotonic() - start) < seconds:
        if rate and sent * 8 > rate * elapsed:
            time.sleep(0.002)
            continue
        conn.sendall(block)
        sent += len(block)
print("sent", sent, flush=True)
"""


# --------------------------------------------------------------------------
# options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="p2pvpn soak test: traffic through a flapping network, resource growth",
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    parser.add_argument(
        "--flap-interval", type=float, default=30, help="seconds between flaps (default 30)"
    )
    parser.add_argument(
        "--flap-mode",
        choices=("cut", "restart", "none"),
        default="cut",
        help="cut: drop the peers' UDP with nftables; restart: SIGKILL and restart "
        "client b; none (default: cut)",
    )
    parser.add_argument("--cut-seconds", type=float, default=8, help="length of a cut (default 8)")
    parser.add_argument(
        "--sample-interval", type=float, default=10, help="seconds between samples (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="samples before this many seconds are not judged (default: min(60, duration/3))",
    )
    parser.add_argument(
        "--traffic",
        choices=("auto", "iperf3", "python"),
        default="auto",
        help="bulk traffic generator (auto: iperf3 when installed)",
    )
    parser.add_argument(
        "--rate", default="20M", help="bulk bit rate, iperf3 syntax (default 20M; 0 = unlimited)"
    )
    parser.add_argument("--max-rss-mb", type=float, default=20, help="RSS growth bound (MiB)")
    parser.add_argument("--max-fds", type=int, default=20, help="open fd growth bound")
    parser.add_argument("--max-threads", type=int, default=4, help="thread growth bound")
    parser.add_argument(
        "--min-ping-ratio",
        type=float,
        default=0.5,
        help="fail when fewer pings are answered (default 0.5)",
    )
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument(
        "--log-dir", type=Path, help="process logs go here (default: a new temporary directory)"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.sample_interval <= 0:
        parser.error("--duration and --sample-interval must be positive")
    if args.flap_mode == "cut" and args.cut_seconds >= args.flap_interval:
        parser.error("--cut-seconds must be shorter than --flap-interval")
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 3)
    return args


def parse_rate(text: str) -> float:
    """``20M`` -> 20e6 bits/s (iperf3's suffixes: K, M, G, decimal)."""
    text = text.strip()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    return float(number) * scale


# --------------------------------------------------------------------------
# traffic


@dataclass
class TrafficStats:
    tool: str
    runs: int = 0
    failures: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


class TrafficLoop:
    """Back-to-back bulk runs of TRAFFIC_CHUNK_SECONDS from a to b until stopped."""

    def __init__(
        self, bed: TestBed, a: Client, b: Client, tool: str, *, rate: str, deadline: float
    ) -> None:
        self.a, self.tool, self.rate, self.deadline = a, tool, rate, deadline
        self.stats = TrafficStats(tool)
        self._stop = threading.Event()
        if tool == "iperf3":
            argv = ["iperf3", "-s", "-p", str(IPERF_PORT), "--rcv-timeout", "15000", "--forceflush"]
            self.server = bed.start(b.ns, argv, "iperf3-s")

            def listening() -> bool:
                result = b.ns.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False)
                return bool(result.stdout.strip())

            bed.wait_until(
                listening,
                timeout=30,
                message="iperf3 server never listened",
            )
        else:
            self.server = bed.start_python(b.ns, ["-c", BULK_RECEIVER, str(BULK_PORT)], "bulk-rx")
            self.server.wait_for_log("ready")
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def stop(self) -> TrafficStats:
        self._stop.set()
        self._thread.join(TRAFFIC_CHUNK_SECONDS + 60)
        if self.tool == "python":
            received = [
                int(line.split()[1])
                for line in self.server.log_text().splitlines()
                if line.startswith("received ")
            ]
            self.stats.bytes = sum(received)
        return self.stats

    def _run(self) -> None:
        while not self._stop.is_set():
            # Runs end with the soak, so that stopping never waits for a long one.
            seconds = min(TRAFFIC_CHUNK_SECONDS, self.deadline - time.monotonic())
            if seconds < 2:
                return
            try:
                if self.tool == "iperf3":
                    self._iperf3(seconds)
                else:
                    self._python(seconds)
            except Exception as exc:
                self._fail(repr(exc))

    def _fail(self, message: str) -> None:
        self.stats.failures += 1
        if len(self.stats.errors) < 20:
            self.stats.errors.append(message[-300:])
        self._stop.wait(1.0)

    def _iperf3(self, seconds: float) -> None:
        argv = ["iperf3", "-c", B_IP, "-p", str(IPERF_PORT), "-J", "--connect-timeout", "5000"]
        argv += ["-t", str(int(seconds)), "-b", self.rate]
        result = self.a.ns.run(argv, check=False, timeout=seconds + 60)
        self.stats.runs += 1
        try:
            report = json.loads(result.stdout)
        except ValueError:
            self._fail(f"iperf3 exit {result.returncode}: {result.stderr.strip()}")
            return
        if "error" in report and not report.get("end", {}).get("sum_received"):
            self._fail(str(report["error"]))
            return
        self.stats.bytes += int(report["end"]["sum_received"]["bytes"])

    def _python(self, seconds: float) -> None:
        rate = str(parse_rate(self.rate))
        argv = python_argv("-c", RATE_SENDER, B_IP, str(BULK_PORT))
        argv += [str(int(seconds)), rate]
        result = self.a.ns.run(argv, check=False, timeout=seconds + 60)
        self.stats.runs += 1
        if result.returncode != 0:
            self._fail(f"sender exit {result.returncode}: {result.stderr.strip()}")


# --------------------------------------------------------------------------
# resources


@dataclass
class Series:
    """Samples of one process (a restarted client starts a new series)."""

    role: str
    pid: int
    samples: list[tuple[float, Resources]] = field(default_factory=list)

    def judged(self, warmup: float) -> list[tuple[float, Resources]]:
        return [(t, r) for t, r in self.samples if t >= warmup]


def summarise(series: Series, args: argparse.Namespace, window: float) -> dict[str, Any]:
    judged = series.judged(args.warmup)
    summary: dict[str, Any] = {
        "role": series.role,
        "pid": series.pid,
        "samples": [{"t": round(t, 1), **asdict(r)} for t, r in series.samples],
        "judged_samples": len(judged),
    }
    # A series that did not live through most of the judged window (a restarted
    # client) says nothing about growth.
    span = judged[-1][0] - judged[0][0] if len(judged) >= 2 else 0.0
    if len(judged) < 2 or span < 0.5 * window:
        summary["verdict"] = "not judged (short-lived)"
        return summary
    first, last = judged[0][1], judged[-1][1]
    growth = {
        "rss_mb": (last.rss_kib - first.rss_kib) / 1024,
        "fds": last.fds - first.fds,
        "threads": last.threads - first.threads,
    }
    summary["first"] = asdict(first)
    summary["last"] = asdict(last)
    summary["max"] = {
        "rss_kib": max(r.rss_kib for _, r in series.samples),
        "fds": max(r.fds for _, r in series.samples),
        "threads": max(r.threads for _, r in series.samples),
    }
    summary["max_growth"] = {
        "rss_mb": (max(r.rss_kib for _, r in judged) - first.rss_kib) / 1024,
        "fds": max(r.fds for _, r in judged) - first.fds,
        "threads": max(r.threads for _, r in judged) - first.threads,
    }
    summary["growth"] = growth
    violations = []
    if growth["rss_mb"] > args.max_rss_mb:
        violations.append(f"RSS +{growth['rss_mb']:.1f} MiB > {args.max_rss_mb:g}")
    if growth["fds"] > args.max_fds:
        violations.append(f"fds +{growth['fds']} > {args.max_fds}")
    if growth["threads"] > args.max_threads:
        violations.append(f"threads +{growth['threads']} > {args.max_threads}")
    summary["violations"] = violations
    summary["verdict"] = "ok" if not violations else "; ".join(violations)
    return summary


# --------------------------------------------------------------------------
# the run


def _traffic_tool(choice: str) -> str:
    """``--traffic``, with ``auto`` resolved to iperf3 when it is installed."""
    if choice == "auto":
        return "iperf3" if shutil.which("iperf3") else "python"
    return choice


def _ping_summary(ping: PingLog, wall_start: float, elapsed: float) -> dict[str, Any]:
    replies = ping.replies(wall_start)
    return {
        "sent": ping.sent,
        "received": len(replies),
        "ratio": round(len(replies) / max(ping.sent, 1), 4),
        "max_gap_s": round(ping.max_gap(wall_start, wall_start + elapsed), 2),
    }


class Soak:
    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.series: list[Series] = []
        self.flaps: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        args = self.args
        with TestBed(self.log_dir / "logs") as bed:
            vpn = VpnNetwork(bed, self.log_dir, wan=WAN)
            vpn.start_server()
            a, site_a = nat_client(vpn, "a", A_IP)
            b, site_b = nat_client(vpn, "b", B_IP)
            vpn.wait_for_tun(a)
            vpn.wait_for_tun(b)
            wait_connected(vpn, a, b, timeout=60)
            tool = _traffic_tool(args.traffic)
            ping = PingLog(bed, a.ns, B_IP, interval=0.2)
            start = time.monotonic()
            wall_start = time.time()
            traffic = TrafficLoop(bed, a, b, tool, rate=args.rate, deadline=start + args.duration)
            log(f"network up; {tool} + ping for {args.duration:g} s, flaps: {args.flap_mode}")
            roles: dict[str, Any] = {
                "server": lambda: vpn.server_process,
                "a": lambda: a.process,
                "b": lambda: b.process,
            }
            self._sample_and_flap(roles, start, vpn=vpn, b=b, site_a=site_a, site_b=site_b)
            self._sample(roles, time.monotonic() - start)
            elapsed = time.monotonic() - start
            stats = traffic.stop()
            ping.stop()
            final = {c.name: _peer_row(c, B_IP if c is a else A_IP) for c in (a, b)}
            flaps = [self._flap_result(f, a, b) for f in self.flaps]
            result = {
                **self._run_facts(elapsed),
                "ping": _ping_summary(ping, wall_start, elapsed),
                "traffic": {
                    **asdict(stats),
                    "mbit_s": round(stats.bytes * 8 / elapsed / 1e6, 2),
                },
                "flaps": flaps,
                "final_peers": final,
                "processes": [summarise(s, args, args.duration - args.warmup) for s in self.series],
            }
        return result

    def _sample_and_flap(
        self,
        roles: dict[str, Any],
        start: float,
        *,
        vpn: VpnNetwork,
        b: Client,
        site_a: NatSite,
        site_b: NatSite,
    ) -> None:
        """Until the run's duration is over: sample the processes and flap the direct path.

        The path is left restored at the end.
        """
        args = self.args
        next_sample = 0.0
        next_flap = args.flap_interval if args.flap_mode != "none" else float("inf")
        restore_at: float | None = None
        while (elapsed := time.monotonic() - start) < args.duration:
            if elapsed >= next_sample:
                self._sample(roles, elapsed)
                next_sample += args.sample_interval
            if restore_at is not None and elapsed >= restore_at:
                self._restore(site_a)
                restore_at = None
            if elapsed >= next_flap:
                next_flap += args.flap_interval
                if args.flap_mode == "cut":
                    block_udp_between(site_a.router, str(site_b.public_ip))
                    self.flaps.append({"mode": "cut", "at": time.time()})
                    restore_at = elapsed + args.cut_seconds
                else:
                    self._restart(vpn, b)
            time.sleep(0.1)
        if restore_at is not None:
            self._restore(site_a)

    def _restore(self, site_a: NatSite) -> None:
        unblock(site_a.router)
        self.flaps[-1]["restored"] = time.time()

    def _run_facts(self, elapsed: float) -> dict[str, Any]:
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "log_dir": str(self.log_dir),
            "namespace_prefix": RUN_PREFIX,
            "elapsed_s": round(elapsed, 1),
        }

    def _sample(self, roles: dict[str, Any], elapsed: float) -> None:
        for role, get in roles.items():
            process: Process | None = get()
            if process is None or not process.alive():
                continue
            resources = process_resources(process.pid)
            if resources is None:
                continue
            series = next((s for s in self.series if s.role == role and s.pid == process.pid), None)
            if series is None:
                series = Series(role, process.pid)
                self.series.append(series)
            series.samples.append((elapsed, resources))

    def _restart(self, vpn: VpnNetwork, b: Client) -> None:
        assert b.process is not None
        b.process.send_signal(signal.SIGKILL)
        b.process.wait(10)
        flap = {"mode": "restart", "at": time.time()}
        vpn.start_client(b)
        flap["restored"] = time.time()
        self.flaps.append(flap)

    def _flap_result(self, flap: dict[str, Any], a: Client, b: Client) -> dict[str, Any]:
        result: dict[str, Any] = {"mode": flap["mode"]}
        at, restored = flap["at"], flap.get("restored")
        left = first_change(a.process, B_IP, after=at - 0.5, old="CONNECTED")
        if left is not None and (restored is None or left.when <= restored + 5):
            result["a_left_connected_after_s"] = round(left.when - at, 2)
        if restored is not None:
            back = first_change(a.process, B_IP, after=restored, new="CONNECTED")
            result["down_s"] = round(restored - at, 2)
            result["reconnected_after_restore_s"] = (
                round(back.when - restored, 2) if back is not None else None
            )
        return result


def _peer_row(client: Client, peer: str) -> dict[str, Any] | None:
    try:
        return client.peer(peer)
    except Exception as exc:
        return {"error": repr(exc)}


# --------------------------------------------------------------------------
# report


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def verdict(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    for process in result["processes"]:
        problems += [
            f"{process['role']} (pid {process['pid']}): {v}" for v in process.get("violations", [])
        ]
    if result["ping"]["ratio"] < args.min_ping_ratio:
        problems.append(
            f"ping success ratio {result['ping']['ratio']:.2f} < {args.min_ping_ratio:g}"
        )
    if result["traffic"]["bytes"] <= 0:
        problems.append("no bulk traffic got through")
    return problems


def format_result(result: dict[str, Any]) -> str:
    header = (
        "process",
        "pid",
        "samples",
        "RSS MiB first->last",
        "dRSS",
        "max",
        "fds",
        "dfds",
        "max",
        "threads",
        "dthr",
        "max",
        "verdict",
    )
    rows: list[tuple[str, ...]] = []
    for p in result["processes"]:
        if "growth" not in p:
            rows.append(
                (p["role"], str(p["pid"]), str(len(p["samples"])), *["-"] * 9, p["verdict"])
            )
            continue
        first, last, top, growth = p["first"], p["last"], p["max"], p["growth"]
        rows.append((
            p["role"], str(p["pid"]), str(p["judged_samples"]),
            f"{first['rss_kib'] / 1024:.1f} -> {last['rss_kib'] / 1024:.1f}",
            f"{growth['rss_mb']:+.1f}", f"{top['rss_kib'] / 1024:.1f}",
            f"{first['fds']} -> {last['fds']}", f"{growth['fds']:+d}", str(top["fds"]),
            f"{first['threads']} -> {last['threads']}", f"{growth['threads']:+d}",
            str(top["threads"]), p["verdict"],
        ))  # fmt: skip
    lines = format_table(header, rows)
    ping, traffic = result["ping"], result["traffic"]
    reconnects = [
        f["reconnected_after_restore_s"]
        for f in result["flaps"]
        if f.get("reconnected_after_restore_s") is not None
    ]
    lines += [
        "",
        f"elapsed {result['elapsed_s']} s; flaps {len(result['flaps'])}, "
        f"reconnected {len(reconnects)}"
        + (
            f" (after restore: median {statistics.median(reconnects):.1f} s, "
            f"max {max(reconnects):.1f} s)"
            if reconnects
            else ""
        ),
        f"ping: {ping['received']}/{ping['sent']} answered ({ping['ratio']:.1%}), "
        f"longest gap {ping['max_gap_s']} s",
        f"{traffic['tool']}: {traffic['bytes'] / 1e6:.1f} MB in {traffic['runs']} runs "
        f"({traffic['mbit_s']} Mbit/s average), {traffic['failures']} failed",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        print("soak: cannot run: needs " + ", ".join(missing), file=sys.stderr)
        return 2
    if shutil.which("nft") is None:
        print("soak: cannot run: needs nft (apt-get install nftables)", file=sys.stderr)
        return 2
    if args.traffic == "iperf3" and shutil.which("iperf3") is None:
        print("soak: cannot run: --traffic iperf3 needs iperf3", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="p2pvpn-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    log(f"logs in {log_dir}")
    try:
        result = Soak(args, log_dir).run()
    except KeyboardInterrupt:
        log("interrupted; the test bed was cleaned up")
        return 130
    problems = verdict(result, args)
    result["problems"] = problems
    result["ok"] = not problems
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
