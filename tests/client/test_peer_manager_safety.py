"""PeerManager on a hostile network: replayed heartbeats and echoes, forged ROUTE
adverts, floods that would grow its tables, and STUN taken only while asked for.

The data plane is a fake that records what it is told; datagrams "arrive" by
calling the manager's on_control_datagrams with a plaintext and a UDP source,
which is what a real data plane hands up after decrypting.
"""

import asyncio
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from p2pvpn.client import peer_manager
from p2pvpn.client.peer import PeerState
from p2pvpn.client.peer_manager import STUN_ANSWER_SECONDS, PeerManager
from p2pvpn.client.routing import MAX_ROUTES
from p2pvpn.config import ClientConfig, StunServer
from p2pvpn.dataplane.base import DataPlaneStats, UdpAddress
from p2pvpn.wire.peer import (
    ROUTE_DELETED,
    Delay,
    Heartbeat,
    PeerMessage,
    RouteAdvert,
    decode_peer_message,
)
from p2pvpn.wire.stun import decode_binding_request, encode_binding_response
from p2pvpn.wire.ws import Discovery
from tests.clock import Clock

OWN = IPv4Interface("10.77.0.1/24")
A = IPv4Address("10.77.0.2")
B = IPv4Address("10.77.0.3")
C = IPv4Address("10.77.0.4")
PATH_A: UdpAddress = ("198.51.100.7", 4000)
PATH_B: UdpAddress = ("198.51.100.8", 4000)
THIRD: UdpAddress = ("203.0.113.66", 6666)  # a host that captured our traffic
STUN: UdpAddress = ("127.0.0.1", 3478)


@dataclass
class FakeDataPlane:
    peers: dict[IPv4Address, UdpAddress] = field(default_factory=dict)
    set_peer_calls: list[tuple[IPv4Address, UdpAddress]] = field(default_factory=list)
    routes: dict[IPv4Address, IPv4Address] = field(default_factory=dict)
    controls: list[tuple[UdpAddress, PeerMessage]] = field(default_factory=list)
    stun_server_calls: list[UdpAddress | None] = field(default_factory=list)
    stun_requests: list[bytes] = field(default_factory=list)

    @property
    def stun_server(self) -> UdpAddress | None:
        return self.stun_server_calls[-1] if self.stun_server_calls else None

    def set_peer(self, tun_ip: IPv4Address, address: UdpAddress, key: bytes) -> None:
        self.peers[tun_ip] = address
        self.set_peer_calls.append((tun_ip, address))

    def drop_peer(self, tun_ip: IPv4Address) -> None:
        self.peers.pop(tun_ip, None)

    def set_route(self, destination: IPv4Address, next_hop: IPv4Address) -> None:
        self.routes[destination] = next_hop

    def drop_route(self, destination: IPv4Address) -> None:
        del self.routes[destination]

    def set_stun_server(self, address: UdpAddress | None) -> None:
        self.stun_server_calls.append(address)

    def send_control(self, address: UdpAddress, key: bytes, plaintext: bytes) -> None:
        self.controls.append((address, decode_peer_message(plaintext)))

    def send_stun(self, address: UdpAddress, data: bytes) -> None:
        assert address == STUN
        self.stun_requests.append(decode_binding_request(data))

    def stats(self) -> DataPlaneStats:
        return DataPlaneStats(implementation="fake")

    def delays_to(self, address: UdpAddress) -> list[Delay]:
        return [m for a, m in self.controls if a == address and isinstance(m, Delay)]

    def adverts_to(self, address: UdpAddress) -> list[RouteAdvert]:
        return [m for a, m in self.controls if a == address and isinstance(m, RouteAdvert)]


@dataclass
class FakeSignaling:
    sent: list[object] = field(default_factory=list)

    def send(self, message: object) -> bool:
        self.sent.append(message)
        return True


@dataclass
class Rig:
    manager: PeerManager
    plane: FakeDataPlane
    clock: Clock

    def receive(self, message: PeerMessage, source: UdpAddress) -> None:
        self.manager.on_control_datagrams([(message.encode(), source)], self.clock.now)

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.now += seconds
        self.manager.tick(self.clock.now)

    def connect(self, peer: IPv4Address, path: UdpAddress, rtt_ms: int = 20) -> None:
        """``peer`` CONNECTED over ``path``, with a measured rtt (so a direct route)."""
        self.manager.on_discovery(Discovery(peer, OWN.ip), self.clock.now)
        self.receive(Heartbeat(peer, OWN.ip, 0, True), path)
        assert self.plane.peers[peer] == path
        self.receive(Delay(OWN.ip, peer, int(self.clock.now * 1000) - rtt_ms), path)
        assert self.state(peer) is PeerState.CONNECTED

    def state(self, peer: IPv4Address) -> PeerState | None:
        rows = {row["tun_ip"]: row for row in self.manager.snapshot(None, self.clock.now)}
        row = rows.get(str(peer))
        return PeerState[row["state"]] if row else None


