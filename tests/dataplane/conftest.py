"""One test body, every data plane (uvloop's pattern).

A node here is a data plane with a fake TUN device (an AF_UNIX datagram
socketpair keeps packet boundaries like a TUN fd, and needs no root) and a
real UDP socket on loopback.

The third backend, ``fast-offload``, is the compiled plane as it runs on a TUN
device opened with IFF_VNET_HDR and checksum and TSO4 offloads: every read
and write carries a virtio-net header. Its Node plays the kernel's part, so a
test means the same on every backend: `inject` puts a header in front of each
packet, and `delivered` takes the header off each write and cuts a coalesced
(GSO) write back into the segments the kernel's GRO would have taken in.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Protocol

import pytest

from p2pvpn.dataplane.base import REPLAY_WINDOW_SECONDS, DataPlane, UdpAddress
from p2pvpn.dataplane.pure import PureDataPlane
from p2pvpn.wire.crypto import peer_key
from p2pvpn.wire.ipv4 import ipv4_checksum
from p2pvpn.wire.virtio import VirtioNetHeader, encode_virtio_header
from tests.dataplane.offload_reference import segment_frame
from tests.sockets import drain

PASSWORD = "dataplane-test"
# The offloads TunDevice.open settles for where a kernel refuses USO4. The
# shared tests send no UDP super-packets (test_tun_offload.py covers USO).
TUN_OFFLOADS = ("csum", "tso4")


def fast_data_plane_class() -> Any:
    from p2pvpn._fastpath import FastDataPlane

    return FastDataPlane


# The compiled plane carries the `fastpath` mark: tests/conftest.py skips it
# with the reason when the module is not built, and fails it under CI=true.
@pytest.fixture(
    params=[
        "pure",
        pytest.param("fast", marks=pytest.mark.fastpath),
        pytest.param("fast-offload", marks=pytest.mark.fastpath),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tun_offloads_of(backend: str) -> tuple[str, ...]:
    return TUN_OFFLOADS if backend == "fast-offload" else ()


def plane_kind(backend: str) -> str:
    """The `dataplane` setting that builds `backend`'s plane: pure or fast."""
    return "pure" if backend == "pure" else "fast"


def ipv4_packet(
    source: str, destination: str, payload: bytes = b"x" * 32, ident: int = 0, ttl: int = 64
) -> bytes:
    """A minimal valid IPv4/UDP packet with a correct header checksum."""
    udp = struct.pack("!HHHH", 4000, 4001, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        ident,
        0,
        ttl,
        17,
        0,
        IPv4Address(source).packed,
        IPv4Address(destination).packed,
    )
    checksum = ipv4_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + udp


def after_hops(packet: bytes, hops: int = 1) -> bytes:
    """`packet` as a relaying client passes it on: TTL down by `hops`, and the
    header checksum computed afresh (which the relay's incremental update of
    a valid checksum must match)."""
    header = bytearray(packet[:20])
    header[8] -= hops
    header[10:12] = b"\0\0"
    header[10:12] = ipv4_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[20:]


@dataclass
class Recorder:
    """DataPlaneEvents that keeps everything handed up."""

    relay: list[bytes] = field(default_factory=list)
    control: list[tuple[bytes, UdpAddress]] = field(default_factory=list)
    stun: list[tuple[bytes, UdpAddress]] = field(default_factory=list)

    def on_relay_packets(self, packets: list[bytes]) -> None:
        self.relay.extend(packets)

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        self.control.extend(datagrams)

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        self.stun.extend(datagrams)


class Node:
    """A data plane under test plus the 'kernel' end of its fake TUN device."""

    def __init__(
        self,
        backend: str,
        tun_ip: str,
        *,
        relaying: bool = False,
        replay_window: float = REPLAY_WINDOW_SECONDS,
        tun_offloads: tuple[str, ...] | None = None,
    ) -> None:
        self.backend = backend
        self.tun_offloads = tun_offloads_of(backend) if tun_offloads is None else tun_offloads
        self.tun_ip = IPv4Address(tun_ip)
        self.key = peer_key(PASSWORD, self.tun_ip)
        self.kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.setblocking(False)
        self._tun = tun
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.address: UdpAddress = self.udp.getsockname()
        self.events = Recorder()
        plane_class = PureDataPlane if backend == "pure" else fast_data_plane_class()
        # Only with offloads: the planes of before issue 13 know no such argument.
        offloads = {"tun_offloads": self.tun_offloads} if self.tun_offloads else {}
        self.plane: DataPlane = plane_class(
            tun.fileno(),
            self.udp,
            self.tun_ip,
            self.key,
            self.events,
            relaying=relaying,
            replay_window=replay_window,
            **offloads,
        )

    def frame(self, packet: bytes, header: VirtioNetHeader | None = None) -> bytes:
        """`packet` as the kernel hands it to this node's plane: behind a
        virtio-net header (all zero unless given) when the TUN has offloads."""
        if not self.tun_offloads:
            assert header is None, "a virtio header for a TUN without offloads"
            return packet
        return encode_virtio_header(header or VirtioNetHeader()) + packet

    def inject(self, *packets: bytes) -> None:
        """Packets the kernel routes into the TUN device."""
        for packet in packets:
            self.kernel.send(self.frame(packet))

    def inject_frames(self, *frames: bytes) -> None:
        """Reads of the TUN device as they are, virtio header and all."""
        for frame in frames:
            self.kernel.send(frame)

    def writes(self) -> list[bytes]:
        """What the data plane wrote to TUN since the last call, as written."""
        return drain(self.kernel)

    def delivered(self) -> list[bytes]:
        """Packets the data plane wrote to TUN since the last call (with
        offloads: as the kernel takes them in, one per segment)."""
        writes = drain(self.kernel)
        if not self.tun_offloads:
            return writes
        return [packet for write in writes for packet in segment_frame(write)]

    def close(self) -> None:
        self.plane.close()
        self.kernel.close()
        self._tun.close()
        self.udp.close()


class NodeFactory(Protocol):
    """`make_node(tun_ip, relaying=False)`: a Node that is closed after the test."""

    def __call__(
        self, tun_ip: str, *, relaying: bool = False, replay_window: float = ...
    ) -> Node: ...


@pytest.fixture
def make_node(backend: str) -> Iterator[NodeFactory]:
    nodes: list[Node] = []

    def make(
        tun_ip: str, *, relaying: bool = False, replay_window: float = REPLAY_WINDOW_SECONDS
    ) -> Node:
        node = Node(backend, tun_ip, relaying=relaying, replay_window=replay_window)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def connected_pair(make_node: NodeFactory, sender_ip: str, receiver_ip: str) -> tuple[Node, Node]:
    """Two started nodes, the sender knowing the receiver's direct path."""
    sender, receiver = make_node(sender_ip), make_node(receiver_ip)
    sender.plane.start()
    receiver.plane.start()
    sender.plane.set_peer(receiver.tun_ip, receiver.address, receiver.key)
    return sender, receiver


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` while the loop runs the data plane; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout:.1f} s")
        await asyncio.sleep(0.01)


async def settle(seconds: float = 0.2) -> None:
    """Give the data plane time to (not) do something we assert did not happen."""
    await asyncio.sleep(seconds)
