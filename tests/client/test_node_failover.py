"""A whole ClientNode through a server switch: TUN, address and a direct peer path survive.

Two in-process relays on loopback and two in-process client nodes, each with
both URLs. The TUN device is a datagram socket pair (the pure data plane
reads and writes it like a TUN fd), so no privileges are needed; everything
else (signaling, the data plane, the peer manager, UDP on loopback) is real.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.client import node as node_module
from p2pvpn.client import sysroutes
from p2pvpn.client.node import ClientNode
from p2pvpn.client.peer_manager import PeerManager
from p2pvpn.config import ClientConfig, StunServer
from p2pvpn.server import Relay, RelayServer, start_stun_responder
from tests.client.test_signaling import PASSWORD, ipv4_packet, run, wait_until

POOL = IPv4Network("10.9.0.0/24")


class FakeTun:
    """One end of a datagram socket pair stands in for the TUN fd; the test holds the other."""

    offloads: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.device, self.far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.far.setblocking(False)
        self.configured: list[IPv4Interface] = []
        self.closed = False

    def fileno(self) -> int:
        return self.device.fileno()

    def configure(self, address: IPv4Interface, mtu: int) -> None:
        self.configured.append(address)

    def add_route(self, network: IPv4Network) -> None:
        raise AssertionError("no sdwan route in this test")

    def remove_route(self, network: IPv4Network) -> None:
        raise AssertionError("no sdwan route in this test")

    def close(self) -> None:
        self.closed = True
        self.device.close()
        self.far.close()


@pytest.fixture
def opened_tuns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeTun]]:
    tuns: list[FakeTun] = []

    def open_tun(config: ClientConfig) -> FakeTun:
        tun = FakeTun()
        tuns.append(tun)
        return tun

    monkeypatch.setattr(node_module, "open_tun", open_tun)
    monkeypatch.setattr(node_module.TunDevice, "remove_stale", staticmethod(lambda name: None))
    yield tuns
    for tun in tuns:
        if not tun.closed:
            tun.close()


def client_config(
    name: str, urls: tuple[str, ...], state_root: Path, stun_port: int
) -> ClientConfig:
    return ClientConfig(
        websocket="",
        websockets=urls,
        password=PASSWORD,
        name=name,
        state_dir=state_root / name,
        dataplane="pure",
        offload="off",
        discovery=1,  # the peers find each other through the server at once
        localhost=IPv4Address("127.0.0.1"),  # and connect directly over loopback
        accept_routes="none",
        stun=StunServer("127.0.0.1", stun_port),  # direct paths need one, even on loopback
    )


@contextlib.asynccontextmanager
async def running(node: ClientNode) -> AsyncIterator["asyncio.Task[int]"]:
    task = asyncio.create_task(node.run())
    try:
        yield task
    finally:
        node._stopping.set()  # what SIGTERM does
        assert await asyncio.wait_for(task, 10) == 0


def peer_state(node: ClientNode, address: IPv4Address) -> str | None:
    for row in node.snapshot()["peers"]:
        if row["tun_ip"] == str(address):
            state: str = row["state"]
            return state
    return None


async def watch_peer(node: ClientNode, address: IPv4Address, states: set[str | None]) -> None:
    while True:
        states.add(peer_state(node, address))
        await asyncio.sleep(0.005)


async def received(far: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(far, 65536), timeout)


def test_tun_address_and_direct_peer_survive_a_server_switch(
    state_root: Path, opened_tuns: list[FakeTun]
) -> None:
    async def test() -> None:
        stun_transport, _ = await start_stun_responder("127.0.0.1", 0)
        stun_port = stun_transport.get_extra_info("sockname")[1]
        first = RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0)
        await first.start()
        second_relay = Relay(PASSWORD, dhcp=POOL)
        async with RelayServer(second_relay, "127.0.0.1", 0) as second:
            urls = (f"ws://127.0.0.1:{first.port}/", f"ws://127.0.0.1:{second.port}/")
            alice = ClientNode(client_config("fa", urls, state_root, stun_port))
            bob = ClientNode(client_config("fb", urls, state_root, stun_port))
            async with running(alice), running(bob):
                await wait_until(lambda: None not in (alice.address, bob.address), "logins")
                assert alice.address is not None and bob.address is not None
                a_ip, b_ip = alice.address.ip, bob.address.ip
                await wait_until(
                    lambda: (
                        peer_state(alice, b_ip) == "CONNECTED"
                        and peer_state(bob, a_ip) == "CONNECTED"
                    ),
                    "a direct path between them",
                    timeout=20,
                )
                a_tun, b_tun = opened_tuns
                before = (alice.tun, alice.data_plane, alice.peers, alice.address)

                states: set[str | None] = set()
                watcher = asyncio.create_task(watch_peer(alice, b_ip, states))
                relayed_before = alice.signaling.stats.relay_packets_out
                direct_before = alice.snapshot()["direct"]["packets_out"]

                await first.close()  # both lose the server they are logged in to
                # The direct path carries packets through the switch, not the relay.
                packet = ipv4_packet(str(a_ip), str(b_ip), b"during the switch")
                a_tun.far.send(packet)
                assert await received(b_tun.far) == packet
                assert alice.signaling.stats.relay_packets_out == relayed_before
                assert alice.snapshot()["direct"]["packets_out"] == direct_before + 1

                await wait_until(
                    lambda: alice.signaling.reconnects == 1 and bob.signaling.reconnects == 1,
                    "both logged in on the second server",
                    timeout=10,
                )
                await wait_until(
                    lambda: second_relay.stats()["sessions_authenticated"] == 2, "both sessions"
                )
                watcher.cancel()
                assert states == {"CONNECTED"}  # at every look during the switch
                assert (alice.tun, alice.data_plane, alice.peers, alice.address) == before
                assert len(opened_tuns) == 2  # no TUN device opened again
                assert a_tun.configured == [alice.address]  # and not reconfigured
                assert peer_state(alice, b_ip) == "CONNECTED"
                assert peer_state(bob, a_ip) == "CONNECTED"
                server = alice.snapshot()["server"]
                assert server["url"] == urls[1]
                assert (server["index"], server["servers"], server["switches"]) == (2, 2, 1)

                packet = ipv4_packet(str(b_ip), str(a_ip), b"after the switch")
                b_tun.far.send(packet)
                assert await received(a_tun.far) == packet
                assert alice.snapshot()["direct"]["packets_in"] >= 1
        stun_transport.close()

    run(test)


def test_the_sdwan_safety_check_covers_every_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """An accepted route must not capture any server the client may fail over to."""
    monkeypatch.setattr(sysroutes, "read_lan_facts", lambda interface: ((), ()))
    config = ClientConfig(websocket="", websockets=("ws://192.0.2.1/", "wss://192.0.2.2:8443/"))

    async def test() -> None:
        probe = sysroutes.UnderlayProbe(config, lambda: None, lambda: ())
        underlay = await probe.gather(IPv4Interface("10.9.0.5/24"))
        endpoints: Any = underlay.endpoints
        servers = {ip for ip, what in endpoints if what == "the server's address"}
        assert servers == {IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")}

    run(test)


def test_the_fake_tun_keeps_packet_boundaries() -> None:
    """The fake TUN keeps datagram boundaries, as a TUN fd does."""
    tun = FakeTun()
    try:
        tun.far.send(b"one")
        tun.far.send(b"two")
        assert os.read(tun.fileno(), 100) == b"one"
        assert os.read(tun.fileno(), 100) == b"two"
    finally:
        tun.close()


def test_the_lan_address_comes_from_a_server_that_is_routed() -> None:
    """The first URL may be unusable now (here: IPv6 only); a later one gives the address."""
    config = ClientConfig(websocket="", websockets=("ws://[::1]:9/", "ws://127.0.0.1:9/"))
    # Finding the LAN address uses neither the data plane nor the signaling.
    unused: Any = None
    manager = PeerManager(config, IPv4Interface("10.9.0.5/24"), unused, unused, local_port=40001)
    assert manager._detect_lan_address() == ("127.0.0.1", 40001)