def config(*, route: int = 5, stun: bool = True) -> ClientConfig:
    return ClientConfig(
        websocket="ws://127.0.0.1:9/",
        password="test-password",
        stun=StunServer(*STUN) if stun else None,
        route=route,
        localhost=IPv4Address("192.168.1.5"),
        state_dir=Path("/nonexistent/p2pvpn-test"),
    )


def rig(*, route: int = 5) -> Rig:
    plane, clock = FakeDataPlane(), Clock()
    manager = PeerManager(config(route=route), OWN, plane, FakeSignaling(), local_port=40001)
    return Rig(manager, plane, clock)


def started_rig() -> Rig:
    """A rig whose STUN server is resolved (start() does it in a task)."""

    async def start() -> Rig:
        r = rig()
        r.manager.start()
        for _ in range(1000):
            if r.manager.stun_server is not None:
                break
            await asyncio.sleep(0.001)
        r.manager.close()
        return r

    r = asyncio.run(start())
    assert r.manager.stun_server == STUN
    return r


def packet(source: IPv4Address, destination: IPv4Address) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, source.packed, destination.packed
    )


# ------------------------------------------------------------- path challenge


def test_nat_rebinding_moves_the_path_within_two_ticks() -> None:
    r = rig()
    r.connect(A, PATH_A)
    rebound: UdpAddress = (PATH_A[0], PATH_A[1] + 1)
    for tick in range(1, 3):  # noqa: B007 (asserted after the loop)
        # The peer's NAT now maps it to a new port: heartbeats come from there ...
        r.receive(Heartbeat(A, OWN.ip, 0, True), rebound)
        r.tick()
        # ... and so does its echo of whatever DELAY we sent there.
        for probe in r.plane.delays_to(rebound):
            r.receive(probe, rebound)
        if r.plane.peers[A] == rebound:
            break
    assert tick == 1
    assert r.plane.set_peer_calls[-1] == (A, rebound)
    assert r.state(A) is PeerState.CONNECTED
    (row,) = r.manager.snapshot(None, r.clock.now)
    assert row["path"] == f"direct {rebound[0]}:{rebound[1]}"
    # Heartbeats now go to the new mapping.
    r.tick()
    assert isinstance(r.plane.controls[-1][1], Heartbeat)
    assert r.plane.controls[-1][0] == rebound


def test_replayed_heartbeats_from_a_third_host_do_not_move_or_keep_the_path() -> None:
    r = rig()
    r.connect(A, PATH_A)
    for _ in range(4):  # the real peer went silent; a third host replays, 10 a second
        for _ in range(10):
            r.receive(Heartbeat(A, OWN.ip, 0, True), THIRD)
            r.clock.now += 0.1
        r.manager.tick(r.clock.now)
    assert all(call == (A, PATH_A) for call in r.plane.set_peer_calls)
    # One challenge a second at most, none answered: the path timed out.
    assert 3 <= len(r.plane.delays_to(THIRD)) <= 4
    assert A not in r.plane.peers
    assert r.state(A) is PeerState.INIT


def test_wrong_echoes_do_not_move_the_path() -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.receive(Heartbeat(A, OWN.ip, 0, True), THIRD)
    (challenge,) = r.plane.delays_to(THIRD)
    stale = Delay(OWN.ip, A, challenge.timestamp_ms - 5000)
    r.receive(stale, THIRD)  # an old echo, replayed from the candidate
    r.receive(challenge, PATH_B)  # the right echo from the wrong address
    assert r.plane.peers[A] == PATH_A
    assert r.manager.drops["delay_echo_source"] == 2


def test_old_echo_replayed_from_elsewhere_measures_nothing() -> None:
    # Its rtt would be huge: a deletion of every route through the peer.
    r = rig()
    r.connect(A, PATH_A)
    r.connect(B, PATH_B)
    r.receive(RouteAdvert(C, A, 10), PATH_A)
    assert r.plane.routes == {C: A}
    r.receive(Delay(OWN.ip, A, int(r.clock.now * 1000) - 60_000), THIRD)
    assert r.plane.routes == {C: A}
    assert r.manager.drops["delay_echo_source"] == 1


