"""Using an exit node, the parts without a kernel: the choice (ExitChooser), the data
plane's entries and their order after the sdwan routes, the socket marks, status, metrics.
The kernel side is tests/integration/test_exit_routing.py."""

import asyncio
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from p2pvpn.client.exit_routing import (
    EXIT_MARK,
    SO_MARK,
    Change,
    ExitChooser,
    exit_entries,
)
from p2pvpn.client.names import NameTable
from p2pvpn.client.node import _open_udp_socket
from p2pvpn.client.signaling import _marked_connection
from p2pvpn.client.status import format_status
from p2pvpn.client.sysroutes import SystemRouteManager, data_plane_routes
from p2pvpn.metrics import ClientCollector
from p2pvpn.wire.ws import NameEntry, Names
from tests.client.test_sysroutes import FakeDataPlane, FakeTun, no_facts, run, wait_until

GW = IPv4Address("10.0.0.7")
OTHER = IPv4Address("10.0.0.8")
VPN = IPv4Network("10.0.0.0/24")


class FakeNames:
    """The NameTable's face that the choice uses (client/names.py)."""

    def __init__(self) -> None:
        self.generation = 0
        self.names: dict[IPv4Address, str] = {}
        self.exits: set[IPv4Address] = set()

    def exit_nodes(self) -> dict[IPv4Address, str]:
        return {address: self.names.get(address, "") for address in self.exits}

    def lookup(self, name: str) -> IPv4Address | None:
        for address, known in self.names.items():
            if known == name.lower():
                return address
        return None

    def set(self, address: IPv4Address, name: str, exit_node: bool) -> None:
        self.names[address] = name
        (self.exits.add if exit_node else self.exits.discard)(address)
        self.generation += 1

    def remove(self, address: IPv4Address) -> None:
        self.names.pop(address, None)
        self.exits.discard(address)
        self.generation += 1


def judge(chooser: ExitChooser, names: FakeNames, now: float = 0.0) -> Change | None:
    return chooser.decide(chooser.available(names.exit_nodes(), names.lookup), now)


def test_no_target_is_off_and_never_changes_anything() -> None:
    chooser, names = ExitChooser(""), FakeNames()
    names.set(GW, "gw", exit_node=True)
    assert chooser.state == "off"
    assert judge(chooser, names) is None
    assert chooser.snapshot() == {
        "target": None,
        "address": None,
        "state": "off",
        "since": None,
        "fallbacks": 0,
    }


def test_a_name_waits_until_the_table_knows_it_as_an_exit_node() -> None:
    chooser, names = ExitChooser("gw"), FakeNames()
    assert judge(chooser, names) is None
    assert chooser.state == "waiting"
    names.set(GW, "gw", exit_node=False)  # known, but it does not offer itself
    assert judge(chooser, names) is None
    names.set(GW, "gw", exit_node=True)
    assert judge(chooser, names, now=5.0) == Change("activate", (GW, "gw"))
    assert chooser.state == "active"
    assert judge(chooser, names, now=6.0) is None  # nothing new: no netlink call
    assert chooser.snapshot()["since"] == 5.0
    assert chooser.snapshot()["address"] == str(GW)


def test_a_departure_falls_back_and_a_return_uses_it_again() -> None:
    chooser, names = ExitChooser("gw"), FakeNames()
    names.set(GW, "gw", exit_node=True)
    assert judge(chooser, names) == Change("activate", (GW, "gw"))
    names.remove(GW)
    assert judge(chooser, names, now=10.0) == Change("deactivate", (GW, "gw"))
    assert (chooser.state, chooser.fallbacks, chooser.since) == ("waiting", 1, 10.0)
    assert judge(chooser, names) is None  # counted once
    names.set(GW, "gw", exit_node=True)
    assert judge(chooser, names) == Change("activate", (GW, "gw"))
    names.set(GW, "gw", exit_node=False)  # still there, no longer offering
    assert judge(chooser, names) == Change("deactivate", (GW, "gw"))
    assert chooser.fallbacks == 2


def test_a_name_that_moves_to_another_address_is_followed() -> None:
    chooser, names = ExitChooser("gw"), FakeNames()
    names.set(GW, "gw", exit_node=True)
    judge(chooser, names)
    names.remove(GW)
    names.set(OTHER, "gw", exit_node=True)
    assert judge(chooser, names) == Change("activate", (OTHER, "gw"))
    assert chooser.fallbacks == 0


def test_a_new_name_of_the_member_in_use_changes_no_route() -> None:
    chooser, names = ExitChooser(str(GW)), FakeNames()
    names.set(GW, "gw", exit_node=True)
    assert judge(chooser, names) == Change("activate", (GW, "gw"))
    names.set(GW, "gw-7", exit_node=True)
    assert judge(chooser, names) is None
    assert chooser.active == (GW, "gw-7")


def test_an_address_target_needs_the_member_to_offer_exit() -> None:
    chooser, names = ExitChooser(str(GW)), FakeNames()
    names.set(OTHER, "other", exit_node=True)
    assert judge(chooser, names) is None
    names.set(GW, "home", exit_node=True)
    assert judge(chooser, names) == Change("activate", (GW, "home"))
    # A member that offers exit but has no name yet is shown by its address.
    unnamed = ExitChooser(str(OTHER))
    assert unnamed.available({OTHER: ""}, lambda name: None) == (OTHER, str(OTHER))


def test_a_failed_activation_is_tried_again() -> None:
    chooser, names = ExitChooser("gw"), FakeNames()
    names.set(GW, "gw", exit_node=True)
    assert judge(chooser, names) is not None
    chooser.forget()
    assert judge(chooser, names) == Change("activate", (GW, "gw"))


