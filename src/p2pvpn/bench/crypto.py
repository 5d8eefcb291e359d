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
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Protocol

from p2pvpn.bench.machine import describe_machine, machine_facts
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import Bar, BenchError, Report

__all__ = ["BATCH", "DEFAULT_SECONDS", "DEFAULT_SIZES", "QUICK_SECONDS", "configure_parser", "run"]

logger = logging.getLogger(__name__)

BATCH = 64
"""Packets per batch: what the fast data plane hands seal_batch/open_batch at most per call."""
DEFAULT_SIZES = (64, 512, 1400)
DEFAULT_SECONDS = 0.5  # per figure: 30 figures, about 16 s in all
QUICK_SECONDS = 0.02
MAX_SIZE = 65507  # the largest UDP payload
OPERATIONS = ("seal", "open")
IMPLEMENTATIONS = ("compiled", "pure")
MODES = ("single", "batch")
BUSY_SHARE = 0.8  # below this share of a core the figure is marked as disturbed
_IV_SIZE = 12

# GCM spec (McGrew & Viega), test case 14: AES-256, zero key, zero IV, one zero block.
_VECTOR_KEY = bytes(32)
_VECTOR_IV = bytes(12)
_VECTOR_PLAINTEXT = bytes(16)
_VECTOR_DATAGRAM = bytes.fromhex(
    "000000000000000000000000"  # IV
    "d0d1c8a799996bf0265b98b5d48ab919"  # tag
    "cea7403d4d606b6e074ec5d3baf39d18"  # ciphertext
)


class _Cipher(Protocol):
    def seal(self, plaintext: bytes, iv: bytes | None = None) -> bytes: ...
    def open(self, datagram: bytes) -> bytes: ...


SealMany = Callable[[Sequence[bytes], bytes | None], list[bytes]]
OpenMany = Callable[[Sequence[bytes]], list[bytes | None]]


@dataclass(frozen=True)
class _Implementation:
    """One cipher implementation, with the same calls whichever it is."""

    name: str  # "compiled" | "pure"
    make: Callable[[bytes], _Cipher]  # key -> cipher
    seal_many: Callable[[_Cipher], SealMany]
    open_many: Callable[[_Cipher], OpenMany]
    batch_note: str


@dataclass(frozen=True)
class _Measurement:
    operation: str  # "seal" | "open"
    size: int  # plaintext bytes
    implementation: str
    mode: str  # "single" | "batch" | "threads"
    threads: int = 1

    @property
    def title(self) -> str:
        who = f"{self.implementation} {self.mode}"
        if self.mode == "threads":
            who = f"{self.implementation} batch, {self.threads} threads"
        return f"{self.operation} {self.size} B {who}"


@dataclass(frozen=True)
class _Figure:
    packets: int
    seconds: float  # wall clock
    cpu_seconds: float  # of the measuring thread(s)
    threads: int
    size: int

    def to_json(self) -> dict[str, Any]:
        per_core_seconds = self.seconds * self.threads
        return {
            "status": "ok",
            **{key: value for key, value in asdict(self).items() if key != "size"},
            "packets_per_second": self.packets / self.seconds,
            "packets_per_second_per_core": self.packets / per_core_seconds,
            "ns_per_packet": per_core_seconds / self.packets * 1e9,
            "gbit_per_second": self.packets * self.size * 8 / self.seconds / 1e9,
            "gbit_per_second_per_core": self.packets * self.size * 8 / per_core_seconds / 1e9,
            "cpu_share": self.cpu_seconds / per_core_seconds,
        }


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
# The implementations


def _import_gcm() -> ModuleType:
    """p2pvpn._gcm; a separate function so that tests can make it unavailable."""
    import p2pvpn._gcm

    return p2pvpn._gcm


