"""Data planes: move IP packets between the TUN device and UDP peers.

`create_data_plane` picks the implementation named by the `dataplane`
option: `pure` (Python on the event loop), `fast` (the compiled
`p2pvpn._fastpath` workers) or `auto` (fast when the extension provides it).
`resolve_data_plane` says which one that is before it is built, so the
client knows whether to open the TUN device with offloads (fast only).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Literal

from p2pvpn.dataplane.base import DataPlane, DataPlaneEvents
from p2pvpn.dataplane.pure import PureDataPlane

logger = logging.getLogger(__name__)

__all__ = [
    "DataPlane",
    "DataPlaneEvents",
    "DataPlaneUnavailableError",
    "create_data_plane",
    "resolve_data_plane",
]


class DataPlaneUnavailableError(RuntimeError):
    """`dataplane = fast` was asked for but the compiled extension cannot provide it."""


def _fast_data_plane_class() -> Callable[..., DataPlane] | None:
    try:
        from p2pvpn._fastpath import FastDataPlane
    except ImportError as error:
        logger.debug("compiled data plane unavailable: %s", error)
        return None
    return FastDataPlane


def resolve_data_plane(kind: str) -> Literal["fast", "pure"]:
    """The implementation that `kind` (`auto`, `fast` or `pure`) names in this build.

    Raises `DataPlaneUnavailableError` for `fast` without the compiled extension.
    """
    if kind not in ("auto", "fast", "pure"):
        raise ValueError(f"dataplane: unknown implementation {kind!r} (auto, fast or pure)")
    if kind == "pure":
        return "pure"
    if _fast_data_plane_class() is not None:
        return "fast"
    if kind == "fast":
        raise DataPlaneUnavailableError(
            "dataplane = fast, but the compiled extension p2pvpn._fastpath "
            "does not provide a data plane in this build"
        )
    return "pure"


def create_data_plane(
    kind: str,
    *,
    tun_fd: int,
    udp_socket: socket.socket,
    tun_ip: IPv4Address,
    key: bytes,
    events: DataPlaneEvents,
    relaying: bool = False,
    tun_offloads: tuple[str, ...] = (),
) -> DataPlane:
    """Build the data plane named by `kind` (`auto`, `fast` or `pure`).

    `relaying`: route FORWARDs for other addresses on (client relaying,
    PROTOCOL 5); without it they are dropped. `tun_offloads`: the offloads
    the TUN device took (`TunDevice.offloads`); not empty means every packet
    on `tun_fd` carries a virtio-net header, which only the fast plane reads,
    so the pure plane refuses it (ValueError).
    """
    if resolve_data_plane(kind) == "pure":
        if tun_offloads:
            raise ValueError(
                f"the pure data plane cannot use TUN offloads ({'+'.join(tun_offloads)}): "
                "open the TUN device without them"
            )
        return PureDataPlane(tun_fd, udp_socket, tun_ip, key, events, relaying=relaying)
    fast = _fast_data_plane_class()
    assert fast is not None  # resolve_data_plane said "fast"
    return fast(
        tun_fd, udp_socket, tun_ip, key, events, relaying=relaying, tun_offloads=tun_offloads
    )
