"""SystemRouteManager: the diff of route sets, settling, the data plane table, stopping."""

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest

from p2pvpn.client.route_policy import MAX_ACCEPTED_ROUTES, RouteEntry, Underlay
from p2pvpn.client.sysroutes import MAX_OFFERED, SystemRouteManager
from p2pvpn.client.tun import TunError
from p2pvpn.config import AcceptRoutes

ADDRESS = IPv4Interface("10.77.0.11/24")
PEER = IPv4Address("10.77.0.12")
SETTLE = 0.2
TIMEOUT = 10.0


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def entry(network: str, nexthop: IPv4Address = PEER) -> RouteEntry:
    return net(network), nexthop


class FakeTun:
    """Records netlink calls; the thread they run on; can block or fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, IPv4Network]] = []
        self.routes: set[IPv4Network] = set()
        self.threads: set[int] = set()
        self.release = threading.Event()
        self.release.set()
        self.refuse: set[IPv4Network] = set()

    def add_route(self, network: IPv4Network) -> None:
        self.threads.add(threading.get_ident())
        self.release.wait(TIMEOUT)
        if network in self.refuse:
            raise TunError(f"cannot add route {network}: File exists")
        self.calls.append(("add", network))
        self.routes.add(network)

    def remove_route(self, network: IPv4Network) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append(("remove", network))
        self.routes.discard(network)


class FakeDataPlane:
    def __init__(self) -> None:
        self.sysroutes: list[tuple[IPv4Network, IPv4Address]] = []

    def set_sysroutes(self, routes: list[tuple[IPv4Network, IPv4Address]]) -> None:
        self.sysroutes = list(routes)


async def no_facts(address: IPv4Interface) -> Underlay:
    return Underlay(address.network, address.ip)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), TIMEOUT)

    asyncio.run(bounded())


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def started(
    policy: AcceptRoutes = "safe",
) -> tuple[SystemRouteManager, FakeTun, FakeDataPlane]:
    manager = SystemRouteManager(policy, no_facts, settle_seconds=SETTLE)
    tun, plane = FakeTun(), FakeDataPlane()
    manager.start_set()
    await manager.attach(tun, plane, ADDRESS, None)  # type: ignore[arg-type]
    return manager, tun, plane


def test_routes_are_added_off_the_loop_and_the_data_plane_matches() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16"), entry("127.0.0.0/8")])
        await wait_until(lambda: plane.sysroutes == [(net("172.30.0.0/16"), PEER)], "the route")
        assert tun.routes == {net("172.30.0.0/16")}
        assert threading.get_ident() not in tun.threads
        accepted, refused = manager.snapshot()
        assert accepted == [{"network": "172.30.0.0/16", "nexthop": "10.77.0.12"}]
        assert refused[0]["network"] == "127.0.0.0/8"
        assert refused[0]["reason"].startswith("reaches into loopback")
        await manager.close()

    run(test)


def test_a_set_in_several_messages_is_added_as_it_comes() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16")])
        manager.offer([entry("172.31.0.0/16")])
        await wait_until(lambda: len(plane.sysroutes) == 2, "both routes")
        assert len(tun.routes) == 2
        await manager.close()

    run(test)


def test_a_reconnect_with_the_same_set_changes_nothing() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16"), entry("172.31.0.0/16")])
        await wait_until(lambda: len(plane.sysroutes) == 2, "both routes")
        await asyncio.sleep(SETTLE * 2)
        manager.start_set()  # a new login: the same set, in two messages
        manager.offer([entry("172.30.0.0/16")])
        await asyncio.sleep(SETTLE / 2)
        manager.offer([entry("172.31.0.0/16")])
        await asyncio.sleep(SETTLE * 2)
        assert tun.calls == [("add", net("172.30.0.0/16")), ("add", net("172.31.0.0/16"))]
        await manager.close()

    run(test)


def test_a_withdrawn_route_is_removed_once_the_new_set_settles() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16"), entry("172.31.0.0/16")])
        await wait_until(lambda: len(plane.sysroutes) == 2, "both routes")
        manager.start_set()
        manager.offer([entry("172.31.0.0/16"), entry("172.29.0.0/16", IPv4Address("10.77.0.13"))])
        await wait_until(lambda: net("172.30.0.0/16") not in dict(plane.sysroutes), "removal")
        assert tun.routes == {net("172.31.0.0/16"), net("172.29.0.0/16")}
        assert sorted(plane.sysroutes) == [
            (net("172.29.0.0/16"), IPv4Address("10.77.0.13")),
            (net("172.31.0.0/16"), PEER),
        ]
        await manager.close()

    run(test)


def test_a_login_without_routes_empties_the_set_after_the_settle_time() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16")])
        await wait_until(lambda: plane.sysroutes, "the route")
        manager.start_set()
        await wait_until(lambda: not plane.sysroutes, "the removal")
        assert not tun.routes
        assert manager.snapshot() == ([], [])
        await manager.close()

    run(test)


def test_a_new_next_hop_changes_only_the_data_plane_table() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16")])
        await wait_until(lambda: plane.sysroutes, "the route")
        manager.start_set()
        manager.offer([entry("172.30.0.0/16", IPv4Address("10.77.0.13"))])
        await wait_until(
            lambda: plane.sysroutes == [(net("172.30.0.0/16"), IPv4Address("10.77.0.13"))],
            "the new next hop",
        )
        await asyncio.sleep(SETTLE * 2)
        assert tun.calls == [("add", net("172.30.0.0/16"))]
        await manager.close()

    run(test)


def test_routes_via_ourselves_are_accepted_but_not_installed() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16", ADDRESS.ip), entry("172.31.0.0/16")])
        await wait_until(lambda: plane.sysroutes, "the route")
        assert tun.routes == {net("172.31.0.0/16")}
        assert plane.sysroutes == [(net("172.31.0.0/16"), PEER)]
        assert len(manager.snapshot()[0]) == 2
        await manager.close()

    run(test)


def test_a_route_the_kernel_refuses_is_shown_as_refused() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        tun.refuse.add(net("172.30.0.0/16"))
        manager.offer([entry("172.30.0.0/16"), entry("172.31.0.0/16")])
        await wait_until(lambda: plane.sysroutes, "the route")
        await wait_until(lambda: bool(manager.snapshot()[1]), "the refusal")
        accepted, refused = manager.snapshot()
        assert accepted == [{"network": "172.31.0.0/16", "nexthop": "10.77.0.12"}]
        assert refused[0]["reason"].startswith("the kernel refused it")
        assert plane.sysroutes == [(net("172.31.0.0/16"), PEER)]
        await manager.close()

    run(test)


def test_policy_none_installs_nothing() -> None:
    async def test() -> None:
        manager, tun, _ = await started("none")
        manager.offer([entry("172.30.0.0/16")])
        await wait_until(lambda: bool(manager.snapshot()[1]), "the refusal")
        assert tun.calls == []
        await manager.close()

    run(test)


def test_close_waits_for_a_change_in_flight_and_stops_the_worker() -> None:
    async def test() -> None:
        manager, tun, _ = await started()
        tun.release.clear()
        manager.offer([entry("172.30.0.0/16"), entry("172.31.0.0/16")])
        await wait_until(lambda: bool(tun.threads), "the netlink call")
        closing = asyncio.create_task(manager.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # the thread is still adding the route
        tun.release.set()
        await closing
        assert tun.calls == [("add", net("172.30.0.0/16"))]  # the second never started
        manager.offer([entry("172.29.0.0/16")])
        await asyncio.sleep(SETTLE * 2)
        assert tun.calls == [("add", net("172.30.0.0/16"))]

    run(test)


def test_a_new_packet_path_gets_every_accepted_route_again() -> None:
    async def test() -> None:
        manager, tun, plane = await started()
        manager.offer([entry("172.30.0.0/16")])
        await wait_until(lambda: plane.sysroutes, "the route")
        assert tun.routes == {net("172.30.0.0/16")}
        await manager.detach()
        new_tun, new_plane = FakeTun(), FakeDataPlane()
        await manager.attach(new_tun, new_plane, IPv4Interface("10.77.0.20/24"), None)  # type: ignore[arg-type]
        await wait_until(lambda: new_plane.sysroutes, "the route again")
        assert new_tun.routes == {net("172.30.0.0/16")}
        assert new_plane.sysroutes == [(net("172.30.0.0/16"), PEER)]
        await manager.close()

    run(test)


def test_a_route_that_comes_to_capture_a_peer_endpoint_is_removed_on_recheck() -> None:
    async def test() -> None:
        endpoints: list[tuple[IPv4Address, str]] = []

        async def facts(address: IPv4Interface) -> Underlay:
            return Underlay(address.network, address.ip, tuple(endpoints))

        manager = SystemRouteManager("safe", facts, settle_seconds=SETTLE)
        tun, plane = FakeTun(), FakeDataPlane()
        manager.start_set()
        await manager.attach(tun, plane, ADDRESS, None)  # type: ignore[arg-type]
        manager.offer([entry("203.0.113.0/24")])
        await wait_until(lambda: plane.sysroutes, "the route")
        await asyncio.sleep(SETTLE * 2)
        endpoints.append((IPv4Address("203.0.113.9"), "the peer endpoint"))
        manager.recheck()
        await wait_until(lambda: not plane.sysroutes, "the removal")
        assert not tun.routes
        assert manager.snapshot()[1][0]["reason"] == "would capture the peer endpoint 203.0.113.9"
        await manager.close()

    run(test)


def test_entries_offered_while_facts_are_gathered_are_judged_with_fresh_facts() -> None:
    async def test() -> None:
        gathering = asyncio.Event()
        release = asyncio.Event()
        endpoints: list[tuple[IPv4Address, str]] = []

        async def slow_facts(address: IPv4Interface) -> Underlay:
            known = tuple(endpoints)  # facts as they were when gathering began
            gathering.set()
            await release.wait()
            return Underlay(address.network, address.ip, known)

        manager = SystemRouteManager("safe", slow_facts, settle_seconds=SETTLE)
        tun, plane = FakeTun(), FakeDataPlane()
        manager.start_set()
        await manager.attach(tun, plane, ADDRESS, None)  # type: ignore[arg-type]
        await gathering.wait()  # the attach's round is gathering
        endpoints.append((IPv4Address("203.0.113.9"), "the peer endpoint"))
        manager.offer([entry("203.0.113.0/24"), entry("172.30.0.0/16")])
        release.set()
        await wait_until(lambda: tun.routes, "the good route")
        await asyncio.sleep(SETTLE)
        assert tun.calls == [("add", net("172.30.0.0/16"))]
        await manager.close()

    run(test)


def test_offers_beyond_the_limit_are_ignored_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        manager, tun, _ = await started()
        entries = [entry(f"172.{16 + i // 256}.{i % 256}.0/24") for i in range(MAX_OFFERED + 10)]
        for start in range(0, len(entries), 255):
            manager.offer(entries[start : start + 255])
        await wait_until(lambda: len(tun.routes) == MAX_ACCEPTED_ROUTES, "the capped routes")
        await manager.close()

    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.sysroutes"):
        run(test)
    assert caplog.text.count(f"over {MAX_OFFERED} sdwan routes offered") == 1
    assert caplog.text.count(f"more than {MAX_ACCEPTED_ROUTES} acceptable") == 1
