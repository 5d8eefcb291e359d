"""The ciphers `p2pvpn bench crypto` measures, their check against the reference, the timing.

Both implementations get the same calls (`Implementation`), so one timing loop
measures them alike: "single" is one seal/open call per packet, "batch" is
one call per BATCH packets (for the pure reference, which has no batch call,
a Python loop). `check` runs before anything is timed: the same key and IVs
must give the reference's bytes, the output must open again and a tampered
datagram must be refused.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Protocol

from p2pvpn.bench.report import BenchError

__all__ = [
    "BATCH",
    "Cipher",
    "Figure",
    "Implementation",
    "Measurement",
    "check",
    "check_reference",
    "compiled_implementation",
    "measure",
    "open_or_none",
    "pure_implementation",
]

logger = logging.getLogger(__name__)

BATCH = 64
"""Packets per batch: what the fast data plane hands seal_batch/open_batch at most per call."""
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


class Cipher(Protocol):
    def seal(self, plaintext: bytes, iv: bytes | None = None) -> bytes: ...
    def open(self, datagram: bytes) -> bytes: ...


SealMany = Callable[[Sequence[bytes], bytes | None], list[bytes]]
OpenMany = Callable[[Sequence[bytes]], list[bytes | None]]


@dataclass(frozen=True)
class Implementation:
    """One cipher implementation, with the same calls whichever it is."""

    name: str  # "compiled" | "pure"
    make: Callable[[bytes], Cipher]  # key -> cipher
    seal_many: Callable[[Cipher], SealMany]
    open_many: Callable[[Cipher], OpenMany]
    batch_note: str


@dataclass(frozen=True)
class Measurement:
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
class Figure:
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
# The implementations


def _import_gcm() -> ModuleType:
    """p2pvpn._gcm; a separate function so that tests can make it unavailable."""
    import p2pvpn._gcm

    return p2pvpn._gcm


def compiled_implementation() -> tuple[Implementation | None, str | None]:
    try:
        gcm = _import_gcm()
    except ImportError as exc:
        logger.debug("compiled AES-GCM unavailable: %s", exc)
        return None, f"not built ({exc})"

    def seal_many(cipher: Cipher) -> SealMany:
        return lambda plaintexts, ivs: list(gcm.seal_batch(cipher, plaintexts, ivs))

    def open_many(cipher: Cipher) -> OpenMany:
        return lambda datagrams: list(gcm.open_batch(cipher, datagrams))

    implementation = Implementation(
        "compiled", gcm.GcmContext, seal_many, open_many, "seal_batch/open_batch, GIL released"
    )
    return implementation, None


def pure_implementation() -> tuple[Implementation | None, str | None]:
    from p2pvpn.wire.crypto import DatagramCipher

    try:
        DatagramCipher(bytes(32))
    except ImportError as exc:  # cryptography missing: the wheel's dependency was removed
        return None, f"not available: {exc} (pip install cryptography)"

    def seal_many(cipher: Cipher) -> SealMany:
        def seal_all(plaintexts: Sequence[bytes], ivs: bytes | None) -> list[bytes]:
            if ivs is None:
                return [cipher.seal(plaintext) for plaintext in plaintexts]
            return [
                cipher.seal(plaintext, ivs[i * _IV_SIZE : (i + 1) * _IV_SIZE])
                for i, plaintext in enumerate(plaintexts)
            ]

        return seal_all

    def open_many(cipher: Cipher) -> OpenMany:
        def open_all(datagrams: Sequence[bytes]) -> list[bytes | None]:
            return [open_or_none(cipher, datagram) for datagram in datagrams]

        return open_all

    return Implementation("pure", DatagramCipher, seal_many, open_many, "a Python loop"), None


def open_or_none(cipher: Cipher, datagram: bytes) -> bytes | None:
    try:
        return cipher.open(datagram)
    except ValueError:  # the reference's DecodeError/AuthenticationFailed are ValueErrors too
        return None


# --------------------------------------------------------------------------
# Same bytes as the reference, or no timing at all


def check_reference() -> None:
    from p2pvpn.wire.crypto import DatagramCipher

    reference = DatagramCipher(_VECTOR_KEY)
    if reference.seal(_VECTOR_PLAINTEXT, _VECTOR_IV) != _VECTOR_DATAGRAM:
        raise BenchError(
            "the reference AES-256-GCM (p2pvpn.wire.crypto on cryptography) does not give "
            "the published GCM test vector: the cryptography installation is broken; reinstall it"
        )


def check(implementation: Implementation, size: int) -> None:
    """Raise BenchError unless ``implementation`` seals like the reference and opens its output."""
    from p2pvpn.wire.crypto import DatagramCipher

    key = os.urandom(32)
    plaintexts = [os.urandom(size) for _ in range(BATCH)]
    ivs = [os.urandom(_IV_SIZE) for _ in range(BATCH)]
    reference = DatagramCipher(key)
    expected = [reference.seal(p, iv) for p, iv in zip(plaintexts, ivs, strict=True)]
    cipher = implementation.make(key)
    seal_many, open_many = implementation.seal_many(cipher), implementation.open_many(cipher)
    tampered = bytearray(expected[0])
    tampered[-1] ^= 0x01
    checks: dict[str, Callable[[], bool]] = {
        "seal (single)": lambda: (
            [cipher.seal(p, iv) for p, iv in zip(plaintexts, ivs, strict=True)] == expected
        ),
        "seal (batch)": lambda: seal_many(plaintexts, b"".join(ivs)) == expected,
        "open (single)": lambda: [open_or_none(cipher, d) for d in expected] == plaintexts,
        "open (batch)": lambda: open_many(expected) == plaintexts,
        "open of its own random-IV seal": lambda: _round_trips(implementation, cipher, plaintexts),
        "refusal of a tampered datagram": lambda: (
            open_or_none(cipher, bytes(tampered)) is None and open_many([bytes(tampered)]) == [None]
        ),
    }
    wrong = [name for name, check in checks.items() if not _passes(check)]
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


def _passes(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception as exc:  # a broken build may raise anything; it fails the check either way
        logger.debug("check raised %r", exc)
        return False


def _round_trips(implementation: Implementation, cipher: Cipher, plaintexts: list[bytes]) -> bool:
    sealed = implementation.seal_many(cipher)(plaintexts, None)
    ivs = {datagram[:_IV_SIZE] for datagram in sealed}
    single = cipher.seal(plaintexts[0])
    return (
        len(ivs) == len(sealed)  # a fresh IV per datagram
        and implementation.open_many(cipher)(sealed) == plaintexts
        and open_or_none(cipher, single) == plaintexts[0]
    )


# --------------------------------------------------------------------------
# Timing


def _workload(implementation: Implementation, measurement: Measurement) -> Callable[[], object]:
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


def measure(implementation: Implementation, measurement: Measurement, seconds: float) -> Figure:
    if measurement.mode == "threads":
        return _measure_threads(implementation, measurement, seconds)
    rounds, wall, cpu = _time_rounds(_workload(implementation, measurement), seconds)
    return Figure(rounds * BATCH, wall, cpu, 1, measurement.size)


def _measure_threads(
    implementation: Implementation, measurement: Measurement, seconds: float
) -> Figure:
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
    return Figure(sum(results) * BATCH, wall, cpu, count, measurement.size)
