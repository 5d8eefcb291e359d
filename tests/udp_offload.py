"""UDP offload helpers for tests that feed a data plane coalesced runs.

Python's socket module lacks these constants; the values are Linux's.
"""

from __future__ import annotations

import socket
import struct

from p2pvpn.dataplane.base import UdpAddress

UDP_SEGMENT = 103  # <linux/udp.h>
UDP_GRO = 104
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>


def send_run(sock: socket.socket, datagrams: list[bytes], target: UdpAddress) -> None:
    """One UDP GSO message: all as long as the first, the last may be shorter.

    On loopback it reaches a socket with UDP_GRO as one coalesced receive,
    and any other socket as the same datagrams one by one."""
    sock.sendmsg(
        [b"".join(datagrams)],
        [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))],
        0,
        target,
    )


def take_runs_whole(sock: socket.socket) -> None:
    """Coalesced receives from now on: the compiled plane only turns UDP_GRO
    on when it starts, and a burst queued before that must reach its first
    recvmmsg as the runs it was sent as."""
    sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)


def enlarge_receive_buffer(sock: socket.socket, size: int = 1 << 24) -> None:
    """Room for bursts of thousands of datagrams: past net.core.rmem_max as root."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
