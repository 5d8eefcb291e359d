"""Fuzzing the client's WebSocket handling and its control-datagram handler.

* SignalingSession's receive path (``_receive``, exactly what its receive
  loop does per frame) with arbitrary, mutated and valid-looking server
  frames, dispatched the way ClientNode does into a real PeerManager; and
  once end to end through a real WebSocket.
* PeerManager with any interleaving of server messages, relayed packets,
  decrypted control datagrams from any source, STUN answers and ticks.

A fake data plane and a fake signaling sender check every call they get
(addresses in range, plaintexts that decode, messages that encode with our
own address as source), and after every event the data plane's peer and
route tables must agree with the peer manager's state: a CONNECTED peer has
its path installed, nothing else does.
"""

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve

from p2pvpn.client.signaling import SignalingSession
from p2pvpn.client.store import StateStore
from p2pvpn.dataplane.base import UdpAddress
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.peer import Delay, Heartbeat
from p2pvpn.wire.stun import encode_binding_response
from p2pvpn.wire.ws import (
    BROADCAST,
    Auth,
    Discovery,
    ExptTun,
    Forward,
    General,
    LanAddress,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    Vmac,
    WsMessage,
    decode_ws_message,
)
from tests.fuzz import (
    OWN,
    PEER_A,
    RUNS,
    STUN_ADDRESS,
    VECTOR_PASSWORD,
    Client,
    addresses,
    captured_frames,
    control_plaintexts,
    fuzz_settings,
    ip_packets,
    ipv4_packet,
    mutated,
)

PASSWORD = VECTOR_PASSWORD
POOL = ("192.168.202.1", "192.168.202.9", "192.168.202.10", "192.168.202.255", "172.30.1.1")
UDP_SOURCES: list[UdpAddress] = [
    ("192.168.1.9", 40000),  # LAN
    ("203.0.113.9", 50000),  # public
    ("203.0.113.10", 50001),
    ("0.0.0.0", 0),
    STUN_ADDRESS,
]


# -- strategies ---------------------------------------------------------------------------

_sources = addresses(*POOL)
_ports = st.integers(0, 0xFFFF)


@functools.cache
def _ws_messages() -> st.SearchStrategy[WsMessage]:
    """Server messages built from the codecs with random (mostly meaningful) fields."""
    to_us = st.one_of(st.just(OWN.ip), addresses(*POOL))
    return st.one_of(
        st.builds(Udp4Conn, _sources, to_us, addresses(), _ports),
        st.builds(LanAddress, _sources, to_us, addresses("192.168.1.9", "10.1.2.3"), _ports),
        st.builds(Discovery, _sources, st.one_of(st.just(BROADCAST), to_us)),
        st.builds(General, st.integers(1, 255), _ports, _sources, to_us, st.binary(max_size=32)),
        ip_packets(_sources, to_us).filter(lambda p: len(p) >= 20).map(Forward),
        st.builds(
            SystemRoutes,
            st.lists(
                st.builds(
                    SystemRoute,
                    addresses(),
                    st.integers(0, 32).map(lambda n: IPv4Network(f"0.0.0.0/{n}").netmask),
                    addresses(*POOL),
                ),
                max_size=3,
            ).map(tuple),
        ),
        st.builds(
            ExptTun.create,
            st.sampled_from([PASSWORD, "other"]),
            st.builds(lambda a, n: IPv4Interface((a, n)), addresses(), st.integers(0, 32)),
            st.integers(0, 2**40),
        ),
        st.builds(Auth.create, st.just(PASSWORD), addresses(), st.integers(0, 2**40)),
        st.builds(
            Vmac.create, st.just(PASSWORD), st.just("0123456789abcdef"), st.integers(0, 2**40)
        ),
    )


@functools.cache
def server_frames(captured: tuple[bytes, ...]) -> st.SearchStrategy[bytes | str]:
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, 255), st.binary(max_size=80)).map(lambda t: bytes([t[0]]) + t[1]),
        st.sampled_from(captured),
        st.sampled_from(captured).flatmap(mutated),
        _ws_messages().map(lambda message: message.encode()),
        _ws_messages().map(lambda message: message.encode()).flatmap(mutated),
        st.text(max_size=40),
    )


# -- SignalingSession: decode and dispatch -------------------------------------------------


@dataclass
class NodeLikeHandler:
    """The SignalingHandler: hands messages to the Client as ClientNode.on_message does.

    SignalingSession logs and swallows exceptions from on_message; this records
    them so the test sees them.
    """

    client: Client
    messages: list[WsMessage] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    async def on_login(self, address: IPv4Interface) -> None:
        pass

    def on_message(self, message: WsMessage) -> None:
        self.messages.append(message)
        try:
            self.client.on_message(message)
            self.client.check_tables()
        except BaseException as error:
            self.errors.append(error)
            raise

    def on_disconnected(self) -> None:
        pass


