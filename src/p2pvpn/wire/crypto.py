"""Key derivation, password hashes and the reference AES-256-GCM datagram cipher.

PROTOCOL 2.1 (password hashes) and 3.1 (datagram encryption). This is the
reference implementation the compiled data plane is tested against, so it
favours clarity over speed.
"""

import hashlib
import os
import struct
from ipaddress import IPv4Address

from p2pvpn.wire.errors import DecodeError

__all__ = [
    "IV_SIZE",
    "KEY_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "AuthenticationFailed",
    "DatagramCipher",
    "auth_hash",
    "expttun_hash",
    "peer_key",
    "vmac_hash",
]

IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
KEY_SIZE = 32
VMAC_SIZE = 16

_TIMESTAMP = struct.Struct("!q")


class AuthenticationFailed(DecodeError):  # noqa: N818 - name fixed by docs/internals.md
    """The GCM tag of a datagram did not verify (wrong key or tampered data)."""


def _timestamp_bytes(timestamp: int) -> bytes:
    try:
        return _TIMESTAMP.pack(timestamp)
    except struct.error as exc:
        raise ValueError(f"timestamp {timestamp} does not fit in an i64") from exc


def peer_key(password: str, tun_ip: IPv4Address) -> bytes:
    """The AES-256 key of the peer whose virtual address is ``tun_ip``.

    The octets are reversed on purpose: the reference implementation hashes
    them that way (seemingly a host-order integer on little-endian machines),
    and every deployed Candy client depends on it.
    """
    return hashlib.sha256(password.encode("utf-8") + tun_ip.packed[::-1]).digest()


def auth_hash(password: str, tun_ip: IPv4Address, timestamp: int) -> bytes:
    """SHA-256(password || tun_ip || i64be timestamp), the AUTH message hash."""
    material = password.encode("utf-8") + tun_ip.packed + _timestamp_bytes(timestamp)
    return hashlib.sha256(material).digest()


def expttun_hash(password: str, timestamp: int) -> bytes:
    """SHA-256(password || i64be timestamp); the reference leaves the cidr unhashed."""
    return hashlib.sha256(password.encode("utf-8") + _timestamp_bytes(timestamp)).digest()


def vmac_hash(password: str, vmac: str, timestamp: int) -> bytes:
    """SHA-256(password || vmac(16 ASCII bytes) || i64be timestamp)."""
    vmac_bytes = vmac.encode("ascii")
    if len(vmac_bytes) != VMAC_SIZE:
        raise ValueError(f"vmac must be {VMAC_SIZE} ASCII characters, got {len(vmac_bytes)}")
    material = password.encode("utf-8") + vmac_bytes + _timestamp_bytes(timestamp)
    return hashlib.sha256(material).digest()


class DatagramCipher:
    """Seals and opens peer datagrams laid out as IV(12) | tag(16) | ciphertext.

    One AESGCM object per key, because its key schedule is the expensive part
    and a peer's key never changes.
    """

    __slots__ = ("_aead", "_invalid_tag")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes (AES-256), got {len(key)}")
        # Imported here: a client on the compiled data plane never builds a
        # DatagramCipher, and cryptography costs ~6 MiB of RSS to import.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._invalid_tag = InvalidTag

    def seal(self, plaintext: bytes, iv: bytes | None = None) -> bytes:
        """Encrypt ``plaintext``; a fresh random IV is drawn unless one is given."""
        if iv is None:
            iv = os.urandom(IV_SIZE)
        elif len(iv) != IV_SIZE:
            raise ValueError(f"iv must be {IV_SIZE} bytes, got {len(iv)}")
        ciphertext_and_tag = self._aead.encrypt(iv, plaintext, None)
        # cryptography appends the tag; Candy puts it before the ciphertext.
        tag = ciphertext_and_tag[-TAG_SIZE:]
        return iv + tag + ciphertext_and_tag[:-TAG_SIZE]

    def open(self, datagram: bytes) -> bytes:
        """Decrypt a datagram; DecodeError when too short, AuthenticationFailed on a bad tag."""
        if len(datagram) < OVERHEAD:
            raise DecodeError(f"datagram of {len(datagram)} bytes is shorter than {OVERHEAD}")
        iv = datagram[:IV_SIZE]
        tag = datagram[IV_SIZE:OVERHEAD]
        ciphertext = datagram[OVERHEAD:]
        try:
            return self._aead.decrypt(iv, ciphertext + tag, None)
        except self._invalid_tag:
            raise AuthenticationFailed("GCM tag did not verify") from None
