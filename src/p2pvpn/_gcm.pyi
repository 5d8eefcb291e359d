"""Type stub for the compiled AES-256-GCM (src/p2pvpn/_gcm.pyx).

Datagrams are IV(12) | GCM tag(16) | ciphertext, AES-256-GCM without
associated data (PROTOCOL 3.1). Every argument typed ``Buffer`` accepts any
C-contiguous bytes-like object (bytes, bytearray, memoryview, ...).
"""

from collections.abc import Sequence
from typing import final

from typing_extensions import Buffer

__all__ = ["GcmContext", "open_batch", "seal_batch"]

@final
class GcmContext:
    """AES-256-GCM under one key, with OpenSSL contexts keyed once and reused."""

    def __init__(self, key: Buffer) -> None:
        """Raise ValueError unless key is 32 bytes."""

    def seal(self, plaintext: Buffer, iv: Buffer | None = None) -> bytes:
        """Return IV | tag | ciphertext; random IV unless a 12-byte iv is given."""

    def open(self, datagram: Buffer) -> bytes:
        """Return the plaintext; ValueError if too short or not authentic."""

def seal_batch(
    context: GcmContext, plaintexts: Sequence[Buffer], ivs: Buffer | None = None
) -> list[bytes]:
    """Seal each plaintext (GIL released); ivs: None or 12 * len(plaintexts) bytes."""

def open_batch(context: GcmContext, datagrams: Sequence[Buffer]) -> list[bytes | None]:
    """Open each datagram (GIL released); None where one is short or not authentic."""
