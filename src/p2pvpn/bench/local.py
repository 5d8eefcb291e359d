"""`p2pvpn bench local`: raw veth against the tunnel, in network namespaces on this machine (root).

One run builds three namespaces on one bridge (a server and two clients,
`p2pvpn.bench.local_net`) and measures c1 -> c2, one variant after the
other (`p2pvpn.bench.local_variants`): TCP throughput (median of runs), the
highest UDP rate under 1 % loss, RTT idle and under TCP load, CPU seconds of
the p2pvpn processes per GB, their peak RSS. The measuring tool is p2pvpn's
own traffic generator by default (no iperf3 needed), or iperf3 + ping with
``--tool iperf3`` (`p2pvpn.bench.local_tools`). The table
(`p2pvpn.bench.local_report`) shows every figure also as a ratio to raw veth
from the same run, and the targets of issue 13.

Every namespace and process is removed at the end, also on errors, Ctrl-C,
SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2pvpn.bench.local_iperf3 import Iperf3Tool
from p2pvpn.bench.local_iperf3 import tool_line as iperf3_tool_line
from p2pvpn.bench.local_net import LocalNet, UnavailableError, loadavg
from p2pvpn.bench.local_report import (
    compute_ratios,
    format_results,
    result_bars,
    result_series,
)
from p2pvpn.bench.local_tools import OWN_TOOL_LINE, OwnTool, Tool
from p2pvpn.bench.local_variants import (
    DEFAULT_VARIANTS,
    VARIANT_SPECS,
    VARIANTS,
    Meter,
    Options,
    run_variant,
)
from p2pvpn.bench.machine import describe_machine, machine_facts
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import BenchError, Report
from p2pvpn.netns import CommandError, TestBed, missing_requirements

__all__ = ["configure_parser", "options_from", "requirements_error", "run"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run for CI: TCP 3 s, 1 run, a 2-step UDP search, 20 RTT samples "
        "(about 90 s for all variants)",
    )
    parser.add_argument(
        "--only",
        metavar="VARIANTS",
        help=f"comma-separated variants of {', '.join(VARIANTS)} "
        f"(default {','.join(DEFAULT_VARIANTS)}, and fast-base with --baseline-src)",
    )
    parser.add_argument(
        "--tool",
        choices=("own", "iperf3"),
        default="own",
        help="what measures: p2pvpn's own traffic generator (default) or iperf3 + ping",
    )
    parser.add_argument("--duration", type=float, help="seconds per TCP run (10; 3 with --quick)")
    parser.add_argument("--runs", type=int, help="TCP runs per variant, median taken (3; 1)")
    parser.add_argument("--udp-seconds", type=float, help="seconds per UDP search step (3; 1)")
    parser.add_argument("--udp-steps", type=int, help="UDP search steps at most (6; 2)")
    parser.add_argument("--udp-len", type=int, default=1400, help="UDP payload bytes (1400)")
    parser.add_argument("--no-udp", action="store_true", help="skip the UDP search")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the process logs and the clients' state"
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="for developers: the src folder of another checkout (extension built in place); "
        "variant fast-base runs its code, for a same-run A/B against this one",
    )


def _variants(args: argparse.Namespace) -> tuple[str, ...]:
    default = (*DEFAULT_VARIANTS, "fast-base") if args.baseline_src else DEFAULT_VARIANTS
    only = args.only if args.only is not None else ",".join(default)
    chosen = tuple(v.strip() for v in only.split(",") if v.strip())
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise BenchError(
            f"--only {only!r}: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    variants = tuple(v for v in VARIANTS if v in chosen)  # raw first, always
    if "fast-base" in variants:
        if args.baseline_src is None:
            raise BenchError("--only fast-base needs --baseline-src DIR")
        if not (args.baseline_src / "p2pvpn" / "__init__.py").is_file():
            raise BenchError(f"--baseline-src {args.baseline_src}: no p2pvpn package in it")
    return variants


def _check_range(flag: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise BenchError(f"{flag} {value:g}: choose {low:g}..{high:g}")


def options_from(args: argparse.Namespace) -> Options:
    """The options of a run; BenchError naming the flag when one is out of range."""
    _check_range("--duration", args.duration, 1, 120)
    _check_range("--runs", args.runs, 1, 20)
    _check_range("--udp-seconds", args.udp_seconds, 0.5, 60)
    _check_range("--udp-steps", args.udp_steps, 1, 20)
    _check_range("--udp-len", args.udp_len, 64, 65507)
    quick = bool(args.quick)
    duration = args.duration or (3.0 if quick else 10.0)
    return Options(
        variants=_variants(args),
        tool=args.tool,
        quick=quick,
        duration=duration,
        runs=args.runs or (1 if quick else 3),
        udp=not args.no_udp,
        udp_seconds=args.udp_seconds or (1.0 if quick else 3.0),
        udp_steps=args.udp_steps or (2 if quick else 6),
        udp_len=args.udp_len,
        idle_rtts=20 if quick else 100,
        loaded_duration=max(duration, 3.0),
        baseline_src=args.baseline_src.resolve() if args.baseline_src else None,
    )


def requirements_error(tool: str) -> BenchError | None:
    """What this machine lacks for the run, as the error to raise (None: nothing)."""
    missing = missing_requirements()
    needed = [("ping", "iputils-ping"), ("ss", "iproute2")]
    for command, package in needed:
        if shutil.which(command) is None:
            missing.append(f"the {command} command (apt-get install {package})")
    if tool == "iperf3" and shutil.which("iperf3") is None:
        missing.append("iperf3 (apt-get install iperf3), or use --tool own")
    if not missing:
        return None
    return BenchError(
        "this benchmark builds network namespaces with TUN devices and needs "
        + "; ".join(missing)
        + " (run it as root: sudo p2pvpn bench local)"
    )


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT (also when inherited as ignored, e.g. from ``cmd &``), SIGTERM and SIGHUP
    end the run with KeyboardInterrupt, so the ``finally`` blocks remove the namespaces."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _make_tool(name: str, net: LocalNet) -> Tool:
    return Iperf3Tool(net) if name == "iperf3" else OwnTool(net)


def _one_variant(
    net: LocalNet, tool: Tool, name: str, options: Options, meter: Meter
) -> dict[str, Any]:
    """The variant's JSON row; a failure is recorded in it and the run goes on."""
    spec = VARIANT_SPECS[name]
    started = time.monotonic()
    try:
        result = run_variant(net, tool, spec, options, meter)
    except UnavailableError as exc:
        meter.progress.step(f"{name}: unavailable: {exc}")
        result = {"label": spec.label, "status": "unavailable", "error": str(exc)}
    except (BenchError, AssertionError, CommandError, subprocess.SubprocessError) as exc:
        meter.progress.step(f"{name}: FAILED: {str(exc).splitlines()[0]}")
        logger.debug("variant %s failed", name, exc_info=True)
        result = {"label": spec.label, "status": "failed", "error": str(exc)}
    finally:
        tool.stop_server()
        net.stop_vpn()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def run_variants(options: Options, work: Path, progress: Progress) -> dict[str, dict[str, Any]]:
    """Build the namespaces, run every variant, remove everything (also when interrupted)."""
    results: dict[str, dict[str, Any]] = {}
    meter = Meter(progress)
    bed = TestBed(work / "logs")
    try:
        net = LocalNet.build(bed, work)
        tool = _make_tool(options.tool, net)
        for index, name in enumerate(options.variants):
            meter.start_variant(name, index * options.planned_seconds())
            results[name] = _one_variant(net, tool, name, options, meter)
    finally:
        # A second Ctrl-C must not cut the cleanup short (it is bounded: 5 s grace).
        with _signals_ignored():
            bed.close()
    return results