@functools.cache
def _frame_lists(captured: tuple[bytes, ...]) -> st.SearchStrategy[list[bytes | str]]:
    return st.lists(server_frames(captured), max_size=25)


def _expected_dispatch(frame: bytes | str) -> WsMessage | None:
    """What SignalingSession must hand on for ``frame`` (None: dropped)."""
    if isinstance(frame, str):
        return None
    try:
        return decode_ws_message(frame)
    except DecodeError:
        return None


def _run(max_examples: int, body: Callable[[st.DataObject], None]) -> None:
    fuzz_settings(max_examples)(given(st.data())(body))()


@pytest.mark.parametrize("max_examples", RUNS)
def test_signaling_receive_path_never_raises_and_counts_drops(
    max_examples: int,
    candy_vectors: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    captured = tuple(
        captured_frames(candy_vectors, direction="server_to_client")
        + captured_frames(candy_vectors, direction="client_to_server")
    )

    def body(data: st.DataObject) -> None:
        caplog.clear()
        client = Client.create()
        handler = NodeLikeHandler(client)
        session = SignalingSession(
            "ws://127.0.0.1:9/", PASSWORD, OWN, StateStore(tmp_path / "state"), handler
        )
        frames = data.draw(_frame_lists(captured), label="frames")
        for frame in frames:
            # What SignalingSession._receive_loop does with every frame it receives.
            session._receive(frame)
        assert handler.errors == []
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        expected = [_expected_dispatch(frame) for frame in frames]
        assert handler.messages == [message for message in expected if message is not None]
        stats = session.stats
        assert stats.frames_in == len(frames)
        malformed = [f for f in frames if isinstance(f, str) or _malformed(f)]
        assert stats.frames_malformed == len(malformed)
        forwards = [m for m in handler.messages if isinstance(m, Forward)]
        assert stats.relay_packets_in == len(forwards)

    _run(max_examples, body)


def _malformed(frame: bytes) -> bool:
    try:
        decode_ws_message(frame)
    except DecodeError:
        return True
    return False


# -- PeerManager: any sequence of events ---------------------------------------------------


_PUBLIC_IPS = addresses("198.51.100.7")
_TRANSACTION_IDS = st.binary(min_size=12, max_size=12)
_GARBAGE = st.binary(max_size=60)


@st.composite
def _stun_answer(draw: st.DrawFn, client: Client) -> list[tuple[bytes, UdpAddress]]:
    requests = client.data_plane.stun_requests
    public = (draw(_PUBLIC_IPS), draw(_ports))
    if requests and draw(st.booleans()):
        transaction_id = requests[draw(st.integers(0, len(requests) - 1))]
    else:
        transaction_id = draw(_TRANSACTION_IDS)
    answer = encode_binding_response(transaction_id, public)
    how = draw(st.sampled_from(["as is", "mutated", "garbage"]))
    if how == "mutated":
        return [(draw(mutated(answer)), STUN_ADDRESS)]
    datagram = answer if how == "as is" else draw(_GARBAGE)
    return [(datagram, STUN_ADDRESS)]


_EVENT_KINDS = st.sampled_from(
    ["ws", "ws", "ws", "control", "control", "control", "relay", "stun", "tick", "lan"]
)
_PACKET_LISTS = st.lists(ip_packets(_sources, _sources), max_size=3)
_TICKS = st.sampled_from([0.0, 0.5, 1.0, 1.0, 3.5, 11.0, 40.0])


@functools.cache
def _datagram_lists(
    captured: tuple[bytes, ...],
) -> st.SearchStrategy[list[tuple[bytes, UdpAddress]]]:
    return st.lists(
        st.tuples(control_plaintexts(captured), st.sampled_from(UDP_SOURCES)), max_size=4
    )


def _apply_event(data: st.DataObject, client: Client, captured: tuple[bytes, ...]) -> None:
    manager, clock = client.manager, client.clock
    kind = data.draw(_EVENT_KINDS, label="event")
    if kind == "ws":
        client.on_message(data.draw(_ws_messages(), label="message"))
    elif kind == "control":
        manager.on_control_datagrams(
            data.draw(_datagram_lists(captured), label="datagrams"), clock.now
        )
    elif kind == "relay":
        packets = data.draw(_PACKET_LISTS, label="packets")
        for packet in packets:
            manager.on_relay_in(packet, clock.now)
        manager.on_relay_out(packets)
    elif kind == "stun":
        manager.on_stun_datagrams(data.draw(_stun_answer(client), label="stun"), clock.now)
    elif kind == "tick":
        clock.now += data.draw(_TICKS)
        manager.tick(clock.now)
    else:
        manager.disable_lan()


@pytest.mark.parametrize("max_examples", RUNS)
def test_peer_manager_survives_any_sequence_of_events(
    max_examples: int, candy_vectors: dict[str, Any]
) -> None:
    captured = tuple(captured_frames(candy_vectors, direction="udp"))

    def body(data: st.DataObject) -> None:
        client = Client.create(route=data.draw(st.sampled_from([0, 5])))
        for _ in range(data.draw(st.integers(1, 30), label="events")):
            _apply_event(data, client, captured)
            client.check_tables()
        assert client.manager.snapshot(client.data_plane.stats(), client.clock.now) is not None

    _run(max_examples, body)


@pytest.mark.parametrize("max_examples", RUNS)
def test_peer_manager_ws_messages_from_a_connected_peer(
    max_examples: int, candy_vectors: dict[str, Any]
) -> None:
    """Start from a peer with a direct path, then throw server messages and datagrams at it."""
    captured = tuple(captured_frames(candy_vectors, direction="udp"))

    def body(data: st.DataObject) -> None:
        client = connected_client()
        for _ in range(data.draw(st.integers(1, 15), label="events")):
            _apply_event(data, client, captured)
            client.check_tables()

    _run(max_examples, body)


def connected_client() -> Client:
    """A client whose peer PEER_A is CONNECTED over ("203.0.113.9", 50000), with an rtt."""
    client = Client.create()
    manager, clock = client.manager, client.clock
    manager.on_discovery(Discovery(PEER_A, OWN.ip), clock.now)  # hint: PREPARING
    manager.on_control_datagrams(
        [(Heartbeat(PEER_A, OWN.ip, 0, True).encode(), UDP_SOURCES[1])], clock.now
    )
    assert client.data_plane.peers == {PEER_A: UDP_SOURCES[1]}
    probe = Delay(OWN.ip, PEER_A, int(client.clock.now * 1000) - 20)
    manager.on_control_datagrams([(probe.encode(), UDP_SOURCES[1])], clock.now)
    client.check_tables()
    return client


def test_connected_client_helper_reaches_connected() -> None:
    client = connected_client()
    (row,) = client.manager.snapshot(client.data_plane.stats(), client.clock.now)
    assert row["state"] == "CONNECTED"
    assert row["rtt_ms"] is not None


# -- a real WebSocket: a hostile server cannot break the session -----------------------------


def _garbage_frames(captured: list[bytes], count: int = 300) -> list[bytes | str]:
    """Seeded junk: random bytes, bit-flipped and cut captured frames, a random type
    byte with a short random body, and text frames."""
    rng = random.Random(7)
    garbage: list[bytes | str] = []
    for _ in range(count):
        choice = rng.randrange(4)
        if choice == 0:
            garbage.append(rng.randbytes(rng.randrange(0, 300)))
        elif choice == 1:
            frame = bytearray(rng.choice(captured))
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            garbage.append(bytes(frame[: rng.randrange(1, len(frame) + 1)]))
        elif choice == 2:
            garbage.append(bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 40)))
        else:
            garbage.append(rng.randbytes(rng.randrange(1, 30)).hex())
    return garbage