def test_echoes_go_anywhere_but_the_route_table_only_to_the_path() -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.connect(B, PATH_B)
    probe = Delay(B, OWN.ip, 12345)
    r.receive(probe, THIRD)  # a replayed probe: one echo back, nothing more
    assert [m for a, m in r.plane.controls if a == THIRD] == [probe]
    r.receive(probe, PATH_B)
    assert r.plane.delays_to(PATH_B)[-1] == probe
    assert r.plane.adverts_to(PATH_B)  # the table follows the echo


def test_probe_from_outside_the_vpn_is_not_echoed() -> None:
    r = rig()
    r.receive(Delay(IPv4Address("8.8.8.8"), OWN.ip, 1), THIRD)
    assert r.plane.controls == []
    assert r.manager.drops["delay_bad_source"] == 1


# ---------------------------------------------------------------- ROUTE adverts


def test_advert_from_its_next_hop_on_its_path_is_taken() -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.receive(RouteAdvert(C, A, 10), PATH_A)
    assert r.plane.routes == {C: A}
    assert r.manager.drops == {}


@pytest.mark.parametrize(
    ("advert", "source"),
    [
        (RouteAdvert(C, A, 10), THIRD),  # replayed from elsewhere
        (RouteAdvert(C, B, 10), PATH_A),  # A claims to be B
        (RouteAdvert(C, A, 10), PATH_B),
        (RouteAdvert(C, IPv4Address("10.77.0.99"), 10), PATH_A),  # no such peer
    ],
)
def test_advert_not_from_its_next_hop_is_dropped(advert: RouteAdvert, source: UdpAddress) -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.connect(B, PATH_B)
    r.receive(advert, source)
    assert r.plane.routes == {}
    assert r.manager.drops == {"route_advert_sender": 1}


def test_forged_deletion_is_dropped() -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.receive(RouteAdvert(C, A, 10), PATH_A)
    r.receive(RouteAdvert(C, A, ROUTE_DELETED), THIRD)
    assert r.plane.routes == {C: A}
    assert r.manager.drops == {"route_advert_sender": 1}


def test_advert_from_a_peer_that_is_not_connected_is_dropped() -> None:
    r = rig()
    r.manager.on_discovery(Discovery(A, OWN.ip), r.clock.now)  # PREPARING, no path
    r.receive(RouteAdvert(C, A, 10), PATH_A)
    assert r.manager.drops == {"route_advert_sender": 1}


@pytest.mark.parametrize(
    "dst", ["10.77.0.0", "10.77.0.255", "10.78.0.4", "8.8.8.8", "224.0.0.1", "255.255.255.255"]
)
def test_advert_outside_the_vpn_network_is_dropped(dst: str) -> None:
    r = rig()
    r.connect(A, PATH_A)
    r.receive(RouteAdvert(IPv4Address(dst), A, 10), PATH_A)
    assert r.plane.routes == {}
    assert r.manager.drops == {"route_advert_destination": 1}


def test_advert_for_us_is_ignored_without_a_drop() -> None:
    # Every peer advertises its route to us to all its peers, us included.
    r = rig()
    r.connect(A, PATH_A)
    r.receive(RouteAdvert(OWN.ip, A, 10), PATH_A)
    assert r.manager.drops == {}


def test_adverts_ignored_when_relaying_is_off() -> None:
    r = rig(route=0)
    r.connect(A, PATH_A)
    r.receive(RouteAdvert(C, A, 10), THIRD)
    assert r.manager.drops == {}
    assert r.plane.routes == {}


def test_route_table_cap_is_counted() -> None:
    wide = IPv4Interface(f"{OWN.ip}/8")
    plane, clock = FakeDataPlane(), Clock()
    manager = PeerManager(config(), wide, plane, FakeSignaling(), local_port=1)
    r = Rig(manager, plane, clock)
    peer = A
    r.connect(peer, PATH_A)
    first = int(IPv4Address("10.1.0.0"))
    adverts = [
        (RouteAdvert(IPv4Address(first + n), peer, 10).encode(), PATH_A)
        for n in range(MAX_ROUTES + 10)
    ]
    manager.on_control_datagrams(adverts, clock.now)
    assert len(plane.routes) == MAX_ROUTES - 1  # the direct entry holds one
    assert manager.drops == {"route_table_full": 11}


# ---------------------------------------------------------------- table caps


def test_peer_table_is_capped_and_evicts_idle_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_manager, "MAX_PEERS", 3)
    r = rig()
    r.connect(A, PATH_A)
    sources = [IPv4Address(f"10.77.0.{n}") for n in range(10, 20)]
    for source in sources:  # relayed packets with made-up sources
        r.manager.on_relay_in(packet(source, OWN.ip), r.clock.now)
    assert len(r.manager._peers) == 3
    assert r.manager.drops["peer_table_full"] == 8
    # Without a STUN answer they fail within 10 s: idle, so they make room.
    for _ in range(12):
        r.receive(Heartbeat(A, OWN.ip, 0, True), PATH_A)
        r.tick()
    r.manager.on_relay_in(packet(C, OWN.ip), r.clock.now)
    assert C in r.manager._peers
    assert r.manager.drops["peer_evicted"] == 1
    assert r.state(A) is PeerState.CONNECTED  # never evicted


