"""The compiled AES-256-GCM of p2pvpn._gcm against cryptography's AESGCM.

Datagrams are IV(12) | tag(16) | ciphertext (PROTOCOL 3.1); cryptography
returns ciphertext || tag, so the reference helpers below reorder.
"""

import hashlib
import ipaddress
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvpn._gcm import GcmContext, open_batch, seal_batch

IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
KEY = bytes(range(32))

keys = st.binary(min_size=32, max_size=32)
ivs = st.binary(min_size=IV_SIZE, max_size=IV_SIZE)
plaintexts = st.binary(min_size=0, max_size=1500)


def reference_seal(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    sealed = AESGCM(key).encrypt(iv, plaintext, None)  # ciphertext || tag
    return iv + sealed[-TAG_SIZE:] + sealed[:-TAG_SIZE]


def reference_open(key: bytes, datagram: bytes) -> bytes:
    iv, tag, ciphertext = datagram[:IV_SIZE], datagram[IV_SIZE:OVERHEAD], datagram[OVERHEAD:]
    return AESGCM(key).decrypt(iv, ciphertext + tag, None)


def make_plaintexts(count: int) -> list[bytes]:
    # Sizes cycle through 0..1500 so one batch covers empty, odd and full MTU.
    return [os.urandom((i * 97) % 1501) for i in range(count)]


# -- single datagrams against the reference ---------------------------------


@given(key=keys, iv=ivs, plaintext=plaintexts)
def test_seal_matches_reference(key: bytes, iv: bytes, plaintext: bytes) -> None:
    assert GcmContext(key).seal(plaintext, iv) == reference_seal(key, iv, plaintext)


@given(key=keys, iv=ivs, plaintext=plaintexts)
def test_open_reads_reference_datagrams(key: bytes, iv: bytes, plaintext: bytes) -> None:
    assert GcmContext(key).open(reference_seal(key, iv, plaintext)) == plaintext


@given(plaintext=plaintexts)
def test_random_iv_seal_is_opened_by_reference(plaintext: bytes) -> None:
    datagram = GcmContext(KEY).seal(plaintext)
    assert len(datagram) == len(plaintext) + OVERHEAD
    assert reference_open(KEY, datagram) == plaintext


@settings(max_examples=50)
@given(key=keys, messages=st.lists(st.tuples(ivs, plaintexts), max_size=20))
def test_context_is_reused_across_many_datagrams(
    key: bytes, messages: list[tuple[bytes, bytes]]
) -> None:
    # One context, many messages: each re-initialisation must start clean.
    context = GcmContext(key)
    for iv, plaintext in messages:
        datagram = context.seal(plaintext, iv)
        assert datagram == reference_seal(key, iv, plaintext)
        assert context.open(datagram) == plaintext


def test_opens_datagrams_captured_from_candy(candy_vectors: dict[str, Any]) -> None:
    vectors = candy_vectors
    udp = vectors["udp_client_to_peer"]
    # key(tun_ip) = SHA-256(password || reversed octets of tun_ip)
    peer_ip = ipaddress.IPv4Address(udp["peer_tun_ip"])
    key = hashlib.sha256(vectors["password"].encode() + peer_ip.packed[::-1]).digest()
    context = GcmContext(key)
    datagrams = [bytes.fromhex(d["hex"]) for d in udp["datagrams"]]
    expected = [bytes.fromhex(d["plaintext"]) for d in udp["datagrams"]]
    assert [context.open(d) for d in datagrams] == expected
    assert open_batch(context, datagrams) == expected


# -- batches -----------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65])
def test_batch_equals_per_packet_calls(count: int) -> None:
    context = GcmContext(KEY)
    messages = make_plaintexts(count)
    iv_block = os.urandom(IV_SIZE * count)
    iv_list = [iv_block[i * IV_SIZE : (i + 1) * IV_SIZE] for i in range(count)]

    sealed = seal_batch(context, messages, iv_block)
    assert sealed == [context.seal(m, iv) for m, iv in zip(messages, iv_list, strict=True)]
    assert sealed == [reference_seal(KEY, iv, m) for m, iv in zip(messages, iv_list, strict=True)]
    assert open_batch(context, sealed) == [context.open(d) for d in sealed] == messages


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65])
def test_batch_with_random_ivs_round_trips(count: int) -> None:
    context = GcmContext(KEY)
    messages = make_plaintexts(count)
    sealed = seal_batch(context, messages)
    assert [reference_open(KEY, d) for d in sealed] == messages
    assert open_batch(context, sealed) == messages


