"""Key derivation, password hashes and the datagram cipher (PROTOCOL 2.1, 3.1)."""

import hashlib
from ipaddress import IPv4Address

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.crypto import (
    IV_SIZE,
    OVERHEAD,
    TAG_SIZE,
    AuthenticationFailed,
    DatagramCipher,
    auth_hash,
    expttun_hash,
    peer_key,
    vmac_hash,
)
from p2pvpn.wire.errors import DecodeError

PASSWORD = "probe-password"
KEY = bytes(range(32))
IV = bytes.fromhex("000102030405060708090a0b")


def test_sizes() -> None:
    assert (IV_SIZE, TAG_SIZE, OVERHEAD) == (12, 16, 28)


def test_peer_key_hashes_reversed_octets() -> None:
    expected = hashlib.sha256(PASSWORD.encode() + bytes([1, 202, 168, 192])).digest()
    assert peer_key(PASSWORD, IPv4Address("192.168.202.1")) == expected
    assert peer_key(PASSWORD, IPv4Address("1.202.168.192")) != expected


def test_peer_key_encodes_password_as_utf8() -> None:
    expected = hashlib.sha256("pässwörd".encode() + bytes([4, 3, 2, 1])).digest()
    assert peer_key("pässwörd", IPv4Address("1.2.3.4")) == expected


def test_password_hashes() -> None:
    timestamp = bytes.fromhex("000000006b06a41a")
    ip = IPv4Address("192.168.202.1")
    password = PASSWORD.encode()
    assert (
        auth_hash(PASSWORD, ip, 0x6B06A41A)
        == hashlib.sha256(password + ip.packed + timestamp).digest()
    )
    assert expttun_hash(PASSWORD, 0x6B06A41A) == hashlib.sha256(password + timestamp).digest()
    assert (
        vmac_hash(PASSWORD, "1eb9fcc6f6a90f6f", 0x6B06A41A)
        == hashlib.sha256(password + b"1eb9fcc6f6a90f6f" + timestamp).digest()
    )


def test_empty_password_hashes_only_the_fields() -> None:
    assert expttun_hash("", -1) == hashlib.sha256(b"\xff" * 8).digest()


@pytest.mark.parametrize("vmac", ["short", "0123456789abcdef0", "0123456789abcdé"])
def test_vmac_hash_refuses_a_vmac_that_is_not_16_ascii_characters(vmac: str) -> None:
    with pytest.raises(ValueError):
        vmac_hash(PASSWORD, vmac, 0)


def test_hash_refuses_out_of_range_timestamp() -> None:
    with pytest.raises(ValueError):
        expttun_hash(PASSWORD, 2**63)


def test_seal_layout_matches_aesgcm_reference() -> None:
    plaintext = b"\x00\xc0\xa8\xca\x01" + b"\x00" * 7
    sealed = DatagramCipher(KEY).seal(plaintext, IV)
    reference = AESGCM(KEY).encrypt(IV, plaintext, None)
    assert sealed == IV + reference[-16:] + reference[:-16]


def test_seal_with_random_iv_differs_every_time() -> None:
    cipher = DatagramCipher(KEY)
    first, second = cipher.seal(b"hello"), cipher.seal(b"hello")
    assert first[:IV_SIZE] != second[:IV_SIZE]
    assert len(first) == OVERHEAD + 5
    assert cipher.open(first) == cipher.open(second) == b"hello"


def test_empty_plaintext_round_trips() -> None:
    cipher = DatagramCipher(KEY)
    sealed = cipher.seal(b"", IV)
    assert len(sealed) == OVERHEAD
    assert cipher.open(sealed) == b""


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "index", [0, IV_SIZE - 1, IV_SIZE, OVERHEAD - 1, OVERHEAD, OVERHEAD + 10], ids=str
)
def test_tampering_raises_authentication_failed(index: int) -> None:
    cipher = DatagramCipher(KEY)
    sealed = cipher.seal(b"some plaintext", IV)
    with pytest.raises(AuthenticationFailed):
        cipher.open(_flip(sealed, index))


def test_wrong_key_raises_authentication_failed() -> None:
    sealed = DatagramCipher(KEY).seal(b"x", IV)
    with pytest.raises(AuthenticationFailed):
        DatagramCipher(bytes(32)).open(sealed)


def test_appended_bytes_fail_authentication() -> None:
    cipher = DatagramCipher(KEY)
    with pytest.raises(AuthenticationFailed):
        cipher.open(cipher.seal(b"x", IV) + b"\x00")


@pytest.mark.parametrize("length", [0, 1, 27])
def test_short_datagram_raises_decode_error(length: int) -> None:
    with pytest.raises(DecodeError) as raised:
        DatagramCipher(KEY).open(b"\x00" * length)
    assert not isinstance(raised.value, AuthenticationFailed)


def test_authentication_failed_is_a_decode_error() -> None:
    assert issubclass(AuthenticationFailed, DecodeError)


@pytest.mark.parametrize("key_size", [0, 16, 24, 31, 33])
def test_cipher_requires_a_256_bit_key(key_size: int) -> None:
    with pytest.raises(ValueError):
        DatagramCipher(b"\x00" * key_size)


@pytest.mark.parametrize("iv_size", [0, 11, 13, 16])
def test_seal_refuses_wrong_iv_size(iv_size: int) -> None:
    with pytest.raises(ValueError):
        DatagramCipher(KEY).seal(b"x", b"\x00" * iv_size)


@given(
    st.binary(min_size=32, max_size=32),
    st.binary(max_size=2000),
    st.binary(min_size=12, max_size=12),
)
def test_round_trip(key: bytes, plaintext: bytes, iv: bytes) -> None:
    cipher = DatagramCipher(key)
    sealed = cipher.seal(plaintext, iv)
    assert sealed[:IV_SIZE] == iv
    assert cipher.open(sealed) == plaintext


@given(st.binary(max_size=200))
def test_open_of_arbitrary_bytes_raises_only_decode_error(datagram: bytes) -> None:
    with pytest.raises(DecodeError):
        DatagramCipher(KEY).open(datagram)
