"""Exit nodes end to end (issue 16): a member behind NAT sends its traffic out through another.

One topology for the module::

    inet 198.51.100.1 --- exitnode (exit_node = true, hostname "gateway")
                              |  wan 10.10.0.0/24 (the server 10.10.0.1)
                          member-nat --- home 192.0.2.1
                              |
                          member (exit = "gateway")

"inet" is reachable only through the exit node (its default route); "home"
only through the member's own NAT router (the router's default route). So a
ping to 198.51.100.1 from the member can only have gone through the tunnel
and out of the exit's masquerade, and a ping to 192.0.2.1 only out of the
member's own default route: while the exit is in use the second fails (all
traffic goes to the exit, whose internet does not know 192.0.2.1); when the
exit node is gone it works again.

The tests run in file order: the exit in use, the exit node SIGKILLed and
started again, then everything stopped (the member once SIGKILLed first) and
nothing of either side left in any namespace.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.netns import (
    Client,
    InternetHost,
    Namespace,
    NatSite,
    TestBed,
    VpnNetwork,
    nat_client,
    terminate_all,
    wait_connected,
)
from tests.integration.conftest import BED_KEY, open_testbed, require_tool
from tests.integration.faults_support import Record
from tests.integration.names_support import write_config

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("no_namespace_left_behind")]

EXIT_NAME = "gateway"
EXIT_IP, MEMBER_IP = "10.77.0.21", "10.77.0.22"
HOME_NETWORK = "192.0.2.0/24"
EXIT_MARK, EXIT_TABLE = "0x7076", "30326"
DEADLINE = 45.0
"""For anything that should take seconds: generous for a loaded 2-core machine."""


@dataclass
class ExitNet:
    vpn: VpnNetwork
    exit: Client
    member: Client
    site: NatSite
    internet: InternetHost
    home: InternetHost

    @property
    def bed(self) -> TestBed:
        return self.vpn.bed


@pytest.fixture(scope="module")
def exit_bed(
    no_namespace_left_behind: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestBed]:
    require_tool("nft", "nftables")
    with open_testbed(tmp_path_factory.mktemp("exit") / "logs") as bed:
        yield bed


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, exit_bed: TestBed) -> None:
    request.node.stash[BED_KEY] = exit_bed


@pytest.fixture(scope="module")
def net(exit_bed: TestBed) -> ExitNet:
    tmp = exit_bed.log_dir.parent
    vpn = VpnNetwork(exit_bed, tmp)
    vpn.start_server()
    exit_ns = vpn.client_namespace("exitnode")
    internet = exit_bed.internet_host(exit_ns)
    offer = write_config(tmp / "exit.toml", {"hostname": EXIT_NAME, "exit_node": True})
    exit_node = vpn.add_client("exit", "-c", str(offer), tun=f"{EXIT_IP}/24", ns=exit_ns, stun=True)
    use = write_config(tmp / "member.toml", {"hostname": "member", "exit": EXIT_NAME})
    member, site = nat_client(vpn, "member", MEMBER_IP, "port-preserving", "-c", str(use))
    home = exit_bed.internet_host(site.router, HOME_NETWORK, name="home")
    home.ns.add_route(site.lan.address(site.router).network, via=home.gateway_address)
    vpn.wait_for_tun(exit_node)
    vpn.wait_for_tun(member)
    wait_connected(vpn, member, exit_node, timeout=DEADLINE)
    return ExitNet(vpn, exit_node, member, site, internet, home)


def exit_state(client: Client) -> dict[str, Any]:
    return dict(client.status()["exit"])


def wait_exit_state(net: ExitNet, state: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = exit_state(net.member)
        return current if current["state"] == state else None

    return net.bed.wait_until(
        reached, timeout=DEADLINE, interval=0.2, message=f"the member's exit never got {state}"
    )


def route_device(ns: Namespace, address: str) -> str:
    """The device ``ip route get`` picks for ``address`` (unmarked traffic, as a program's)."""
    out = ns.ip("-4", "route", "get", address).stdout
    match = re.search(r"\bdev (\S+)", out)
    assert match is not None, out
    return match.group(1)


def pings(net: ExitNet, ns: Namespace, address: str, what: str) -> None:
    net.bed.wait_until(
        lambda: ns.ping(address, count=1, timeout=1.0),
        timeout=DEADLINE,
        message=f"no ping reply from {address} ({what})",
    )
    assert ns.ping(address, count=5, timeout=2.0), f"lost pings to {address} ({what})"


def server_session(client: Client) -> tuple[Any, Any, Any]:
    server = client.status()["server"]
    return server["state"], server["connected_since"], server["reconnects"]


def test_member_reaches_the_internet_through_the_exit_node(net: ExitNet) -> None:
    member, exit_node = net.member, net.exit
    session = server_session(member)
    assert session[0] == "connected"
    watched = time.monotonic()
    active = wait_exit_state(net, "active")
    assert (active["target"], active["address"]) == (EXIT_NAME, EXIT_IP)
    offer = exit_node.status()["exit_node"]
    assert offer["offering"] is True and offer["masquerade"], offer
    assert route_device(member.ns, str(net.internet.address)) == member.interface
    pings(net, member.ns, str(net.internet.address), "the internet behind the exit node")
    # Everything goes to the exit node, whose internet does not know the member's home.
    assert not member.ns.ping(str(net.home.address), count=1, timeout=1.0)
    # The underlay never entered the tunnel: same WebSocket, same direct path all along.
    assert server_session(member) == session
    row = member.peer(EXIT_IP)
    assert row is not None and row["state"] == "CONNECTED", row
    # Direct (the exit's WAN address is its "LAN" address too, reached through the NAT).
    assert str(row["path"]).split()[0] in ("direct", "lan"), row
    assert row["state_seconds"] >= time.monotonic() - watched - 1, row
    rules = member.ns.ip("-4", "rule", "show").stdout
    assert f"fwmark {EXIT_MARK}" in rules and f"lookup {EXIT_TABLE}" in rules, rules
    assert exit_node.ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"


def test_exit_node_killed_member_falls_back_and_returns(net: ExitNet, measured: Record) -> None:
    member, exit_node = net.member, net.exit
    wait_exit_state(net, "active")
    session = server_session(member)
    before = exit_state(member)["fallbacks"]
    assert exit_node.process is not None
    exit_node.process.send_signal(signal.SIGKILL)
    exit_node.process.wait(timeout=10)
    killed = time.monotonic()
    waiting = wait_exit_state(net, "waiting")
    assert waiting["fallbacks"] == before + 1, waiting
    net.bed.wait_until(
        lambda: member.ns.ping(str(net.home.address), count=1, timeout=1.0),
        timeout=DEADLINE,
        message="the member's own default route never came back",
    )
    measured("exit_fallback_s", time.monotonic() - killed)
    assert route_device(member.ns, str(net.internet.address)) != member.interface
    assert route_device(member.ns, str(net.home.address)) != member.interface
    assert not member.ns.ping(str(net.internet.address), count=1, timeout=1.0)
    assert server_session(member) == session  # its WebSocket never noticed

    # The exit node comes back: its SIGKILLed run's nftables table is replaced, not doubled.
    net.vpn.start_client(exit_node)
    back = time.monotonic()
    wait_exit_state(net, "active")
    pings(net, member.ns, str(net.internet.address), "the exit node started again")
    measured("exit_return_s", time.monotonic() - back)
    assert len(p2pvpn_tables(exit_node.ns)) == 1, p2pvpn_tables(exit_node.ns)
    assert server_session(member) == session


def p2pvpn_tables(ns: Namespace) -> list[str]:
    out = ns.run(["nft", "list", "tables"]).stdout
    return [line for line in out.splitlines() if "p2pvpn" in line]


def leftovers(ns: Namespace) -> list[str]:
    """What a p2pvpn client may have left in ``ns``: nft tables, rules, routes, TUN devices."""
    found = [f"nft: {table}" for table in p2pvpn_tables(ns)]
    for line in ns.ip("-4", "rule", "show").stdout.splitlines():
        if EXIT_MARK in line or f"lookup {EXIT_TABLE}" in line:
            found.append(f"rule: {line}")
    table = ns.ip("-4", "route", "show", "table", EXIT_TABLE, check=False).stdout
    found += [f"table {EXIT_TABLE}: {line}" for line in table.splitlines()]
    found += [f"device: {name}" for name in ns.interfaces() if name.startswith("p2pvpn")]
    return found


def test_nothing_left_behind_after_everything_stops(net: ExitNet) -> None:
    member, exit_node = net.member, net.exit
    # A member SIGKILLed with the exit in use leaves its rules; its next start removes them.
    wait_exit_state(net, "active")
    assert member.process is not None
    member.process.send_signal(signal.SIGKILL)
    member.process.wait(timeout=10)
    assert leftovers(member.ns), "a SIGKILLed member left nothing: the check would see nothing"
    net.vpn.start_client(member)
    net.vpn.wait_for_tun(member)
    wait_exit_state(net, "active")
    pings(net, member.ns, str(net.internet.address), "the member started again")

    clients = [member.process, exit_node.process]
    terminate_all([process for process in clients if process is not None])
    assert member.process is not None and member.process.returncode == 0
    assert exit_node.process is not None and exit_node.process.returncode == 0
    left = {ns.logical: leftovers(ns) for ns in net.bed.namespaces}
    assert not any(left.values()), left
    forwarding = exit_node.ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
    assert forwarding == "0", "the exit node did not restore ip_forward"
    assert not Path(member.state_root / "member" / "exit-routing.json").exists()
    assert not Path(exit_node.state_root / "exit" / "exit-node.json").exists()
