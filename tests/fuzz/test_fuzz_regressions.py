"""Bugs the fuzzers and the relay load benchmark (bench/load) found, each pinned by
the smallest input that showed it."""

import asyncio
import contextlib
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from p2pvpn.server.limits import ServerLimits
from p2pvpn.server.relay import Relay
from p2pvpn.server.ws import RelayServer
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.peer import Heartbeat
from p2pvpn.wire.ws import BROADCAST, Discovery, LanAddress, Udp4Conn
from tests.fuzz import OWN, Client
from tests.server import (
    NOW,
    PASSWORD,
    VMAC_A,
    FakeSession,
    auth_frame,
    expttun_frame,
    feed,
    forward,
    login,
    vmac_frame,
    wait_until,
)


def test_same_second_expttun_with_and_without_vmac_is_no_internal_error() -> None:
    """The replay cache compared its keys on equal expiries: (EXPTTUN, None, hash) against
    (EXPTTUN, "vmac", hash) raised TypeError, closing a legitimate client with 1011.

    Both requests carry the same hash (it covers only the timestamp), so any two
    clients asking in the same second, one of them without a VMAC first, hit it.
    """
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    without_vmac, with_vmac = FakeSession(), FakeSession()
    feed(relay, without_vmac, expttun_frame(), NOW)
    feed(relay, with_vmac, vmac_frame(VMAC_A), NOW)
    feed(relay, with_vmac, expttun_frame(), NOW)
    assert relay.stats()["internal_errors"] == 0
    assert without_vmac.closes == with_vmac.closes == []
    assert len(without_vmac.sent) == len(with_vmac.sent) == 1  # both got a grant
    # The cache is still a valid heap: entries expire, in order, after the window.
    feed(relay, FakeSession(), vmac_frame(VMAC_A, NOW + 400), NOW + 400)
    assert relay.stats()["replay_cache_entries"] == 1


def test_a_rejected_client_is_not_read_any_further() -> None:
    """After the relay closed a client, it went on reading and dispatching everything
    that client sent until the closing handshake ended (up to websockets' close
    timeout, 10 s). A hostile client that keeps sending after its rejection without
    answering the close made the server do the work of a full-speed client: in the
    load benchmark's garbage phase, two thirds of the frames the server handled
    came from connections it had already closed.
    """

    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            ws = await connect(f"ws://127.0.0.1:{server.port}/", compression=None)
            await ws.send(auth_frame("10.0.0.1", now=int(time.time())))
            junk = forward("10.0.0.1", "10.0.0.99")  # unknown destination: dropped
            await ws.send(b"\x05\x0a\x00\x00\x63" + bytes(4))  # spoofed DISCOVERY: 4005
            for _ in range(2000):
                with contextlib.suppress(ConnectionClosed):
                    # Writing straight to the transport, as a client that ignores the
                    # close frame would; websockets' own send() stops after the close.
                    ws.protocol.send_binary(junk)
                    ws.send_data()
            await wait_until(lambda: relay.stats()["connections_open"] == 0, timeout=15)
            stats = relay.stats()
            assert stats["rejections"] == {"PROTOCOL_VIOLATION": 1}
            # A bounded number of frames that were already in flight, not 2000.
            assert stats["drops"].get("after_close", 0) <= 64, stats["drops"]
            # The server gave up on the closing handshake: the client sees our
            # close frame, or the reset if that arrived before it read the frame.
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code in (CloseCode.PROTOCOL_VIOLATION, 1006)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_flooding_connection_lets_the_other_connections_run() -> None:
    """websockets' recv() does not yield while frames are queued, so the relay's read
    loop handled a flooding client's whole backlog (up to thousands of small frames
    per socket read) before any other connection's reader or writer got a turn.
    """

    class Backlog:
        """Frames already received: __anext__ returns without suspending, like recv()."""

        def __init__(self, frames: list[bytes]) -> None:
            self._frames = frames

        def __aiter__(self) -> "Backlog":
            return self

        async def __anext__(self) -> bytes:
            if not self._frames:
                raise StopAsyncIteration
            return self._frames.pop()

    async def scenario() -> None:
        relay = Relay(PASSWORD)
        flooder = login(relay, "10.0.0.1")
        backlog = Backlog([forward("10.0.0.1", "10.0.0.99")] * 1000)  # dropped, not closed
        # No junk_rate pause: this is about the batches of a reader that keeps going.
        server = RelayServer(relay, "127.0.0.1", 0, limits=ServerLimits(junk_rate=1_000_000))
        handled_when_others_ran: list[int] = []

        async def another_connection() -> None:
            handled_when_others_ran.append(relay.stats()["frames_received"])

        reader = asyncio.create_task(server._read_loop(backlog, flooder))  # type: ignore[arg-type]
        await asyncio.gather(reader, asyncio.create_task(another_connection()))
        assert relay.stats()["drops"] == {"unknown_destination": 1000}
        assert handled_when_others_ran[0] < 100, handled_when_others_ran

    asyncio.run(asyncio.wait_for(scenario(), 10))


# -- found in client code by the fuzzer, fixed in client/peer_manager.py ---------------------------

_UNUSABLE_SOURCES = ["192.168.202.1", "255.255.255.255", "0.0.0.0", "224.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize("source", _UNUSABLE_SOURCES)
def test_no_peer_for_our_own_or_an_unusable_address(source: str) -> None:
    """A Candy server relays UDP4CONN, GENERAL and DISCOVERY without checking src; a
    client must not start a direct connection with itself or with 255.255.255.255
    (a DISCOVERY from 255.255.255.255 to everyone is even answered with a DISCOVERY
    to 255.255.255.255, which every other client answers in turn).
    """
    client = Client.create()
    src = IPv4Address(source)
    client.manager.on_udp4conn(
        Udp4Conn(src, OWN.ip, IPv4Address("203.0.113.5"), 4000), client.clock.now
    )
    client.manager.on_lan_address(
        LanAddress(src, OWN.ip, IPv4Address("192.168.1.9"), 4000), client.clock.now
    )
    client.manager.on_discovery(Discovery(src, BROADCAST), client.clock.now)
    assert client.manager.snapshot(client.data_plane.stats(), client.clock.now) == []
    assert client.signaling.sent == []


def test_no_direct_path_to_ourselves() -> None:
    """The fuzzer's shortest way there: a UDP4CONN about ourselves, then any heartbeat
    that names our own address (our own, reflected, would do) with ack=1."""
    client = Client.create()
    client.manager.on_udp4conn(
        Udp4Conn(OWN.ip, OWN.ip, IPv4Address("0.0.0.0"), 0), client.clock.now
    )
    heartbeat = Heartbeat(OWN.ip, IPv4Address("0.0.0.0"), 0, True).encode()
    client.manager.on_control_datagrams([(heartbeat, ("192.168.1.9", 40000))], client.clock.now)
    assert OWN.ip not in client.data_plane.peers
