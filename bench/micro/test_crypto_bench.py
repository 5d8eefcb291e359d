"""Micro benchmarks: AES-256-GCM of 1400-byte packets, 64 per round.

Run explicitly (bench/ is not in testpaths):

    python -m pytest bench/micro -q --benchmark-only

Every benchmark handles one batch of BATCH packets per round, so the means
compare directly; `extra_info` has packets/s and ns/packet. Variants:

* reference_raw: cryptography's AESGCM per packet, crypto only (IV given,
  output left as ciphertext||tag): a lower bound for any Python data plane.
* reference_datagram: the same plus what a Python data plane must also do,
  i.e. a random IV per packet (os.urandom) and the IV|tag|ciphertext layout.
* fastpath_per_packet: GcmContext.seal/open, one call per packet.
* fastpath_batch: seal_batch/open_batch, one call per round.
"""

import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pvpn._gcm import GcmContext, open_batch, seal_batch

BATCH = 64
PACKET_SIZE = 1400
IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
KEY = os.urandom(32)

PACKETS = [os.urandom(PACKET_SIZE) for _ in range(BATCH)]
IVS = [os.urandom(IV_SIZE) for _ in range(BATCH)]
DATAGRAMS = seal_batch(GcmContext(KEY), PACKETS, b"".join(IVS))
# cryptography's own layout of the same messages: ciphertext || tag.
SEALED = [d[OVERHEAD:] + d[IV_SIZE:OVERHEAD] for d in DATAGRAMS]


def run(benchmark: Any, function: Callable[[], object]) -> None:
    benchmark(function)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    mean = benchmark.stats.stats.mean  # seconds per round of BATCH packets
    benchmark.extra_info["packets_per_s"] = round(BATCH / mean)
    benchmark.extra_info["ns_per_packet"] = round(mean / BATCH * 1e9, 1)
    benchmark.extra_info["MB_per_s"] = round(BATCH * PACKET_SIZE / mean / 1e6, 1)


# -- seal ----------------------------------------------------------------------


@pytest.mark.benchmark(group="seal")
def test_seal_reference_raw(benchmark: Any) -> None:
    aead = AESGCM(KEY)
    pairs = list(zip(IVS, PACKETS, strict=True))

    def seal_all() -> list[bytes]:
        return [aead.encrypt(iv, packet, None) for iv, packet in pairs]

    run(benchmark, seal_all)


@pytest.mark.benchmark(group="seal")
def test_seal_reference_datagram(benchmark: Any) -> None:
    aead = AESGCM(KEY)

    def seal_all() -> list[bytes]:
        datagrams = []
        for packet in PACKETS:
            iv = os.urandom(IV_SIZE)
            sealed = aead.encrypt(iv, packet, None)
            datagrams.append(iv + sealed[-TAG_SIZE:] + sealed[:-TAG_SIZE])
        return datagrams

    run(benchmark, seal_all)


@pytest.mark.benchmark(group="seal")
def test_seal_fastpath_per_packet(benchmark: Any) -> None:
    seal = GcmContext(KEY).seal

    def seal_all() -> list[bytes]:
        return [seal(packet) for packet in PACKETS]

    run(benchmark, seal_all)


@pytest.mark.benchmark(group="seal")
def test_seal_fastpath_batch(benchmark: Any) -> None:
    context = GcmContext(KEY)
    run(benchmark, lambda: seal_batch(context, PACKETS))


# -- open ----------------------------------------------------------------------


@pytest.mark.benchmark(group="open")
def test_open_reference_raw(benchmark: Any) -> None:
    aead = AESGCM(KEY)
    pairs = list(zip(IVS, SEALED, strict=True))

    def open_all() -> list[bytes]:
        return [aead.decrypt(iv, sealed, None) for iv, sealed in pairs]

    run(benchmark, open_all)


@pytest.mark.benchmark(group="open")
def test_open_reference_datagram(benchmark: Any) -> None:
    aead = AESGCM(KEY)

    def open_all() -> list[bytes]:
        return [
            aead.decrypt(d[:IV_SIZE], d[OVERHEAD:] + d[IV_SIZE:OVERHEAD], None) for d in DATAGRAMS
        ]

    run(benchmark, open_all)


@pytest.mark.benchmark(group="open")
def test_open_fastpath_per_packet(benchmark: Any) -> None:
    open_ = GcmContext(KEY).open

    def open_all() -> list[bytes]:
        return [open_(d) for d in DATAGRAMS]

    run(benchmark, open_all)


@pytest.mark.benchmark(group="open")
def test_open_fastpath_batch(benchmark: Any) -> None:
    context = GcmContext(KEY)
    run(benchmark, lambda: open_batch(context, DATAGRAMS))


def test_variants_agree() -> None:
    """The benchmarked variants compute the same thing (runs without --benchmark-only)."""
    context = GcmContext(KEY)
    assert open_batch(context, DATAGRAMS) == PACKETS
    assert [AESGCM(KEY).decrypt(iv, s, None) for iv, s in zip(IVS, SEALED, strict=True)] == PACKETS
