"""`p2pvpn bench crypto`: AES-256-GCM seal and open throughput per core, compiled and pure.

The cipher is the one every peer datagram goes through (PROTOCOL 3.1):
IV(12) | tag(16) | ciphertext, AES-256-GCM without associated data, a random
IV per datagram. Two implementations are measured in the same run:

* compiled: p2pvpn._gcm, which the fast data plane uses. "single" is one
  `GcmContext.seal`/`open` call per packet; "batch" is `seal_batch` /
  `open_batch` over BATCH packets with the GIL released.
* pure: the reference p2pvpn.wire.crypto on ``cryptography``, which the pure
  data plane uses. It has no batch call: its "batch" is a Python loop over
  the same BATCH packets, and the table says so.

Before anything is timed, every implementation must give the reference's
bytes for the same key and IVs, open them again and refuse a tampered
datagram; otherwise the run stops with a BenchError (a fast wrong cipher
is not a result). The reference itself is checked against a published GCM
test vector first.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from p2pvpn.bench.crypto_measure import (
    BATCH,
    Figure,
    Implementation,
    Measurement,
    check,
    check_reference,
    compiled_implementation,
    measure,
    pure_implementation,
)
from p2pvpn.bench.machine import describe_machine, machine_facts
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import Bar, BenchError, Report

__all__ = ["BATCH", "DEFAULT_SECONDS", "DEFAULT_SIZES", "QUICK_SECONDS", "configure_parser", "run"]


DEFAULT_SIZES = (64, 512, 1400)
DEFAULT_SECONDS = 0.5  # per figure: 30 figures, about 16 s in all
QUICK_SECONDS = 0.02
MAX_SIZE = 65507  # the largest UDP payload
OPERATIONS = ("seal", "open")
IMPLEMENTATIONS = ("compiled", "pure")
MODES = ("single", "batch")
BUSY_SHARE = 0.8  # below this share of a core the figure is marked as disturbed
BUSY_MIN_SECONDS = 0.1  # shorter figures (--quick) are rough anyway: starting threads dominates


# --------------------------------------------------------------------------
# The command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=None,
        metavar="S",
        help=f"how long each figure is measured (default {DEFAULT_SECONDS}, "
        f"with --quick {QUICK_SECONDS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few milliseconds per figure (for tests)"
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        metavar="B,B,...",
        help="plaintext sizes in bytes (default 64,512,1400)",
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="threads for the all-cores figure of the compiled batch "
        "(default: the number of CPUs; 0: leave it out)",
    )


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 60]")
    return seconds


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or not all(1 <= size <= MAX_SIZE for size in sizes):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of sizes from 1 to {MAX_SIZE} bytes "
            "(e.g. 64,512,1400)"
        )
    return tuple(dict.fromkeys(sizes))


def _threads(text: str) -> int:
    try:
        threads = int(text)
    except ValueError:
        threads = -1
    if not 0 <= threads <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of threads from 0 to 1024")
    return threads


def _options(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    seconds = getattr(args, "seconds", None)
    threads = getattr(args, "threads", None)
    if threads is None:
        cpus = os.cpu_count() or 1
        threads = cpus if cpus > 1 else 0  # one CPU: the batch figure already is all of it
    return {
        "seconds": seconds or (QUICK_SECONDS if quick else DEFAULT_SECONDS),
        "quick": quick,
        "sizes": list(getattr(args, "sizes", None) or DEFAULT_SIZES),
        "threads": threads,
        "batch": BATCH,
    }


# --------------------------------------------------------------------------
# The run


def _plan(options: dict[str, Any]) -> list[Measurement]:
    plan: list[Measurement] = []
    for size in options["sizes"]:
        for operation in OPERATIONS:
            for implementation in IMPLEMENTATIONS:
                plan.extend(Measurement(operation, size, implementation, m) for m in MODES)
            if options["threads"]:
                plan.append(Measurement(operation, size, "compiled", "threads", options["threads"]))
    return plan


def run(args: argparse.Namespace) -> Report:
    options = _options(args)
    report = Report("crypto", machine_facts(), options)
    implementations: dict[str, Implementation] = {}
    unavailable: dict[str, str] = {}
    for name, load in (("compiled", compiled_implementation), ("pure", pure_implementation)):
        implementation, reason = load()
        if implementation is not None:
            implementations[name] = implementation
        else:
            unavailable[name] = reason or "not available"
    if not implementations:
        raise BenchError(
            "neither the compiled nor the pure AES-256-GCM can run: "
            + "; ".join(f"{name}: {reason}" for name, reason in unavailable.items())
        )
    plan = _plan(options)
    with Progress("bench crypto", total=len(plan)) as progress:
        progress.step("checking every implementation against the reference")
        check_reference()
        for implementation in implementations.values():
            for size in options["sizes"]:
                check(implementation, size)
        figures = _run_plan(plan, implementations, options["seconds"], progress)
    report.results = _results(plan, figures, implementations, unavailable, options)
    report.bars = _bars(plan, figures)
    return report.finish(_table(report, plan, figures, implementations, unavailable))


def _run_plan(
    plan: list[Measurement],
    implementations: dict[str, Implementation],
    seconds: float,
    progress: Progress,
) -> dict[Measurement, Figure]:
    figures: dict[Measurement, Figure] = {}
    for measurement in plan:
        implementation = implementations.get(measurement.implementation)
        if implementation is not None:
            progress.step(measurement.title)
            figure = measure(implementation, measurement, seconds)
            figures[measurement] = figure
            progress.advance(1, f"{measurement.title}: {_gbit(figure):.2f} Gbit/s per core")
        else:
            progress.advance(1)
    return figures


def _gbit(figure: Figure) -> float:
    value: float = figure.to_json()["gbit_per_second_per_core"]
    return value


# --------------------------------------------------------------------------
# What the report carries


def _results(
    plan: list[Measurement],
    figures: dict[Measurement, Figure],
    implementations: dict[str, Implementation],
    unavailable: dict[str, str],
    options: dict[str, Any],
) -> dict[str, Any]:
    """results[operation][size][implementation][mode] = figure or {"status": "not built"}."""
    measured: dict[str, Any] = {}
    for m in plan:
        slot = measured.setdefault(m.operation, {}).setdefault(str(m.size), {})
        figure = figures.get(m)
        entry = figure.to_json() if figure else {"status": _status(unavailable[m.implementation])}
        slot.setdefault(m.implementation, {})[m.mode] = entry
    ratios: dict[str, Any] = {}
    for operation, by_size in measured.items():
        for size, by_implementation in by_size.items():
            ratios.setdefault(operation, {})[size] = {
                mode: _ratio(by_implementation, mode) for mode in MODES
            }
    return {
        "cipher": "AES-256-GCM, IV(12)|tag(16)|ciphertext, no associated data, random IVs",
        "batch": options["batch"],
        "implementations": {
            **{
                name: {"available": True, "batch": i.batch_note}
                for name, i in implementations.items()
            },
            **{name: {"available": False, "reason": why} for name, why in unavailable.items()},
        },
        "measurements": measured,
        "compiled_over_pure": ratios,
    }


def _status(reason: str) -> str:
    return "not built" if reason.startswith("not built") else "not available"


def _ratio(by_implementation: dict[str, Any], mode: str) -> float | None:
    compiled = by_implementation.get("compiled", {}).get(mode, {})
    pure = by_implementation.get("pure", {}).get(mode, {})
    if compiled.get("status") != "ok" or pure.get("status") != "ok":
        return None
    value: float = compiled["gbit_per_second"] / pure["gbit_per_second"]
    return value


def _bars(plan: list[Measurement], figures: dict[Measurement, Figure]) -> list[Bar]:
    return [
        Bar(
            group=f"{m.operation} {m.size} B",
            label=_label(m, short=True),
            value=_gbit(figures[m]) if m in figures else None,
            unit="Gbit/s per core",
        )
        for m in plan
    ]


def _label(measurement: Measurement, *, short: bool = False) -> str:
    if measurement.mode == "threads":
        return f"compiled batch, {measurement.threads} threads" + ("" if short else " (per core)")
    if measurement.implementation == "pure" and measurement.mode == "batch" and not short:
        return "pure batch (Python loop)"
    return f"{measurement.implementation} {measurement.mode}"


# --------------------------------------------------------------------------
# The table


def _table(
    report: Report,
    plan: list[Measurement],
    figures: dict[Measurement, Figure],
    implementations: dict[str, Implementation],
    unavailable: dict[str, str],
) -> str:
    options = report.options
    lines = [
        *describe_machine(report.machine),
        "",
        "AES-256-GCM seal/open of Candy datagrams (IV|tag|ciphertext, no AAD, random IVs), "
        f"one core unless said, {options['seconds']:g} s per figure, batches of {BATCH}",
        "",
        f"{'op':<5} {'size':>5}  {'implementation':<36} {'Gbit/s':>7} {'Mpkt/s':>7} "
        f"{'ns/pkt':>8}  {'vs pure':>7}",
    ]
    previous_group = None
    for m in plan:
        if previous_group is not None and previous_group != (m.size, m.operation):
            lines.append("")
        previous_group = (m.size, m.operation)
        lines.append(_row(m, figures, unavailable))
    lines.extend(_notes(figures, implementations, unavailable, options))
    return "\n".join(lines)


def _row(m: Measurement, figures: dict[Measurement, Figure], unavailable: dict[str, str]) -> str:
    head = f"{m.operation:<5} {m.size:>5}  {_label(m):<36}"
    figure = figures.get(m)
    if figure is None:
        return f"{head} {_status(unavailable[m.implementation]):>7}"
    data = figure.to_json()
    busy = "*" if _busy(figure) else " "
    ratio = ""
    pure = figures.get(Measurement(m.operation, m.size, "pure", m.mode))
    if m.implementation == "compiled" and m.mode in MODES and pure is not None:
        ratio = f"{_gbit(figure) / _gbit(pure):6.1f}x"
    return (
        f"{head} {data['gbit_per_second_per_core']:7.2f} "
        f"{data['packets_per_second_per_core'] / 1e6:7.3f} {data['ns_per_packet']:8.0f}{busy} "
        f"{ratio:>7}"
    ).rstrip()


def _busy(figure: Figure) -> bool:
    """Whether the figure got clearly less than its cores: other work ran on this machine."""
    share: float = figure.to_json()["cpu_share"]
    return figure.seconds >= BUSY_MIN_SECONDS and share < BUSY_SHARE


def _notes(
    figures: dict[Measurement, Figure],
    implementations: dict[str, Implementation],
    unavailable: dict[str, str],
    options: dict[str, Any],
) -> list[str]:
    notes = [
        "",
        "Gbit/s and Mpkt/s are of plaintext per core; vs pure = compiled / pure, same mode, "
        "same run.",
        "pure = p2pvpn.wire.crypto on cryptography (the pure data plane); it has no batch call, "
        "its batch is a Python loop.",
    ]
    if "compiled" in implementations:
        notes.append(
            "compiled = p2pvpn._gcm (the fast data plane); batch = seal_batch/open_batch, "
            "GIL released."
        )
    if options["threads"] and "compiled" in implementations:
        notes.append(
            f"{options['threads']} threads: all at once, each its own "
            "key and packets; the figure is the total divided by the threads."
        )
    for name, reason in unavailable.items():
        notes.append(f"{name}: {reason}")
    if any(_busy(figure) for figure in figures.values()):
        notes.append(
            f"* got less than {BUSY_SHARE:.0%} of a core (other work on this machine): "
            "run again when it is idle for a fair figure."
        )
    return notes