def test_exit_entries_cover_everything_but_the_vpn_network() -> None:
    entries = exit_entries(GW, VPN)
    assert all(nexthop == GW for _, nexthop in entries)
    assert sum(network.num_addresses for network, _ in entries) == 2**32 - VPN.num_addresses
    assert not any(network.overlaps(VPN) for network, _ in entries)


def test_sdwan_routes_come_first_then_exit_entries_longest_prefix_first() -> None:
    sdwan = {
        IPv4Network("192.168.0.0/16"): OTHER,
        IPv4Network("192.168.5.0/24"): OTHER,
    }
    exits = [(IPv4Network("0.0.0.0/1"), GW), (IPv4Network("10.0.1.0/24"), GW)]
    assert data_plane_routes(sdwan, exits) == [
        (IPv4Network("192.168.5.0/24"), OTHER),
        (IPv4Network("192.168.0.0/16"), OTHER),
        (IPv4Network("10.0.1.0/24"), GW),
        (IPv4Network("0.0.0.0/1"), GW),
    ]


def test_the_route_manager_gives_the_data_plane_both_kinds() -> None:
    async def test() -> None:
        manager = SystemRouteManager("all", no_facts, settle_seconds=0.1)
        tun, plane = FakeTun(), FakeDataPlane()
        manager.set_exit_routes(exit_entries(GW, VPN))  # before attach: kept for it
        manager.start_set()
        manager.offer([(IPv4Network("192.168.7.0/24"), OTHER)])
        await manager.attach(tun, plane, IPv4Interface("10.0.0.2/24"), None)  # type: ignore[arg-type]
        await wait_until(lambda: len(plane.sysroutes) == 25, "sdwan and exit entries")
        assert plane.sysroutes[0] == (IPv4Network("192.168.7.0/24"), OTHER)
        assert plane.sysroutes[1:] == sorted(
            exit_entries(GW, VPN), key=lambda entry: -entry[0].prefixlen
        )
        assert tun.routes == {IPv4Network("192.168.7.0/24")}  # no kernel route for exits
        manager.set_exit_routes([])
        assert plane.sysroutes == [(IPv4Network("192.168.7.0/24"), OTHER)]
        await manager.close()

    run(test)


def test_the_udp_socket_carries_the_mark_only_with_exit() -> None:
    marked, plain = _open_udp_socket(0, EXIT_MARK), _open_udp_socket(0)
    try:
        assert marked.getsockopt(socket.SOL_SOCKET, SO_MARK) == EXIT_MARK
        assert plain.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
    finally:
        marked.close()
        plain.close()


def test_the_websocket_connection_is_marked_before_it_connects() -> None:
    async def test() -> None:
        accepted: list[tuple[str, int]] = []

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer.get_extra_info("peername"))
            writer.close()

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = await _marked_connection(f"ws://127.0.0.1:{port}/", EXIT_MARK)
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == EXIT_MARK
            assert sock.getpeername() == ("127.0.0.1", port)
            assert not sock.getblocking()
        finally:
            sock.close()
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):  # nobody listens there any more
            await _marked_connection(f"ws://127.0.0.1:{port}/", EXIT_MARK)

    run(test)


def snapshot_with(exit_use: dict[str, object]) -> dict[str, object]:
    return {"name": "", "interface": "p2pvpn0", "exit": exit_use}


@pytest.mark.parametrize(
    ("exit_use", "expected"),
    [
        (
            {"target": "gw", "address": "10.0.0.7", "state": "active", "since": 40.0},
            "exit: gw (10.0.0.7), all traffic through it (since 1m00s ago)",
        ),
        (
            {"target": "gw", "address": None, "state": "waiting", "since": 90, "fallbacks": 2},
            "exit: gw not available: this machine's default route (since 10s ago), 2 fallbacks",
        ),
    ],
)
def test_status_shows_the_exit_node_in_use(exit_use: dict[str, object], expected: str) -> None:
    text = format_status(snapshot_with(exit_use), now=100.0)
    assert expected in text.splitlines()


def test_status_says_nothing_without_exit() -> None:
    text = format_status(snapshot_with({"target": None, "state": "off"}), now=100.0)
    assert "exit" not in text


@pytest.mark.parametrize(("state", "active"), [("active", 1.0), ("waiting", 0.0), (None, 0.0)])
def test_exit_metrics(state: str | None, active: float) -> None:
    exit_use = {} if state is None else {"state": state, "fallbacks": 3}
    snapshot_fn: Callable[[], dict[str, object]] = lambda: {"exit": exit_use}  # noqa: E731
    families = {family.name: family for family in ClientCollector(snapshot_fn).collect()}
    assert families["p2pvpn_exit_active"].samples[0].value == active
    [fallbacks] = families["p2pvpn_exit_fallbacks"].samples
    assert fallbacks.name == "p2pvpn_exit_fallbacks_total"
    assert fallbacks.value == (3.0 if state is not None else 0.0)


def test_the_choice_reads_the_real_name_table() -> None:
    table = NameTable(IPv4Address("10.0.0.2"), "me", own_exit_node=False)
    chooser = ExitChooser("gw")
    entries = (NameEntry(GW, "gw", exit_node=True, p2pvpn=True),)
    table.on_server_names(Names(replace=True, entries=entries), 0.0)
    before = table.generation
    assert chooser.decide(chooser.available(table.exit_nodes(), table.lookup), 1.0) == Change(
        "activate", (GW, "gw")
    )
    # The member leaves: a removal entry (no name) in the server's table.
    table.on_server_names(Names(replace=False, entries=(NameEntry(GW, ""),)), 2.0)
    assert table.generation != before
    assert chooser.decide(chooser.available(table.exit_nodes(), table.lookup), 3.0) == Change(
        "deactivate", (GW, "gw")
    )