def test_full_peer_table_is_scanned_once_per_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_manager, "MAX_PEERS", 2)
    r = rig()
    r.connect(A, PATH_A)
    r.connect(B, PATH_B)
    scans = 0
    original = PeerManager._evict_idle_peer

    def counting(self: PeerManager) -> bool:
        nonlocal scans
        scans += not self._peer_table_full
        return original(self)

    monkeypatch.setattr(PeerManager, "_evict_idle_peer", counting)
    for n in range(100):
        r.manager.on_relay_in(packet(IPv4Address(f"10.77.0.{n + 10}"), OWN.ip), r.clock.now)
    assert scans == 1
    assert r.manager.drops["peer_table_full"] == 100


def test_key_cache_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_manager, "MAX_KEYS", 4)
    r = rig()
    for n in range(10, 30):  # probes "from" many members, each echoed with its key
        r.receive(Delay(IPv4Address(f"10.77.0.{n}"), OWN.ip, 1), THIRD)
    assert len(r.manager._keys) == 4
    assert r.manager.drops["key_cache_evicted"] == 16
    assert len(r.plane.controls) == 20


def test_relay_counters_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_manager, "MAX_RELAY_COUNTERS", 2)
    r = rig()
    destinations = [IPv4Address(f"10.77.0.{n}") for n in range(10, 15)]
    r.manager.on_relay_out([packet(OWN.ip, d) for d in destinations])
    r.manager.on_relay_out([packet(OWN.ip, destinations[0])])
    assert len(r.manager._relay_counters) == 2
    assert r.manager.drops["relay_counters_full"] == 3
    (first, _) = r.manager.snapshot(None, r.clock.now)
    assert first["packets_out"] == 2


def test_default_caps() -> None:
    assert peer_manager.MAX_PEERS == peer_manager.MAX_KEYS == 4096
    assert peer_manager.MAX_RELAY_COUNTERS == 4096
    assert IPv4Network("10.0.0.0/8").num_addresses > peer_manager.MAX_PEERS


# ------------------------------------------------------------------------ STUN


def test_stun_server_is_told_only_while_a_request_is_outstanding() -> None:
    r = started_rig()
    assert r.plane.stun_server_calls == []  # resolved, not yet asked
    r.manager.on_discovery(Discovery(A, OWN.ip), r.clock.now)
    r.tick()
    r.tick()
    assert len(r.plane.stun_requests) == 2
    assert r.plane.stun_server_calls == [STUN]  # once, not per request
    wrong = encode_binding_response(bytes(12), (IPv4Address("198.51.100.1"), 1))
    r.manager.on_stun_datagrams([(wrong, STUN)], r.clock.now)
    assert r.plane.stun_server == STUN
    assert r.manager.drops["stun_unexpected"] == 1
    answer = encode_binding_response(r.plane.stun_requests[0], (IPv4Address("198.51.100.1"), 1))
    r.manager.on_stun_datagrams([(answer, STUN)], r.clock.now)
    assert r.plane.stun_server_calls == [STUN, None]
    assert r.state(A) is PeerState.SYNCHRONIZING
    # The same answer again (a replay) is no answer any more.
    r.manager.on_stun_datagrams([(answer, STUN)], r.clock.now)
    assert r.manager.drops["stun_unexpected"] == 2


def test_stun_server_forgotten_a_while_after_the_last_request() -> None:
    r = started_rig()
    r.manager.on_discovery(Discovery(A, OWN.ip), r.clock.now)
    last_request = None
    for _ in range(30):
        before = len(r.plane.stun_requests)
        r.tick()
        if len(r.plane.stun_requests) > before:
            last_request = r.clock.now
        if r.plane.stun_server is None and last_request is not None:
            break
    assert r.state(A) is PeerState.FAILED  # no answer within 10 s
    assert last_request is not None
    assert r.clock.now - last_request == STUN_ANSWER_SECONDS
    assert r.plane.stun_server_calls == [STUN, None]
    # A late answer finds no transaction.
    r.manager.on_stun_datagrams(
        [(encode_binding_response(r.plane.stun_requests[-1], (A, 1)), STUN)], r.clock.now
    )
    assert r.manager.drops["stun_unexpected"] == 1
