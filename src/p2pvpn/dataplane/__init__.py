"""Data planes: move IP packets between the TUN device and UDP peers.

`create_data_plane` picks the implementation named by the `dataplane`
option: `pure` (Python on the event loop), `fast` (the compiled
`p2pvpn._fastpath` workers) or `auto` (fast when the extension provides it).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address

from p2pvpn.dataplane.base import DataPlane, DataPlaneEvents
from p2pvpn.dataplane.pure import PureDataPlane

logger = logging.getLogger(__name__)

__all__ = ["DataPlane", "DataPlaneEvents", "DataPlaneUnavailableError", "create_data_plane"]


class DataPlaneUnavailableError(RuntimeError):
    """`dataplane = fast` was asked for but the compiled extension cannot provide it."""


def _fast_data_plane_class() -> Callable[..., DataPlane] | None:
    try:
        from p2pvpn._fastpath import FastDataPlane
    except ImportError as error:
        logger.debug("compiled data plane unavailable: %s", error)
        return None
    return FastDataPlane


def create_data_plane(
    kind: str,
    *,
    tun_fd: int,
    udp_socket: socket.socket,
    tun_ip: IPv4Address,
    key: bytes,
    events: DataPlaneEvents,
    relaying: bool = False,
) -> DataPlane:
    """Build the data plane named by `kind` (`auto`, `fast` or `pure`).

    `relaying`: route FORWARDs for other addresses on (client relaying,
    PROTOCOL 5); without it they are dropped.
    """
    if kind not in ("auto", "fast", "pure"):
        raise ValueError(f"dataplane: unknown implementation {kind!r} (auto, fast or pure)")
    fast = _fast_data_plane_class() if kind != "pure" else None
    if fast is None:
        if kind == "fast":
            raise DataPlaneUnavailableError(
                "dataplane = fast, but the compiled extension p2pvpn._fastpath "
                "does not provide a data plane in this build"
            )
        return PureDataPlane(tun_fd, udp_socket, tun_ip, key, events, relaying=relaying)
    return fast(tun_fd, udp_socket, tun_ip, key, events, relaying=relaying)
