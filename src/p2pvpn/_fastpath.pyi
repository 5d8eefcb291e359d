"""Type stub for the compiled data plane (src/p2pvpn/_fastpath.pyx)."""

import socket
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import final

from p2pvpn.dataplane.base import DataPlaneEvents, DataPlaneStats, UdpAddress

__all__ = ["FastDataPlane", "coalesce_tun_packets", "segment_tun_packet"]

TUN_OFFLOAD_NAMES: tuple[str, ...]

def segment_tun_packet(data: bytes) -> list[bytes]:
    """virtio-net header + IPv4 packet as the TUN hands it over -> the IPv4
    packets the plane seals, one per FORWARD; ValueError where it drops it."""

def coalesce_tun_packets(packets: Iterable[bytes]) -> list[bytes]:
    """The IPv4 packets one received batch opened -> the TUN writes (virtio-net
    header + packet), the segments of a TCP flow coalesced."""

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
        tun_offloads: tuple[str, ...] = (),
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

    @property
    def udp_offloads(self) -> tuple[str, ...]:
        """The kernel UDP offloads in use now: ``"gso"``, ``"gro"``."""

    @property
    def tun_offloads(self) -> tuple[str, ...]:
        """The TUN offloads in use: ``"csum"``, ``"tso4"``, ``"uso4"``; empty without."""

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
    def set_forwarded_wrap(self, network: IPv4Network | None) -> None:
        """Exit node: wrap packets from outside `network` to its members in IPIP."""

    def set_stun_server(self, address: UdpAddress | None) -> None: ...
    def send_control(self, address: UdpAddress, key: bytes, plaintext: bytes) -> None: ...
    def send_stun(self, address: UdpAddress, data: bytes) -> None: ...
    def write_tun(self, packet: bytes) -> None: ...
    def stats(self) -> DataPlaneStats: ...
