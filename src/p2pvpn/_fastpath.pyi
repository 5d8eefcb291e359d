"""Type stub for the compiled data path (src/p2pvpn/_fastpath.pyx).

Datagrams are IV(12) | GCM tag(16) | ciphertext, AES-256-GCM without
associated data (PROTOCOL 3.1). Every argument typed ``Buffer`` accepts any
C-contiguous bytes-like object (bytes, bytearray, memoryview, ...).
"""

import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import final

from typing_extensions import Buffer

from p2pvpn.dataplane.base import DataPlaneEvents, DataPlaneStats, UdpAddress

__all__ = ["FastDataPlane", "GcmContext", "open_batch", "seal_batch"]

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

@final
class FastDataPlane:
    """The DataPlane interface with GIL-free TUN and UDP worker threads."""

    def __init__(
        self,
        tun_fd: int,
        udp_socket: socket.socket,
        tun_ip: IPv4Address,
        key: bytes,
        events: DataPlaneEvents,
        *,
        relaying: bool = False,
        replay_window: float = ...,
        udp_offload: bool = True,
    ) -> None: ...
    @property
    def implementation(self) -> str:
        """Always ``"fast"``."""

    @property
    def udp_segmentation(self) -> bool:
        """Whether sends use UDP GSO now (off if the kernel refused it once)."""

    @property
    def udp_receive_offload(self) -> bool:
        """Whether the socket hands runs of datagrams up coalesced (UDP_GRO)."""

    def start(self) -> None:
        """Start the workers; call on the event loop thread."""

    def close(self) -> None:
        """Stop and join the workers; idempotent; the fds stay open."""

    def set_peer(self, tun_ip: IPv4Address, address: UdpAddress, key: bytes) -> None: ...
    def drop_peer(self, tun_ip: IPv4Address) -> None:
        """No packet goes to `tun_ip` once this returns."""

    def set_route(self, destination: IPv4Address, next_hop: IPv4Address) -> None: ...
    def drop_route(self, destination: IPv4Address) -> None: ...
    def set_sysroutes(self, routes: Sequence[tuple[IPv4Network, IPv4Address]]) -> None: ...
    def set_stun_server(self, address: UdpAddress | None) -> None: ...
    def send_control(self, address: UdpAddress, key: bytes, plaintext: bytes) -> None: ...
    def send_stun(self, address: UdpAddress, data: bytes) -> None: ...
    def write_tun(self, packet: bytes) -> None: ...
    def stats(self) -> DataPlaneStats: ...
