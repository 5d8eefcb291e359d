"""The virtio-net header that a TUN device opened with ``IFF_VNET_HDR`` puts in
front of every packet, and the offload flags of ``TUNSETOFFLOAD``, sans I/O.

With offloads on, the kernel hands the data plane TCP (and UDP) super-packets
of up to 64 KB that it has not segmented, with checksums it has not finished,
and takes such packets back; the header says which. The values are Linux's
(``<linux/virtio_net.h>``, ``<linux/if_tun.h>``); the compiled data plane
compares its own copies with these at import.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from p2pvpn.wire.errors import DecodeError

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_UDP_L4",
    "HEADER_LENGTH",
    "NEEDS_CSUM",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_USO4",
    "TUN_F_USO6",
    "VirtioNetHeader",
    "decode_virtio_header",
    "encode_virtio_header",
]

HEADER_LENGTH = 10

# virtio_net_hdr.flags
NEEDS_CSUM = 1
# virtio_net_hdr.gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# TUNSETOFFLOAD flags
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_USO4 = 0x20
# The kernel takes USO4 only together with USO6 (tun.c, set_offload); IPv6
# packets are dropped by the data plane either way.
TUN_F_USO6 = 0x40

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: native byte
# order, the TUN's order unless TUNSETVNETBE/LE says otherwise (we never do).
_HEADER = struct.Struct("=BBHHHH")


@dataclass(frozen=True)
class VirtioNetHeader:
    """One virtio-net header; all zero for a plain, finished packet."""

    flags: int = 0
    gso_type: int = GSO_NONE
    header_length: int = 0
    segment_size: int = 0
    checksum_start: int = 0
    checksum_offset: int = 0


def encode_virtio_header(header: VirtioNetHeader) -> bytes:
    return _HEADER.pack(
        header.flags,
        header.gso_type,
        header.header_length,
        header.segment_size,
        header.checksum_start,
        header.checksum_offset,
    )


def decode_virtio_header(data: bytes) -> VirtioNetHeader:
    """The header at the start of `data` (a packet as read from the TUN)."""
    if len(data) < HEADER_LENGTH:
        raise DecodeError(f"virtio-net header needs {HEADER_LENGTH} bytes, got {len(data)}")
    return VirtioNetHeader(*_HEADER.unpack_from(data))
