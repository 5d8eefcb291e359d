"""Fuzzing the pure data plane's UDP datagram path and the control plane behind it.

A PureDataPlane with a fake TUN device (an AF_UNIX datagram socketpair) and a
UDP socket on 127.0.0.1 hands what it decrypts to a real PeerManager, exactly
as ClientNode wires them. Its peer PEER_A starts CONNECTED over loopback.
Datagrams go in through PureDataPlane._on_datagram, the per-datagram step of
its UDP reader, and control messages go up in one batch like the reader does.

* random datagrams and tampered (bit-flipped, cut, extended) sealed ones:
  dropped and counted, and nothing else changes: no TUN write, nothing for
  the control plane, peer states and every counter but the drops as before;
* validly sealed random plaintexts under the node's own key: every datagram
  has exactly one outcome (a counted drop, a TUN write, a relay or direct
  send, or one control message handed up) and the data plane's tables keep
  agreeing with the peer manager's states;
* the same through a started data plane and real UDP datagrams.
"""

import asyncio
import dataclasses
import functools
import random
import socket
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.dataplane.base import DataPlaneStats, DropReason, UdpAddress
from p2pvpn.dataplane.pure import PureDataPlane
from p2pvpn.wire.crypto import OVERHEAD, DatagramCipher, peer_key
from p2pvpn.wire.ipv4 import IPPROTO_IPIP, decapsulate_ipip
from p2pvpn.wire.peer import Heartbeat
from p2pvpn.wire.ws import Discovery
from tests.fuzz import (
    OWN,
    PEER_A,
    PEER_B,
    RUNS,
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

OWN_KEY = peer_key(VECTOR_PASSWORD, OWN.ip)
# Loopback only: whatever the control plane answers must not leave the machine.
PEER_A_PATH: UdpAddress = ("127.0.0.9", 50000)
SOURCES: list[UdpAddress] = [PEER_A_PATH, ("127.0.0.10", 50001), ("127.0.0.11", 0)]


class Events:
    """DataPlaneEvents as ClientNode implements them, into the peer manager."""

    def __init__(self) -> None:
        self.client: Client | None = None
        self.relay: list[bytes] = []

    def on_relay_packets(self, packets: list[bytes]) -> None:
        self.relay.extend(packets)

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        assert self.client is not None
        self.client.manager.on_control_datagrams(datagrams)

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        assert self.client is not None
        self.client.manager.on_stun_datagrams(datagrams)


class Node:
    """A started-or-not PureDataPlane, its peer manager, and the far ends of its sockets."""

    def __init__(self, client: Callable[[PureDataPlane], Client] | None = None) -> None:
        """``client`` builds the peer manager's Client around the plane (default: Client.create)."""
        self.kernel, self._tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (self.kernel, self._tun):
            end.setblocking(False)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.events = Events()
        self.plane = PureDataPlane(self._tun.fileno(), self.udp, OWN.ip, OWN_KEY, self.events)
        build = client if client is not None else (lambda plane: Client.create(inner=plane))
        self.client = build(self.plane)
        self.events.client = self.client
        self.own_cipher = DatagramCipher(OWN_KEY)

    def close(self) -> None:
        self.plane.close()
        for sock in (self.kernel, self._tun, self.udp):
            sock.close()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect_peer_a(self) -> None:
        """PEER_A: hint, then a sealed heartbeat with ack from its path -> CONNECTED."""
        self.client.manager.on_ws_message(Discovery(PEER_A, OWN.ip))
        heartbeat = Heartbeat(PEER_A, OWN.ip, 0, True).encode()
        self.receive(self.own_cipher.seal(heartbeat), PEER_A_PATH)
        assert self.client.data_plane.peers == {PEER_A: PEER_A_PATH}
        self.client.check_tables()

    def receive(
        self, datagram: bytes, source: UdpAddress
    ) -> tuple[list[bytes], list[tuple[bytes, UdpAddress]], DataPlaneStats]:
        """One datagram through the data plane's UDP path: (relay, control, stats).

        The stats are taken after the data plane's step, before the control
        plane handles what went up (its answers may count send failures).
        """
        relay: list[bytes] = []
        control: list[tuple[bytes, UdpAddress]] = []
        self.plane._on_datagram(datagram, source, relay, control)
        stats = self.plane.stats()
        if control:
            self.events.on_control_datagrams(control)
        if relay:
            self.events.on_relay_packets(relay)
        return relay, control, stats

    def delivered(self) -> list[bytes]:
        packets = []
        while True:
            try:
                packets.append(self.kernel.recv(70000))
            except BlockingIOError:
                return packets

    def state(self) -> tuple[Any, ...]:
        """Everything a datagram could change, except the drop counters."""
        stats = self.plane.stats()
        return (
            dataclasses.replace(stats, drops={}),
            self.client.manager.snapshot(stats),
            self.client.manager.route_snapshot(),
            dict(self.client.data_plane.peers),
            dict(self.client.data_plane.routes),
            len(self.client.data_plane.controls),
            len(self.events.relay),
        )


def total_drops(stats: DataPlaneStats) -> int:
    return sum(stats.drops.values())


def outcomes(before: DataPlaneStats, after: DataPlaneStats) -> int:
    """Drops, TUN writes and direct sends between two snapshots."""
    direct_before = sum(c.packets_out for c in before.peers.values())
    direct_after = sum(c.packets_out for c in after.peers.values())
    return (
        total_drops(after)
        - total_drops(before)
        + after.tun_packets_out
        - before.tun_packets_out
        + direct_after
        - direct_before
    )


# -- strategies ---------------------------------------------------------------------------

_destinations = st.one_of(
    st.sampled_from([OWN.ip, OWN.ip, PEER_A, PEER_B]), addresses(str(OWN.ip), str(PEER_A))
)
_sources_ip = addresses(str(PEER_A), str(PEER_B), str(OWN.ip))


@functools.cache
def plaintexts(captured: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    """What a holder of the password could seal for us: anything, mostly well formed."""
    forward = ip_packets(_sources_ip, _destinations).map(lambda packet: b"\x01" + packet)
    ipip_to_us = st.builds(
        lambda inner: b"\x01" + ipv4_packet(PEER_A, OWN.ip, inner, protocol=IPPROTO_IPIP),
        st.one_of(st.binary(max_size=40), ip_packets(_sources_ip, _destinations), st.just(b"")),
    )
    return st.one_of(
        control_plaintexts(captured),
        forward,
        forward,
        ipip_to_us,
        st.just(b""),
        st.just(b"\x01"),
        st.binary(max_size=80),
    )


_SOURCES = st.sampled_from(SOURCES)


def _run(max_examples: int, body: Callable[[st.DataObject], None]) -> None:
    fuzz_settings(max_examples)(given(st.data())(body))()


# -- the properties ---------------------------------------------------------------------


@pytest.mark.parametrize("max_examples", RUNS)
def test_random_and_tampered_datagrams_are_dropped_without_effect(
    max_examples: int, candy_vectors: dict[str, Any]
) -> None:
    captured = tuple(captured_frames(candy_vectors, direction="udp"))
    genuine = [bytes.fromhex(d["hex"]) for d in candy_vectors["udp_client_to_peer"]["datagrams"]]

    def body(data: st.DataObject) -> None:
        with Node() as node:
            node.connect_peer_a()
            node.delivered()
            for _ in range(data.draw(st.integers(1, 8), label="datagrams")):
                how = data.draw(st.sampled_from(["random", "tampered", "foreign"]), label="how")
                if how == "random":
                    datagram = data.draw(st.binary(max_size=120), label="random")
                elif how == "tampered":
                    plaintext = data.draw(plaintexts(captured), label="plaintext")
                    sealed = node.own_cipher.seal(plaintext)
                    datagram = data.draw(
                        mutated(sealed).filter(lambda d, s=sealed: d != s), label="tampered"
                    )
                else:
                    # Real Candy datagrams, sealed for another node's key.
                    datagram = data.draw(st.sampled_from(genuine), label="foreign")
                source = data.draw(_SOURCES, label="source")
                stats_before, state_before = node.plane.stats(), node.state()
                relay, control, stats_after = node.receive(datagram, source)
                assert relay == control == []
                assert node.delivered() == []
                assert node.state() == state_before, "a rejected datagram changed state"
                dropped = total_drops(stats_after) - total_drops(stats_before)
                assert dropped == 1
                reason = (
                    DropReason.TOO_SHORT if len(datagram) < OVERHEAD else DropReason.AUTHENTICATION
                )
                assert stats_after.drops[reason] == stats_before.drops.get(reason, 0) + 1
            node.client.check_tables()

    _run(max_examples, body)


@pytest.mark.parametrize("max_examples", RUNS)
def test_sealed_random_plaintexts_have_exactly_one_outcome(
    max_examples: int, candy_vectors: dict[str, Any]
) -> None:
    captured = tuple(captured_frames(candy_vectors, direction="udp"))

    def body(data: st.DataObject) -> None:
        with Node() as node:
            node.connect_peer_a()
            node.delivered()
            for _ in range(data.draw(st.integers(1, 10), label="datagrams")):
                plaintext = data.draw(plaintexts(captured), label="plaintext")
                source = data.draw(_SOURCES, label="source")
                before = node.plane.stats()
                relay, control, after = node.receive(node.own_cipher.seal(plaintext), source)
                assert outcomes(before, after) + len(relay) + len(control) == 1, plaintext.hex()
                delivered = node.delivered()
                check_delivery(plaintext, delivered, control, before=before, after=after)
                node.client.check_tables()
                if data.draw(st.integers(0, 4), label="tick") == 0:
                    node.client.clock.now += 1.0
                    node.client.manager.tick(node.client.clock.now)
                    node.client.check_tables()

    _run(max_examples, body)


def check_delivery(
    plaintext: bytes,
    delivered: list[bytes],
    control: list[tuple[bytes, UdpAddress]],
    *,
    before: DataPlaneStats,
    after: DataPlaneStats,
) -> None:
    """Where the plaintext went is where PROTOCOL 3.2 and 4 say it should go."""
    if not plaintext:
        assert after.drops[DropReason.MALFORMED] == before.drops.get(DropReason.MALFORMED, 0) + 1
        return
    if plaintext[0] != 1:
        assert [message for message, _ in control] == [plaintext]
        return
    packet = plaintext[1:]
    if len(packet) < 20 or packet[0] >> 4 != 4:
        assert after.drops[DropReason.NOT_IPV4] == before.drops.get(DropReason.NOT_IPV4, 0) + 1
        return
    if IPv4Address(packet[16:20]) != OWN.ip:
        assert delivered == []
        return  # relayed to the server or sent on to a direct peer; counted above
    if packet[9] == IPPROTO_IPIP:
        try:
            inner = decapsulate_ipip(packet)
        except ValueError:
            assert delivered == []
            return
        assert delivered == [inner]
    else:
        assert delivered == [packet]


def test_garbage_over_real_udp_is_counted_and_the_path_survives() -> None:
    """A started data plane under a burst of garbage still delivers the next real packet."""

    async def scenario() -> None:
        stun = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stun.bind(("127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        stun_address = stun.getsockname()
        clients: list[Client] = []

        def build(plane: PureDataPlane) -> Client:
            assert clients, "built before create_async finished"
            return clients[0]

        # The Client needs the plane, and Client.create_async an event loop: build it first
        # around a placeholder, then hand the real plane in through CheckingDataPlane.inner.
        clients.append(await Client.create_async(stun=stun_address))
        with Node(build) as node, stun, sender:
            node.client.data_plane.inner = node.plane
            node.plane.set_stun_server(stun_address)
            node.plane.start()
            target = node.udp.getsockname()
            rng = random.Random(11)
            cipher = node.own_cipher
            garbage = [rng.randbytes(rng.randrange(0, 200)) for _ in range(150)]
            sealed = cipher.seal(ipv4_packet(PEER_A, OWN.ip, b"x"))
            garbage += [sealed[:-1], sealed + b"\0", bytes([sealed[0] ^ 1]) + sealed[1:]]
            for datagram in garbage:
                sender.sendto(datagram, target)
            for datagram in garbage[:20]:  # from the STUN server's address: STUN, not sealed
                stun.sendto(datagram, target)
            good = ipv4_packet(PEER_A, OWN.ip, b"after the garbage")
            sender.sendto(cipher.seal(b"\x01" + good), target)
            received: list[bytes] = []
            deadline = asyncio.get_running_loop().time() + 5
            while good not in received:
                assert asyncio.get_running_loop().time() < deadline, "good packet not delivered"
                await asyncio.sleep(0.01)
                received += node.delivered()
            assert received == [good]
            stats = node.plane.stats()
            assert total_drops(stats) == len(garbage)
            assert node.events.relay == []
            assert node.client.data_plane.peers == {}
            assert node.client.signaling.sent == []

    asyncio.run(asyncio.wait_for(scenario(), 20))