def _head(machine: dict[str, Any], tool: str, options: Options) -> list[str]:
    """The lines above the tables: the machine, who measured, the options."""
    who = iperf3_tool_line() if tool == "iperf3" else OWN_TOOL_LINE
    settings = (
        f"options: TCP {options.runs} x {options.duration:g} s"
        + (f", UDP search {options.udp_steps} x {options.udp_seconds:g} s" if options.udp else "")
        + f", {options.idle_rtts} idle RTT samples, loaded RTT {options.loaded_duration:g} s"
        + (" (--quick)" if options.quick else "")
    )
    return [*describe_machine(machine), who, settings]


def run(args: argparse.Namespace) -> Report:
    options = options_from(args)
    problem = requirements_error(options.tool)
    if problem is not None:
        raise problem
    machine = machine_facts()
    report = Report("local", machine, options.to_json())
    work = Path(tempfile.mkdtemp(prefix="p2pvpn-bench-local-"))
    total = options.planned_seconds() * len(options.variants)
    ok = False
    try:
        with _signals_as_interrupt(), Progress("bench local", total=total) as progress:
            results = run_variants(options, work, progress)
        ok = all(r.get("status") in ("ok", "unavailable") for r in results.values())
    except KeyboardInterrupt:
        print("interrupted; namespaces removed", file=sys.stderr)
        raise
    finally:
        if args.keep_logs or not ok:
            print(f"process logs: {work / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = loadavg()
    ratios = compute_ratios(results)
    report.results = {**results, "ratios": ratios}
    report.series = result_series(results)
    report.bars = result_bars(results)
    text = format_results(_head(machine, options.tool, options), report.options, results, ratios)
    return report.finish(text, ok=ok)
