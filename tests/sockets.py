"""Socket helpers shared by the data plane tests and the fuzzers."""

from __future__ import annotations

import socket


def drain(sock: socket.socket, size: int = 70000) -> list[bytes]:
    """Every datagram a non-blocking ``sock`` holds now, in order, read until it would block."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(size))
        except BlockingIOError:
            return datagrams