def _compiled() -> tuple[_Implementation | None, str | None]:
    try:
        gcm = _import_gcm()
    except ImportError as exc:
        logger.debug("compiled AES-GCM unavailable: %s", exc)
        return None, f"not built ({exc})"

    def seal_many(cipher: _Cipher) -> SealMany:
        return lambda plaintexts, ivs: list(gcm.seal_batch(cipher, plaintexts, ivs))

    def open_many(cipher: _Cipher) -> OpenMany:
        return lambda datagrams: list(gcm.open_batch(cipher, datagrams))

    implementation = _Implementation(
        "compiled", gcm.GcmContext, seal_many, open_many, "seal_batch/open_batch, GIL released"
    )
    return implementation, None


def _pure() -> tuple[_Implementation | None, str | None]:
    from p2pvpn.wire.crypto import DatagramCipher

    try:
        DatagramCipher(bytes(32))
    except ImportError as exc:  # cryptography missing: the wheel's dependency was removed
        return None, f"not available: {exc} (pip install cryptography)"

    def seal_many(cipher: _Cipher) -> SealMany:
        def seal_all(plaintexts: Sequence[bytes], ivs: bytes | None) -> list[bytes]:
            if ivs is None:
                return [cipher.seal(plaintext) for plaintext in plaintexts]
            return [
                cipher.seal(plaintext, ivs[i * _IV_SIZE : (i + 1) * _IV_SIZE])
                for i, plaintext in enumerate(plaintexts)
            ]

        return seal_all

    def open_many(cipher: _Cipher) -> OpenMany:
        def open_all(datagrams: Sequence[bytes]) -> list[bytes | None]:
            return [_open_or_none(cipher, datagram) for datagram in datagrams]

        return open_all

    return _Implementation("pure", DatagramCipher, seal_many, open_many, "a Python loop"), None


def _open_or_none(cipher: _Cipher, datagram: bytes) -> bytes | None:
    try:
        return cipher.open(datagram)
    except ValueError:  # the reference's DecodeError/AuthenticationFailed are ValueErrors too
        return None


# --------------------------------------------------------------------------
# Same bytes as the reference, or no timing at all


def _check_reference() -> None:
    from p2pvpn.wire.crypto import DatagramCipher

    reference = DatagramCipher(_VECTOR_KEY)
    if reference.seal(_VECTOR_PLAINTEXT, _VECTOR_IV) != _VECTOR_DATAGRAM:
        raise BenchError(
            "the reference AES-256-GCM (p2pvpn.wire.crypto on cryptography) does not give "
            "the published GCM test vector: the cryptography installation is broken; reinstall it"
        )


def _check(implementation: _Implementation, size: int) -> None:
    """Raise BenchError unless ``implementation`` seals like the reference and opens its output."""
    from p2pvpn.wire.crypto import DatagramCipher

    key = os.urandom(32)
    plaintexts = [os.urandom(size) for _ in range(BATCH)]
    ivs = [os.urandom(_IV_SIZE) for _ in range(BATCH)]
    reference = DatagramCipher(key)
    expected = [reference.seal(p, iv) for p, iv in zip(plaintexts, ivs, strict=True)]
    cipher = implementation.make(key)
    tampered = bytearray(expected[0])
    tampered[-1] ^= 0x01
    checks = {
        "seal (single)": [cipher.seal(p, iv) for p, iv in zip(plaintexts, ivs, strict=True)]
        == expected,
        "seal (batch)": implementation.seal_many(cipher)(plaintexts, b"".join(ivs)) == expected,
        "open (single)": [_open_or_none(cipher, d) for d in expected] == plaintexts,
        "open (batch)": implementation.open_many(cipher)(expected) == plaintexts,
        "open of its own random-IV seal": _round_trips(implementation, cipher, plaintexts),
        "refusal of a tampered datagram": _open_or_none(cipher, bytes(tampered)) is None
        and implementation.open_many(cipher)([bytes(tampered)]) == [None],
    }
    wrong = [name for name, passed in checks.items() if not passed]
    if wrong:
        raise BenchError(
            f"the {implementation.name} AES-256-GCM disagrees with the reference "
            f"p2pvpn.wire.crypto at {size} bytes: {', '.join(wrong)} failed; nothing was timed. "
            + (
                "Reinstall p2pvpn to rebuild its compiled modules."
                if implementation.name == "compiled"
                else "Reinstall cryptography."
            )
        )


