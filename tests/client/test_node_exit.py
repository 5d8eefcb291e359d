"""The node's use of an exit node: marked sockets, the routing started after login,
activated and deactivated as the name table changes, closed on exit.

A real relay on loopback and a real node with a socket-pair TUN (as in
test_node_failover.py); the kernel side (ExitRouting's netlink) is replaced by a
recorder, so this test changes no routing of the machine it runs on.
"""

import asyncio
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.client import node as node_module
from p2pvpn.client import peer_manager as peer_manager_module
from p2pvpn.client.exit_routing import EXIT_MARK, SO_MARK, ExitRouting
from p2pvpn.client.node import ClientNode
from p2pvpn.client.peer_manager import PeerManager
from p2pvpn.config import ClientConfig
from p2pvpn.server import Relay, RelayServer
from tests.client.test_exit_routing import FakeNames
from tests.client.test_node_failover import FakeTun, opened_tuns, running  # noqa: F401
from tests.client.test_signaling import PASSWORD, run, wait_until

POOL = IPv4Network("10.9.0.0/24")
GW = IPv4Address("10.9.0.200")


class RecordedRouting:
    """Stands in for ExitRouting's kernel calls; what the node asked for, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls = self.calls

        async def start(routing: ExitRouting) -> None:
            calls.append(("start", routing.allow_lan))
            routing._started = True

        async def activate(
            routing: ExitRouting, address: IPv4Address, name: str, local: IPv4Interface
        ) -> None:
            calls.append(("activate", address, name, local))

        async def deactivate(routing: ExitRouting, reason: str = "") -> None:
            calls.append(("deactivate",))

        async def close(routing: ExitRouting) -> None:
            calls.append(("close",))

        for name, fake in (
            ("start", start),
            ("activate", activate),
            ("deactivate", deactivate),
            ("close", close),
        ):
            monkeypatch.setattr(ExitRouting, name, fake)
        monkeypatch.setattr(
            node_module, "remove_stale_exit_routing", lambda state_dir: calls.append(("stale",))
        )

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


def config(state_root: Path, url: str, exit_target: str) -> ClientConfig:
    return ClientConfig(
        websocket=url,
        password=PASSWORD,
        name="ex",
        state_dir=state_root / "ex",
        dataplane="pure",
        offload="off",
        accept_routes="none",
        exit=exit_target,
        exit_allow_lan=False,
    )


def mark_of(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_MARK)


def test_the_node_follows_the_exit_node(
    state_root: Path,
    opened_tuns: list[FakeTun],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routing = RecordedRouting()
    routing.install(monkeypatch)

    async def test() -> None:
        async with RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0) as relay:
            node = ClientNode(config(state_root, f"ws://127.0.0.1:{relay.port}/", "gw"))
            names = FakeNames()
            monkeypatch.setattr(ClientNode, "names", property(lambda node: names))
            assert mark_of(node.udp) == EXIT_MARK
            async with running(node):
                await wait_until(lambda: node.address is not None, "login")
                await wait_until(lambda: "start" in routing.kinds(), "the routing started")
                assert routing.calls[:2] == [("stale",), ("start", False)]
                ws = node.signaling._ws
                assert ws is not None
                assert mark_of(ws.transport.get_extra_info("socket")) == EXIT_MARK
                assert node.snapshot()["exit"]["state"] == "waiting"
                names.set(GW, "gw", exit_node=True)
                node._exit_on_table_change()  # what a NAMES message or announcement does
                await wait_until(lambda: "activate" in routing.kinds(), "activation")
                assert routing.calls[-1] == ("activate", GW, "gw", node.address)
                assert node.snapshot()["exit"]["state"] == "active"
                names.remove(GW)  # the tick notices without being told
                await wait_until(lambda: routing.kinds()[-1] == "deactivate", "fallback")
                assert node.snapshot()["exit"]["fallbacks"] == 1
            assert routing.kinds()[-1] == "close"

    run(test)


def test_without_exit_nothing_is_marked_or_routed(
    state_root: Path,
    opened_tuns: list[FakeTun],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routing = RecordedRouting()
    routing.install(monkeypatch)

    async def test() -> None:
        async with RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0) as relay:
            node = ClientNode(config(state_root, f"ws://127.0.0.1:{relay.port}/", ""))
            assert mark_of(node.udp) == 0
            async with running(node):
                await wait_until(lambda: node.address is not None, "login")
                ws = node.signaling._ws
                assert ws is not None
                assert mark_of(ws.transport.get_extra_info("socket")) == 0
                assert node.snapshot()["exit"]["state"] == "off"
        # A stale state file is cleaned up with or without `exit` now.
        assert routing.calls == [("stale",)]

    run(test)


def test_the_mark_needs_privileges_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real_socket = socket.socket

    class Unprivileged(real_socket):
        def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
            if option == SO_MARK:
                raise PermissionError(1, "Operation not permitted")
            super().setsockopt(level, option, value, *rest)

    monkeypatch.setattr(node_module.socket, "socket", Unprivileged)
    with pytest.raises(OSError, match="cannot mark the UDP socket"):
        node_module._open_udp_socket(0, EXIT_MARK)


def test_no_check_before_the_routing_is_started(state_root: Path) -> None:
    async def test() -> None:
        node = ClientNode(config(state_root, "ws://127.0.0.1:9/", "gw"))
        try:
            assert node.exit_routing is not None
            node.check_exit_soon()  # not started: nothing to judge yet
            assert node._exit_check is None
        finally:
            node.udp.close()

    asyncio.run(test())


def test_the_lan_address_probe_is_marked_with_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    marks: list[int] = []
    real_socket = socket.socket

    class Recording(real_socket):
        def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
            if option == SO_MARK:
                marks.append(value)
            super().setsockopt(level, option, value, *rest)

    monkeypatch.setattr(peer_manager_module.socket, "socket", Recording)
    for target, expected in (("gw", [EXIT_MARK]), ("", [])):
        marks.clear()
        config = ClientConfig(websocket="ws://127.0.0.1:9/", exit=target)
        unused: Any = None
        manager = PeerManager(config, IPv4Interface("10.9.0.5/24"), unused, unused, local_port=1)
        assert manager._detect_lan_address() == ("127.0.0.1", 1)
        assert marks == expected
