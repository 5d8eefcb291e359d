"""Which data plane `dataplane = auto | fast | pure` gives, and what each takes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from p2pvpn import dataplane
from p2pvpn.dataplane import (
    DataPlaneUnavailableError,
    create_data_plane,
    resolve_data_plane,
)
from p2pvpn.wire.crypto import peer_key
from tests.dataplane.conftest import Recorder, plane_kind

TUN_IP = IPv4Address("10.9.0.2")


@pytest.fixture
def without_fast_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane, "_fast_data_plane_class", lambda: None)


@pytest.fixture
def sockets() -> Iterator[tuple[int, socket.socket]]:
    """A fake TUN fd and a UDP socket on loopback."""
    kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        yield tun.fileno(), udp
    finally:
        for sock in (kernel, tun, udp):
            sock.close()


def test_pure_resolves_to_pure() -> None:
    assert resolve_data_plane("pure") == "pure"


@pytest.mark.fastpath
@pytest.mark.parametrize("kind", ["auto", "fast"])
def test_auto_and_fast_resolve_to_fast_when_built(kind: str) -> None:
    assert resolve_data_plane(kind) == "fast"


@pytest.mark.usefixtures("without_fast_plane")
def test_auto_resolves_to_pure_without_the_extension() -> None:
    assert resolve_data_plane("auto") == "pure"


@pytest.mark.usefixtures("without_fast_plane")
def test_fast_without_the_extension_is_unavailable() -> None:
    with pytest.raises(DataPlaneUnavailableError, match="dataplane = fast, but the compiled"):
        resolve_data_plane("fast")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="dataplane: unknown implementation 'quick'"):
        resolve_data_plane("quick")


def test_no_tun_offloads_by_default(backend: str, sockets: tuple[int, socket.socket]) -> None:
    tun_fd, udp = sockets
    plane = create_data_plane(
        plane_kind(backend),
        tun_fd=tun_fd,
        udp_socket=udp,
        tun_ip=TUN_IP,
        key=peer_key("selection", TUN_IP),
        events=Recorder(),
    )
    assert plane.implementation == plane_kind(backend)
    assert plane.tun_offloads == ()


@pytest.mark.fastpath
@pytest.mark.parametrize("offloads", [("csum", "tso4"), ("csum", "tso4", "uso4")])
def test_fast_plane_gets_the_tun_offloads(
    offloads: tuple[str, ...], sockets: tuple[int, socket.socket]
) -> None:
    tun_fd, udp = sockets
    plane = create_data_plane(
        "auto",
        tun_fd=tun_fd,
        udp_socket=udp,
        tun_ip=TUN_IP,
        key=peer_key("selection", TUN_IP),
        events=Recorder(),
        tun_offloads=offloads,
    )
    assert plane.implementation == "fast"
    assert plane.tun_offloads == offloads


@pytest.mark.parametrize("kind", ["pure", "auto"])
@pytest.mark.usefixtures("without_fast_plane")
def test_pure_plane_refuses_tun_offloads(kind: str, sockets: tuple[int, socket.socket]) -> None:
    tun_fd, udp = sockets
    with pytest.raises(ValueError, match=r"pure data plane cannot use TUN offloads \(csum\+tso4\)"):
        create_data_plane(
            kind,
            tun_fd=tun_fd,
            udp_socket=udp,
            tun_ip=TUN_IP,
            key=peer_key("selection", TUN_IP),
            events=Recorder(),
            tun_offloads=("csum", "tso4"),
        )