def test_batch_accepts_tuples_and_any_bytes_like() -> None:
    context = GcmContext(bytearray(KEY))
    messages = (b"abc", bytearray(b"defg"), memoryview(b"xhijx")[1:4], b"")
    iv_block = bytearray(range(IV_SIZE * len(messages)))
    sealed = seal_batch(context, messages, memoryview(iv_block))
    expected = [
        reference_seal(KEY, bytes(iv_block[i * IV_SIZE : (i + 1) * IV_SIZE]), bytes(m))
        for i, m in enumerate(messages)
    ]
    assert sealed == expected
    as_buffers = (bytearray(sealed[0]), memoryview(sealed[1]), sealed[2], sealed[3])
    assert open_batch(context, as_buffers) == [b"abc", b"defg", b"hij", b""]
    assert context.open(bytearray(sealed[1])) == b"defg"
    assert context.seal(memoryview(b"abc"), bytearray(iv_block[:IV_SIZE])) == sealed[0]


def test_batch_rejects_wrong_ivs_length() -> None:
    context = GcmContext(KEY)
    with pytest.raises(ValueError, match="ivs must be 24 bytes"):
        seal_batch(context, [b"a", b"b"], bytes(23))
    with pytest.raises(ValueError, match="ivs must be 0 bytes"):
        seal_batch(context, [], bytes(12))