def _round_trips(implementation: _Implementation, cipher: _Cipher, plaintexts: list[bytes]) -> bool:
    sealed = implementation.seal_many(cipher)(plaintexts, None)
    ivs = {datagram[:_IV_SIZE] for datagram in sealed}
    single = cipher.seal(plaintexts[0])
    return (
        len(ivs) == len(sealed)  # a fresh IV per datagram
        and implementation.open_many(cipher)(sealed) == plaintexts
        and _open_or_none(cipher, single) == plaintexts[0]
    )


# --------------------------------------------------------------------------
# Timing


def _workload(implementation: _Implementation, measurement: _Measurement) -> Callable[[], object]:
    """One round: BATCH packets sealed or opened, as the measurement says."""
    key = os.urandom(32)
    cipher = implementation.make(key)
    plaintexts = [os.urandom(measurement.size) for _ in range(BATCH)]
    if measurement.operation == "seal":
        if measurement.mode == "single":
            seal = cipher.seal
            return lambda: [seal(plaintext) for plaintext in plaintexts]
        seal_many = implementation.seal_many(cipher)
        return lambda: seal_many(plaintexts, None)
    datagrams = implementation.seal_many(cipher)(plaintexts, None)
    if measurement.mode == "single":
        open_one = cipher.open
        return lambda: [open_one(datagram) for datagram in datagrams]
    open_many = implementation.open_many(cipher)
    return lambda: open_many(datagrams)


def _time_rounds(work: Callable[[], object], seconds: float) -> tuple[int, float, float]:
    """Run ``work`` for about ``seconds``: (rounds, wall seconds, this thread's CPU seconds)."""
    work()  # warm up: caches, lazily built tables, the first allocation of the output
    rounds = 0
    cpu_start = time.thread_time()
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline or rounds == 0:
        work()
        rounds += 1
        now = time.perf_counter()
    return rounds, now - start, time.thread_time() - cpu_start


def _measure(implementation: _Implementation, measurement: _Measurement, seconds: float) -> _Figure:
    if measurement.mode == "threads":
        return _measure_threads(implementation, measurement, seconds)
    rounds, wall, cpu = _time_rounds(_workload(implementation, measurement), seconds)
    return _Figure(rounds * BATCH, wall, cpu, 1, measurement.size)


def _measure_threads(
    implementation: _Implementation, measurement: _Measurement, seconds: float
) -> _Figure:
    """Every thread its own context and packets, all running at once (batch calls drop the GIL)."""
    count = measurement.threads
    work = [_workload(implementation, measurement) for _ in range(count)]
    for round_ in work:
        round_()
    results: list[int] = [0] * count
    start_together = threading.Barrier(count + 1)
    deadline: list[float] = []

    def worker(index: int) -> None:
        start_together.wait()
        rounds = 0
        while rounds == 0 or time.perf_counter() < deadline[0]:
            work[index]()
            rounds += 1
        results[index] = rounds

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-crypto-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline.append(start + seconds)
    start_together.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return _Figure(sum(results) * BATCH, wall, cpu, count, measurement.size)


# --------------------------------------------------------------------------
# The run


def _plan(options: dict[str, Any]) -> list[_Measurement]:
    plan: list[_Measurement] = []
    for size in options["sizes"]:
        for operation in OPERATIONS:
            for implementation in IMPLEMENTATIONS:
                plan.extend(_Measurement(operation, size, implementation, m) for m in MODES)
            if options["threads"]:
                plan.append(
                    _Measurement(operation, size, "compiled", "threads", options["threads"])
                )
    return plan


