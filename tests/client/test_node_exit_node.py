"""How the client node wires the exit-node offer: stale cleanup before the TUN,
the offer after login (again on a new address), withdrawal in cleanup, status."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.client import node
from p2pvpn.client.exit_node import NFT_MISSING, ExitNodeError, ExitNodeOffer
from p2pvpn.config import ClientConfig


class FakeOffer:
    def __init__(self) -> None:
        self.started: list[tuple[IPv4Network, Any]] = []
        self.closed = 0
        self.fail_start: ExitNodeError | None = None

    async def start(self, network: IPv4Network, data_plane: Any) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        self.started.append((network, data_plane))

    async def close(self) -> None:
        self.closed += 1

    def check_tools(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {"offering": bool(self.started), "masquerade": "10.0.0.0/24 out of eth0"}


def make_node(tmp_path: Path, *, exit_node: bool = True) -> node.ClientNode:
    config = ClientConfig(websocket="ws://h", name="lab", state_dir=tmp_path, exit_node=exit_node)
    return node.ClientNode(config)


def test_the_offer_follows_the_address_and_is_withdrawn(tmp_path: Path) -> None:
    client = make_node(tmp_path)
    assert isinstance(client.exit_node, ExitNodeOffer)
    assert client.exit_node.table == "p2pvpn_exit_p2pvpn_lab"
    offer = FakeOffer()
    client.exit_node = offer  # type: ignore[assignment]
    client.data_plane = plane = object()  # type: ignore[assignment]
    try:
        asyncio.run(client._offer_exit_node(IPv4Interface("10.0.0.5/24")))
        asyncio.run(client._offer_exit_node(IPv4Interface("10.0.1.5/24")))
        assert offer.started == [
            (IPv4Network("10.0.0.0/24"), plane),
            (IPv4Network("10.0.1.0/24"), plane),
        ]
        client.data_plane = None
        assert client.snapshot()["exit_node"]["offering"] is True
        asyncio.run(client._withdraw_exit_node())
        assert offer.closed == 1
    finally:
        client.data_plane = None
        client.udp.close()


def test_a_failed_offer_is_logged_and_the_client_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_node(tmp_path)
    offer = FakeOffer()
    offer.fail_start = ExitNodeError("nft -f - failed: Error: no nat support")
    client.exit_node = offer  # type: ignore[assignment]
    client.data_plane = object()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.ERROR, logger="p2pvpn.client.node"):
            asyncio.run(client._offer_exit_node(IPv4Interface("10.0.0.5/24")))
        assert "not offering this machine as an exit node: nft -f - failed" in caplog.text
    finally:
        client.data_plane = None
        client.udp.close()


def test_without_exit_node_the_status_says_not_offering(tmp_path: Path) -> None:
    client = make_node(tmp_path, exit_node=False)
    try:
        assert client.exit_node is None
        assert client.snapshot()["exit_node"] == {"offering": False, "masquerade": None}
    finally:
        client.udp.close()


@pytest.mark.parametrize("exit_node", [True, False])
def test_stale_cleanup_runs_before_the_tun_and_nft_missing_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_node: bool
) -> None:
    order: list[str] = []

    def remove_stale(state_dir: Path) -> bool:
        order.append(f"remove_stale {state_dir.name}")
        return False

    def check_tools(self: ExitNodeOffer) -> None:
        order.append("check_tools")
        raise ExitNodeError(NFT_MISSING)

    def remove_stale_tun(name: str) -> bool:
        order.append("tun")
        raise node.TunError("stop here", 1)

    monkeypatch.setattr(ExitNodeOffer, "remove_stale", staticmethod(remove_stale))
    monkeypatch.setattr(ExitNodeOffer, "check_tools", check_tools)
    monkeypatch.setattr(node.TunDevice, "remove_stale", staticmethod(remove_stale_tun))
    client = make_node(tmp_path / "state", exit_node=exit_node)
    assert asyncio.run(client.run()) == 1
    expected = ["remove_stale state", "check_tools"] if exit_node else ["remove_stale state", "tun"]
    assert order == expected