def test_batch_rejects_non_buffers() -> None:
    context = GcmContext(KEY)
    with pytest.raises(TypeError):
        seal_batch(context, [b"ok", "not bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        open_batch(context, [None])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        seal_batch(None, [b"x"])  # type: ignore[arg-type]


# -- rejection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "index"),
    [("iv", 0), ("iv", IV_SIZE - 1), ("tag", IV_SIZE), ("tag", OVERHEAD - 1),
     ("ciphertext", OVERHEAD), ("ciphertext", -1)],
)  # fmt: skip
def test_tampered_datagram_is_rejected(field: str, index: int) -> None:
    context = GcmContext(KEY)
    good = [context.seal(m) for m in make_plaintexts(5)[1:]]  # non-empty plaintexts
    bad = bytearray(good[2])
    bad[index] ^= 0x01
    with pytest.raises(ValueError, match="authentication failed"):
        context.open(bytes(bad))
    # In a batch only the tampered datagram fails; the context keeps working.
    batch = [*good[:2], bytes(bad), *good[3:]]
    opened = open_batch(context, batch)
    assert opened[2] is None
    assert [p for i, p in enumerate(opened) if i != 2] == [
        context.open(d) for i, d in enumerate(batch) if i != 2
    ]


@given(plaintext=plaintexts, data=st.data())
def test_any_single_bit_flip_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    context = GcmContext(KEY)
    datagram = bytearray(context.seal(plaintext))
    position = data.draw(st.integers(0, len(datagram) - 1))
    datagram[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ValueError, match="authentication failed"):
        context.open(datagram)
    assert open_batch(context, [datagram]) == [None]


def test_wrong_key_is_rejected() -> None:
    datagram = GcmContext(KEY).seal(b"secret")
    other = GcmContext(bytes(32))
    with pytest.raises(ValueError, match="authentication failed"):
        other.open(datagram)
    assert open_batch(other, [datagram]) == [None]


@pytest.mark.parametrize("length", [0, 1, IV_SIZE, OVERHEAD - 1])
def test_short_datagram_is_rejected(length: int) -> None:
    context = GcmContext(KEY)
    with pytest.raises(ValueError, match="datagram too short"):
        context.open(bytes(length))
    good = context.seal(b"ok")
    assert open_batch(context, [good, bytes(length), good]) == [b"ok", None, b"ok"]


def test_empty_plaintext_is_a_28_byte_datagram() -> None:
    context = GcmContext(KEY)
    datagram = context.seal(b"")
    assert len(datagram) == OVERHEAD
    assert context.open(datagram) == b""
    assert open_batch(context, [datagram]) == [b""]


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_key_length_is_rejected(length: int) -> None:
    with pytest.raises(ValueError, match=rf"32 bytes, got {length}\b"):
        GcmContext(bytes(length))


def test_non_buffer_arguments_are_rejected() -> None:
    with pytest.raises(TypeError):
        GcmContext("k" * 32)  # type: ignore[arg-type]
    context = GcmContext(KEY)
    with pytest.raises(TypeError):
        context.seal("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        context.open(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [0, 11, 13, 16])
def test_wrong_iv_length_is_rejected(length: int) -> None:
    with pytest.raises(ValueError, match=rf"iv must be 12 bytes, got {length}\b"):
        GcmContext(KEY).seal(b"x", bytes(length))


# -- random IVs ----------------------------------------------------------------


def test_random_ivs_differ_between_calls() -> None:
    # 1000 calls cross several refills of the 256-IV pool.
    context = GcmContext(KEY)
    iv_list = [context.seal(b"same plaintext")[:IV_SIZE] for _ in range(1000)]
    assert len(set(iv_list)) == len(iv_list)


def test_random_ivs_differ_within_and_across_batches() -> None:
    context = GcmContext(KEY)
    datagrams = seal_batch(context, [b"p"] * 600) + seal_batch(context, [b"p"] * 600)
    iv_list = [d[:IV_SIZE] for d in datagrams]
    assert len(set(iv_list)) == len(iv_list)
    assert len({d[IV_SIZE:] for d in datagrams}) == len(datagrams)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_does_not_reuse_parent_ivs() -> None:
    context = GcmContext(KEY)
    context.seal(b"warm up")  # the pool is now full with 255 IVs left
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the IV of its next datagram, then exit at once
        try:
            os.write(write_end, context.seal(b"child")[:IV_SIZE])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_iv = pipe.read()
    os.waitpid(pid, 0)
    assert len(child_iv) == IV_SIZE
    assert context.seal(b"parent")[:IV_SIZE] != child_iv


# -- threads -----------------------------------------------------------------


def test_context_shared_between_threads() -> None:
    # Each EVP context is guarded by a lock; without it, concurrent batches on
    # one context would corrupt each other's GCM state.
    context = GcmContext(KEY)
    messages = make_plaintexts(64)
    sealed = seal_batch(context, messages)
    errors: list[str] = []

    def worker() -> None:
        for _ in range(50):
            if open_batch(context, sealed) != messages:
                errors.append("open_batch")
            again = seal_batch(context, messages)
            if [reference_open(KEY, d) for d in again[:4]] != messages[:4]:
                errors.append("seal_batch")
            if context.open(sealed[5]) != messages[5]:
                errors.append("open")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    # A thread that holds the GIL is asked to drop it only after the switch
    # interval. With a long one, if open_batch kept the GIL the main thread
    # could not run at all between the worker's `started.set()` and
    # `finished.set()`, so the test below cannot pass by luck.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.usefixtures("long_switch_interval")
def test_open_batch_releases_the_gil() -> None:
    context = GcmContext(KEY)
    messages = [os.urandom(1400) for _ in range(64)]
    datagrams = seal_batch(context, messages) * 128  # 8192 datagrams, ~11 MB
    expected = messages * 128

    # No timing assertion: count what the main thread does between the worker
    # announcing the batch and the batch returning. Holding the GIL for the
    # whole batch would make that exactly zero. Several attempts, because on a
    # loaded machine the main thread may simply not be scheduled in time.
    counter = 0
    for _attempt in range(10):
        started = threading.Event()
        finished = threading.Event()
        results: list[list[bytes | None]] = []

        def worker(
            started: threading.Event, finished: threading.Event, results: list[list[bytes | None]]
        ) -> None:
            started.set()
            results.append(open_batch(context, datagrams))
            finished.set()

        thread = threading.Thread(target=worker, args=(started, finished, results))
        thread.start()
        started.wait()
        # Each short wait gives the GIL back, so the worker never waits for
        # the (long) switch interval to return from open_batch.
        while not finished.wait(0.0002):
            counter += 1
        thread.join()
        assert results == [expected]
        if counter > 0:
            break
    assert counter > 0, "the main thread never ran while open_batch was working"
