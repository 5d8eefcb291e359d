"""How the client opens its TUN device: offloads only for the fast data plane."""

from __future__ import annotations

from typing import Any

import pytest

from p2pvpn.client import node
from p2pvpn.config import ClientConfig, Dataplane, Offload
from p2pvpn.dataplane import DataPlaneUnavailableError


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The TunDevice.open calls made, instead of opening anything."""
    calls: list[tuple[Any, ...]] = []

    def fake_open(name: str, mtu: int, *, offload: bool = False) -> str:
        calls.append((name, mtu, offload))
        return "device"

    monkeypatch.setattr(node.TunDevice, "open", fake_open)
    return calls


@pytest.mark.parametrize(
    ("offload", "plane", "expected"),
    [
        ("auto", "fast", True),
        ("auto", "pure", False),
        ("off", "fast", False),
        ("off", "pure", False),
    ],
)
def test_offloads_only_for_the_fast_plane_and_auto(
    monkeypatch: pytest.MonkeyPatch,
    opened: list[tuple[Any, ...]],
    offload: Offload,
    plane: str,
    expected: bool,
) -> None:
    kinds: list[str] = []

    def resolve(kind: str) -> str:
        kinds.append(kind)
        return plane

    monkeypatch.setattr(node, "resolve_data_plane", resolve)
    config = ClientConfig(websocket="ws://h", name="lab", mtu=1300, offload=offload)
    assert node.open_tun(config) == "device"
    assert opened == [("p2pvpn-lab", 1300, expected)]
    assert kinds in ([], ["auto"])  # asked at most once, with the configured kind


@pytest.mark.parametrize("dataplane", ["auto", "pure"])
def test_pure_plane_gets_a_plain_tun(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]], dataplane: Dataplane
) -> None:
    if dataplane == "auto":  # a build without the compiled plane
        monkeypatch.setattr(node, "resolve_data_plane", lambda kind: "pure")
    node.open_tun(ClientConfig(websocket="ws://h", dataplane=dataplane))
    assert opened == [("p2pvpn0", 1400, False)]


def test_unavailable_fast_plane_fails_before_the_tun_is_opened(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]]
) -> None:
    monkeypatch.setattr("p2pvpn.dataplane._fast_data_plane_class", lambda: None)
    with pytest.raises(DataPlaneUnavailableError, match="dataplane = fast, but"):
        node.open_tun(ClientConfig(websocket="ws://h", dataplane="fast"))
    assert opened == []