def run(args: argparse.Namespace) -> Report:
    options = _options(args)
    report = Report("crypto", machine_facts(), options)
    implementations: dict[str, _Implementation] = {}
    unavailable: dict[str, str] = {}
    for name, load in (("compiled", _compiled), ("pure", _pure)):
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
        _check_reference()
        for implementation in implementations.values():
            for size in options["sizes"]:
                _check(implementation, size)
        figures = _run_plan(plan, implementations, options["seconds"], progress)
    report.results = _results(plan, figures, implementations, unavailable, options)
    report.bars = _bars(plan, figures)
    return report.finish(_table(report, plan, figures, implementations, unavailable))


def _run_plan(
    plan: list[_Measurement],
    implementations: dict[str, _Implementation],
    seconds: float,
    progress: Progress,
) -> dict[_Measurement, _Figure]:
    figures: dict[_Measurement, _Figure] = {}
    for measurement in plan:
        implementation = implementations.get(measurement.implementation)
        if implementation is not None:
            progress.step(measurement.title)
            figure = _measure(implementation, measurement, seconds)
            figures[measurement] = figure
            progress.advance(1, f"{measurement.title}: {_gbit(figure):.2f} Gbit/s per core")
        else:
            progress.advance(1)
    return figures


def _gbit(figure: _Figure) -> float:
    value: float = figure.to_json()["gbit_per_second_per_core"]
    return value


# --------------------------------------------------------------------------
# What the report carries


def _results(
    plan: list[_Measurement],
    figures: dict[_Measurement, _Figure],
    implementations: dict[str, _Implementation],
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


def _bars(plan: list[_Measurement], figures: dict[_Measurement, _Figure]) -> list[Bar]:
    return [
        Bar(
            group=f"{m.operation} {m.size} B",
            label=_label(m, short=True),
            value=_gbit(figures[m]) if m in figures else None,
            unit="Gbit/s per core",
        )
        for m in plan
    ]


def _label(measurement: _Measurement, *, short: bool = False) -> str:
    if measurement.mode == "threads":
        return f"compiled batch x{measurement.threads}" + ("" if short else " threads, per core")
    if measurement.implementation == "pure" and measurement.mode == "batch" and not short:
        return "pure batch (Python loop)"
    return f"{measurement.implementation} {measurement.mode}"


# --------------------------------------------------------------------------
# The table


def _table(
    report: Report,
    plan: list[_Measurement],
    figures: dict[_Measurement, _Figure],
    implementations: dict[str, _Implementation],
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


def _row(m: _Measurement, figures: dict[_Measurement, _Figure], unavailable: dict[str, str]) -> str:
    head = f"{m.operation:<5} {m.size:>5}  {_label(m):<36}"
    figure = figures.get(m)
    if figure is None:
        return f"{head} {_status(unavailable[m.implementation]):>7}"
    data = figure.to_json()
    busy = "*" if data["cpu_share"] < BUSY_SHARE else " "
    ratio = ""
    pure = figures.get(_Measurement(m.operation, m.size, "pure", m.mode))
    if m.implementation == "compiled" and m.mode in MODES and pure is not None:
        ratio = f"{_gbit(figure) / _gbit(pure):6.1f}x"
    return (
        f"{head} {data['gbit_per_second_per_core']:7.2f} "
        f"{data['packets_per_second_per_core'] / 1e6:7.3f} {data['ns_per_packet']:8.0f}{busy} "
        f"{ratio:>7}"
    )


def _notes(
    figures: dict[_Measurement, _Figure],
    implementations: dict[str, _Implementation],
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
            f"x{options['threads']} threads: {options['threads']} threads at once, each its own "
            "key and packets; the figure is the total divided by the threads."
        )
    for name, reason in unavailable.items():
        notes.append(f"{name}: {reason}")
    if any(f.to_json()["cpu_share"] < BUSY_SHARE for f in figures.values()):
        notes.append(
            f"* got less than {BUSY_SHARE:.0%} of a core (other work on this machine): "
            "run again when it is idle for a fair figure."
        )
    return notes