def test_hostile_server_frames_over_a_real_websocket(
    candy_vectors: dict[str, Any], tmp_path: Path
) -> None:
    """300 seeded garbage frames (binary and text) after login, then a real FORWARD."""
    garbage = _garbage_frames(captured_frames(candy_vectors, direction="server_to_client"))
    final = Forward(ipv4_packet(PEER_A, OWN.ip, b"still alive")).encode()

    async def server_side(ws: ServerConnection) -> None:
        while True:
            message = decode_ws_message(await ws.recv())  # type: ignore[arg-type]
            if isinstance(message, Auth):
                break
        for frame in garbage:
            await ws.send(frame)
        await ws.send(final)
        await ws.wait_closed()

    async def scenario() -> None:
        client = await Client.create_async()
        handler = NodeLikeHandler(client)
        async with serve(server_side, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            session = SignalingSession(
                f"ws://127.0.0.1:{port}/",
                PASSWORD,
                OWN,
                StateStore(tmp_path / "state"),
                handler,
                reconnect_initial=5.0,
            )
            task = asyncio.create_task(session.run())
            deadline = asyncio.get_running_loop().time() + 10
            while not any(isinstance(m, Forward) and m.encode() == final for m in handler.messages):
                assert asyncio.get_running_loop().time() < deadline, "final FORWARD not seen"
                assert not task.done(), task
                await asyncio.sleep(0.01)
            assert session.state == "connected"
            assert session.reconnects == 0
            assert session.stats.frames_in == len(garbage) + 1
            expected_malformed = sum(1 for f in garbage if isinstance(f, str) or _malformed(f))
            assert session.stats.frames_malformed == expected_malformed
            assert handler.errors == []
            await session.close()
            await task
        assert client.data_plane.tun[-1] == final[1:]

    asyncio.run(asyncio.wait_for(scenario(), 30))
