"""Whole ClientNodes with names (issue 16): the server's table, DNS, status, a departure.

The pattern of test_node_failover.py: an in-process relay on loopback, client
nodes with a socket pair for a TUN device. DNS listens on 127.0.0.1 (a free
port) instead of (tun ip, 53), which needs the address on a device and root.
"""

import asyncio
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from p2pvpn.client import signaling as signaling_module
from p2pvpn.client.node import ClientNode
from p2pvpn.config import ClientConfig
from p2pvpn.server import Relay, RelayServer
from tests.client.test_node_failover import FakeTun, opened_tuns, running
from tests.client.test_signaling import PASSWORD, run, wait_until

__all__ = ["opened_tuns"]  # the fixture, used by name

POOL = IPv4Network("10.9.0.0/24")


def named_node(name: str, hostname: str, url: str, state_root: Path) -> ClientNode:
    config = ClientConfig(
        websocket=url,
        password=PASSWORD,
        name=name,
        state_dir=state_root / name,
        dataplane="pure",
        offload="off",
        accept_routes="none",
        hostname=hostname,
    )
    node = ClientNode(config)
    node.naming.dns_port = 0
    node.naming.dns_host = lambda address: "127.0.0.1"
    node.naming.resolved.run_dir = state_root / "no-systemd-resolved"
    return node


def ask(node: ClientNode, name: str) -> dns.message.Message:
    dns_server = node.naming.dns
    assert dns_server is not None and dns_server.endpoint is not None
    host, port = dns_server.endpoint
    return dns.query.udp(dns.message.make_query(name, "A"), host, timeout=5, port=port)


@pytest.fixture
def tuns(opened_tuns: list[FakeTun]) -> Iterator[list[FakeTun]]:
    yield opened_tuns


def test_members_resolve_each_other_and_see_a_departure(
    state_root: Path, tuns: list[FakeTun]
) -> None:
    async def test() -> None:
        async with RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            alice = named_node("na", "Alice", url, state_root)
            bob = named_node("nb", "bob", url, state_root)
            carol = named_node("nc", "alice", url, state_root)  # a duplicate name
            async with running(alice), running(bob):
                await wait_until(lambda: None not in (alice.names, bob.names), "logins")
                assert alice.address is not None and bob.address is not None
                a_ip, b_ip = alice.address.ip, bob.address.ip
                assert alice.names is not None and bob.names is not None
                a_names, b_names = alice.names, bob.names
                await wait_until(
                    lambda: a_names.lookup("bob") == b_ip and b_names.lookup("alice") == a_ip,
                    "each other's names",
                )
                sources = {record.name: record.source for record in a_names.records()}
                assert sources == {"alice": "self", "bob": "server"}

                answer = await asyncio.to_thread(ask, alice, "BOB.vpn.")
                assert [item.to_text() for rrset in answer.answer for item in rrset] == [str(b_ip)]
                refused = await asyncio.to_thread(ask, alice, "example.com.")
                assert refused.rcode() == dns.rcode.REFUSED

                snapshot = alice.snapshot()
                assert snapshot["hostname"] == "alice" and snapshot["domain"] == "vpn"
                assert {row["name"] for row in snapshot["names"]} == {"alice", "bob"}
                assert snapshot["dns"]["listening"] == alice.naming.dns.listening  # type: ignore[union-attr]
                assert snapshot["dns"]["resolved"] == "not running"
                assert snapshot["dns"]["answered"] == 1 and snapshot["dns"]["refused"] == 1
                for row in snapshot["peers"]:
                    assert row["name"] == a_names.name_of(IPv4Address(row["tun_ip"]))

                async with running(carol):
                    await wait_until(lambda: carol.address is not None, "carol's login")
                    assert carol.address is not None
                    c_ip = carol.address.ip
                    suffixed = f"alice-{c_ip.packed[-1]}"
                    await wait_until(lambda: a_names.lookup(suffixed) == c_ip, "carol, suffixed")
                    assert carol.snapshot()["hostname"] == suffixed  # the server's final name
                # Carol left: gone from the others' tables within seconds.
                await wait_until(lambda: a_names.lookup(suffixed) is None, "carol gone", 10)
                assert a_names.lookup("alice") == a_ip
            assert alice.naming.dns is not None and alice.naming.dns.endpoint is None

    run(test)


class CandyHello:
    """What a member that never says HELLO sends instead: an unknown type, ignored."""

    def __init__(self, exit_node: bool = False) -> None:
        pass

    def encode(self) -> bytes:
        return b"\x60\x00\x00\x00"


def test_without_names_from_the_server_announcements_carry_them(
    state_root: Path, tuns: list[FakeTun], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Candy server sends no NAMES; the announcements it relays are enough."""
    monkeypatch.setattr(signaling_module, "Hello", CandyHello)

    async def test() -> None:
        async with RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            alice = named_node("ca", "alice", url, state_root)
            bob = named_node("cb", "bob", url, state_root)
            async with running(alice):
                await wait_until(lambda: alice.names is not None, "alice's login")
                a_names = alice.names
                assert a_names is not None
                async with running(bob):
                    await wait_until(lambda: bob.address is not None, "bob's login")
                    assert bob.address is not None and bob.names is not None
                    b_names = bob.names
                    # Bob's login announcement asks for replies: he learns alice at once.
                    await wait_until(
                        lambda: (
                            a_names.lookup("bob") is not None
                            and b_names.lookup("alice") is not None
                        ),
                        "each other's names",
                    )
                    assert not a_names.has_server_table
                    sources = {record.name: record.source for record in b_names.records()}
                    assert sources == {"alice": "peer", "bob": "self"}
                # Bob's leaving announcement went out before his connection closed.
                await wait_until(lambda: a_names.lookup("bob") is None, "bob gone", 5)

    run(test)
