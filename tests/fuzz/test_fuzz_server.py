"""Fuzzing the relay's per-connection frame handler, Relay.handle_frame (sans I/O).

Four fuzzed sessions (one fresh, one with only a VMAC, two logged in) send
random, truncated, oversized and mutated captured frames, and valid-looking
frames built from the codecs with random fields, next to three well-behaved
sessions. After every frame:

* nothing escapes handle_frame and no internal error is counted;
* the good sessions are never closed, unmapped or logged out;
* whatever reaches a good session is the sender's frame, unchanged, of a
  relayable type, carrying the sender's own address as source;
* a frame is either relayed, dropped and counted, or closes its sender with
  one of p2pvpn's close codes; a closed session receives nothing more.

Afterwards unicast and broadcast between the good sessions still arrive, and
a new client can still log in.
"""

import functools
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.config import SdwanRule
from p2pvpn.server.relay import MAX_FRAME_SIZE, Relay
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import (
    BROADCAST,
    Auth,
    Discovery,
    ExptTun,
    General,
    LanAddress,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    Vmac,
    WsType,
)
from tests.fuzz import (
    RUNS,
    VECTOR_NOW,
    VECTOR_PASSWORD,
    addresses,
    captured_frames,
    fuzz_settings,
    ip_packets,
    ipv4_packet,
    mutated,
)
from tests.server import FakeSession, feed

PASSWORD = VECTOR_PASSWORD
NOW = VECTOR_NOW
DHCP = IPv4Network("192.168.202.0/24")
ROUTED = IPv4Network("172.30.0.0/16")

# Well-behaved sessions: G1 is the peer of the captured frames, G3 the sdwan gateway.
G1, G2, G3 = (
    IPv4Address("192.168.202.9"),
    IPv4Address("192.168.202.10"),
    IPv4Address("192.168.202.20"),
)
GOOD_VMACS = {G1: "aaaaaaaaaaaaaaa9", G3: "aaaaaaaaaaaaaa20"}
GOOD_ADDRESSES = frozenset({G1, G2, G3})
# Addresses the fuzzed sessions start with; the captures come from 192.168.202.1.
F2_ADDRESS, F3_ADDRESS = IPv4Address("192.168.202.1"), IPv4Address("192.168.202.2")
CAPTURED_VMAC = "1eb9fcc6f6a90f6f"
# Logs in at the end; not among the addresses the fuzzer favours.
NEWCOMER = IPv4Address("192.168.202.78")

RELAYED_TYPES = frozenset({WsType.FORWARD, WsType.UDP4CONN, WsType.DISCOVERY, WsType.GENERAL})
SIGNED_TYPES = frozenset({WsType.AUTH, WsType.EXPTTUN, WsType.VMAC})
P2PVPN_CLOSE_CODES = frozenset(int(code) for code in CloseCode)


# -- the relay under test -----------------------------------------------------------------


class World:
    """A relay with three good and four fuzzed sessions."""

    def __init__(self) -> None:
        rule = SdwanRule(device=DHCP, destination=ROUTED, nexthop=G3)
        self._connections = 0
        self.relay = Relay(PASSWORD, dhcp=DHCP, sdwan=(rule,))
        self.good = {
            G1: self.login(G1, vmac=GOOD_VMACS[G1]),
            G2: self.login(G2),
            G3: self.login(G3, vmac=GOOD_VMACS[G3]),
        }
        fresh = self.connect()
        vmac_only = self.connect()
        self.send(vmac_only, Vmac.create(PASSWORD, "bbbbbbbbbbbbbbb1", NOW - 2).encode())
        # NOW - 1, so that the captured AUTH (at NOW) is not a replay of this login.
        logged_in = self.login(F2_ADDRESS, vmac=CAPTURED_VMAC, timestamp=NOW - 1)
        static = self.login(F3_ADDRESS, timestamp=NOW - 1)
        self.fuzzed: list[FakeSession] = [fresh, vmac_only, logged_in, static]
        self.closed_sent: dict[FakeSession, int] = {}  # frames it had when closed

    def connect(self) -> FakeSession:
        self._connections += 1
        session = FakeSession(f"198.51.100.1:{40000 + self._connections}")
        self.relay.on_connect(session)
        return session

    def send(self, session: FakeSession, frame: bytes, now: float = NOW) -> None:
        feed(self.relay, session, frame, now)

    def login(
        self, address: IPv4Address, *, vmac: str | None = None, timestamp: int = NOW
    ) -> FakeSession:
        session = self.connect()
        if vmac is not None:
            self.send(session, Vmac.create(PASSWORD, vmac, timestamp).encode())
        self.send(session, Auth.create(PASSWORD, address, timestamp).encode())
        assert session.authenticated, session.closes
        return session

    def reconnect(self, index: int) -> None:
        """The fuzzed session ``index`` goes away; a fresh connection takes its place."""
        old = self.fuzzed[index]
        self.relay.on_disconnect(old, "fuzz: reconnect")
        self.closed_sent[old] = len(old.sent)
        self.fuzzed[index] = self.connect()

    # -- invariants -------------------------------------------------------------------

    def check_good_sessions(self) -> None:
        assert self.relay.stats()["internal_errors"] == 0
        for address, session in self.good.items():
            assert session.closes == [], (address, session.closes)
            assert session.authenticated
            assert session.tun_ip == address
            assert self.relay.session_for(address) is session
        for address, vmac in GOOD_VMACS.items():
            assert self.relay.lease_of(vmac) == address

    def check_delivery_still_works(self) -> None:
        g1, g2, g3 = self.good[G1], self.good[G2], self.good[G3]
        probes: list[tuple[FakeSession, bytes, list[FakeSession]]] = [
            (g2, b"\x01" + ipv4_packet(G2, G1, b"unicast after fuzzing"), [g1]),
            (g1, b"\x01" + ipv4_packet(G1, G2, b"and back"), [g2]),
            (g1, Udp4Conn(G1, G2, IPv4Address("203.0.113.7"), 4242).encode(), [g2]),
            (g3, b"\x01" + ipv4_packet(IPv4Address("172.30.1.1"), G1, b"routed"), [g1]),
            (g3, Discovery(G3, BROADCAST).encode(), [g1, g2]),
        ]
        for sender, frame, receivers in probes:
            self.send(sender, frame)
            for receiver in receivers:
                assert receiver.sent[-1] == frame
        self.check_good_sessions()
        # A newcomer can still log in and talk to a good session.
        newcomer = self.login(NEWCOMER, timestamp=NOW + 5)
        frame = b"\x01" + ipv4_packet(NEWCOMER, G2, b"hello from new")
        self.send(newcomer, frame, NOW + 5)
        assert g2.sent[-1] == frame

    def check_closed_sessions(self) -> None:
        """A closed fuzzed session (sender or kicked) got one p2pvpn close and nothing after."""
        for session in self.fuzzed:
            if session in self.closed_sent:
                assert len(session.sent) == self.closed_sent[session], "sent after close"
            elif session.closed:
                assert len(session.closes) == 1, session.closes
                assert session.close_code in P2PVPN_CLOSE_CODES, session.closes
                assert not session.authenticated
                self.closed_sent[session] = len(session.sent)

    def fuzz_frame(self, index: int, frame: bytes, now: float) -> None:
        """Send ``frame`` from fuzzed session ``index`` and check every per-frame invariant."""
        relay = self.relay
        sender = self.fuzzed[index]
        sender_ip, was_authenticated, was_closed = (
            sender.tun_ip,
            sender.authenticated,
            sender.closed,
        )
        before = relay.stats()
        good_before = {address: len(s.sent) for address, s in self.good.items()}

        feed(relay, sender, frame, now)

        after = relay.stats()
        assert after["internal_errors"] == 0
        self.check_good_sessions()
        for address, session in self.good.items():
            for delivered in session.sent[good_before[address] :]:
                check_relayed(delivered, frame, sender_ip, was_authenticated)
        self.check_closed_sessions()
        if was_closed:
            assert drops(after)["after_close"] == drops(before)["after_close"] + 1
            return
        if sender.closed:
            if sender_ip is not None:
                assert relay.session_for(sender_ip) is not sender
            return
        # Not closed: the frame was relayed, dropped and counted, a login step, or a
        # HELLO (answered with NAMES to its sender alone).
        relayed = after["frames_relayed"] > before["frames_relayed"]
        dropped = sum(drops(after).values()) > sum(drops(before).values())
        handled = frame[0] in SIGNED_TYPES or frame[0] == WsType.HELLO
        assert relayed or dropped or handled, frame[:32].hex()
        if len(frame) > MAX_FRAME_SIZE:
            raise AssertionError("an oversized frame did not close its sender")


def drops(stats: dict[str, Any]) -> Counter[str]:
    return Counter(stats["drops"])


def check_relayed(
    delivered: bytes, frame: bytes, sender_ip: IPv4Address | None, authenticated: bool
) -> None:
    """What a good session received because of ``frame``: the frame itself, from its sender."""
    assert authenticated, "a session that is not logged in got a frame relayed"
    assert delivered == frame, "the relay changed a frame"
    assert frame[0] in RELAYED_TYPES
    assert len(frame) <= MAX_FRAME_SIZE
    assert sender_ip is not None
    if frame[0] == WsType.FORWARD:
        source = IPv4Address(frame[13:17])
    elif frame[0] == WsType.GENERAL:
        source = IPv4Address(frame[4:8])  # type, subtype, u16 extra, then src
    else:
        source = IPv4Address(frame[1:5])
    assert source == sender_ip, f"spoofed source {source} from {sender_ip} was relayed"


# -- frames ---------------------------------------------------------------------------------

_TYPE_BYTES = st.sampled_from([*(int(kind) for kind in WsType), 7, 8, 100, 254])
_OTHER_ADDRESSES = ("192.168.202.255", "192.168.202.0", "172.30.1.1", "192.168.202.77")
_POOL = [str(a) for a in (G1, G2, G3, F2_ADDRESS, F3_ADDRESS)] + list(_OTHER_ADDRESSES)


def _timestamps() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(NOW - 400, NOW + 400),
        st.integers(NOW - 2, NOW + 2),
        st.integers(-(2**63), 2**63 - 1),
    )


def _passwords() -> st.SearchStrategy[str]:
    return st.sampled_from([PASSWORD, PASSWORD, "wrong password", ""])


@st.composite
def _signed(draw: st.DrawFn) -> bytes:
    password = draw(_passwords())
    timestamp = draw(_timestamps())
    kind = draw(st.sampled_from(["auth", "vmac", "expttun", "expttun_raw", "random_hash"]))
    if kind == "auth":
        address = draw(addresses(*_POOL))
        if password == PASSWORD and address in GOOD_ADDRESSES:
            # With the password, taking a good client's address kicks it, as designed.
            password = "wrong password"
        return Auth.create(password, address, timestamp).encode()
    if kind == "vmac":
        vmac = draw(
            st.one_of(
                st.sampled_from([CAPTURED_VMAC, "bbbbbbbbbbbbbbb1", "0123456789abcdef"]),
                st.text("0123456789abcdef", min_size=16, max_size=16),
                st.text(st.characters(max_codepoint=127), min_size=16, max_size=16),
            )
        )
        if vmac in GOOD_VMACS.values():
            vmac = "bbbbbbbbbbbbbbb2"  # the same installation would take its address over
        return Vmac.create(password, vmac, timestamp).encode()
    if kind == "expttun":
        address = draw(addresses(*_POOL))
        prefix = draw(st.integers(0, 32))
        cidr = IPv4Interface((address, prefix))
        return ExptTun.create(password, cidr, timestamp).encode()
    if kind == "expttun_raw":
        # Arbitrary cidr text under a valid hash: only the decoder stands in the way.
        cidr = draw(
            st.one_of(
                st.binary(min_size=32, max_size=32),
                st.sampled_from([b"192.168.202.9/24", b"192.168.202.1", b"1.2.3.4/33", b"x"]).map(
                    lambda text: text.ljust(32, b"\0")
                ),
            )
        )
        genuine = ExptTun.create(password, IPv4Interface("0.0.0.0/0"), timestamp).encode()
        return genuine[:9] + cidr + genuine[41:]
    layout = draw(st.sampled_from([b"\x00" + bytes(12), b"\x04" + bytes(24), b"\x02" + bytes(40)]))
    return layout + draw(st.binary(min_size=32, max_size=32))


@functools.cache
def _relayable(me: IPv4Address | None) -> st.SearchStrategy[bytes]:
    """Signaling messages and FORWARDs, with the sender's own source most of the time."""
    own = [me] if me is not None else []
    sources = st.one_of(st.sampled_from(own or [G1]), addresses(*_POOL))
    destinations = addresses(*_POOL)
    ports = st.integers(0, 0xFFFF)
    return st.one_of(
        st.builds(Udp4Conn, sources, destinations, addresses(), ports).map(Udp4Conn.encode),
        st.builds(Discovery, sources, destinations).map(Discovery.encode),
        st.builds(
            General,
            st.integers(1, 255),
            ports,
            sources,
            destinations,
            st.binary(max_size=64),
        ).map(General.encode),
        st.builds(LanAddress, sources, destinations, addresses(), ports).map(LanAddress.encode),
        ip_packets(sources, destinations).map(lambda packet: b"\x01" + packet),
        ip_packets(sources, destinations).map(lambda packet: b"\x01" + packet),
    )


@st.composite
def _oversized(draw: st.DrawFn, me: IPv4Address | None) -> bytes:
    size = draw(st.sampled_from([MAX_FRAME_SIZE, MAX_FRAME_SIZE + 1, MAX_FRAME_SIZE + 1000]))
    type_byte = draw(_TYPE_BYTES)
    source = me if me is not None else G1
    header = bytes([type_byte]) + ipv4_packet(source, draw(addresses(*_POOL)), b"")
    return header + bytes(size - len(header))


def _routes() -> st.SearchStrategy[bytes]:
    route = st.builds(
        SystemRoute,
        addresses(),
        st.integers(0, 32).map(lambda prefix: IPv4Network(f"0.0.0.0/{prefix}").netmask),
        addresses(),
    )
    return st.lists(route, max_size=4).map(lambda rs: SystemRoutes(tuple(rs)).encode())


@functools.cache
def frames(me: IPv4Address | None, captured: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(_TYPE_BYTES, st.binary(max_size=120)).map(lambda t: bytes([t[0]]) + t[1]),
        st.sampled_from(captured),
        st.sampled_from(captured).flatmap(mutated),
        _signed(),
        _signed().flatmap(mutated),
        _relayable(me),
        _relayable(me).flatmap(mutated),
        _oversized(me),
        _routes(),
        st.just(b""),
    )


@functools.cache
def _bursts(me: IPv4Address | None) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.one_of(_relayable(me), _relayable(me).flatmap(mutated)), max_size=40)


_OPERATION_COUNTS = st.integers(1, 12)
_RECONNECT = st.integers(0, 15)
_TIME_STEPS = st.sampled_from([0.0, 0.001, 0.5, 2.0])
_SENDERS = st.integers(0, 3)


# -- the properties ---------------------------------------------------------------------


def _run(max_examples: int, body: Callable[[st.DataObject], None]) -> None:
    fuzz_settings(max_examples)(given(st.data())(body))()


@pytest.mark.parametrize("max_examples", RUNS)
def test_fuzzed_sessions_never_disturb_the_good_ones(
    max_examples: int, candy_vectors: dict[str, Any]
) -> None:
    assert candy_vectors["password"] == PASSWORD
    captured = tuple(captured_frames(candy_vectors, direction="client_to_server"))

    def body(data: st.DataObject) -> None:
        world = World()
        now = float(NOW)
        for _ in range(data.draw(_OPERATION_COUNTS, label="operations")):
            index = data.draw(_SENDERS, label="sender")
            if data.draw(_RECONNECT) == 0:
                world.reconnect(index)
                continue
            me = world.fuzzed[index].tun_ip
            frame = data.draw(frames(me, captured), label="frame")
            now += data.draw(_TIME_STEPS)
            world.fuzz_frame(index, frame, now)
        world.check_delivery_still_works()

    _run(max_examples, body)


@pytest.mark.parametrize("max_examples", RUNS)
def test_a_burst_of_garbage_from_one_client_closes_or_drops_only_its_frames(
    max_examples: int,
) -> None:
    """Many frames from one logged-in client, as a real flood arrives: one after another."""

    def body(data: st.DataObject) -> None:
        world = World()
        me = world.fuzzed[2].tun_ip
        burst = data.draw(_bursts(me))
        for frame in burst:
            world.fuzz_frame(2, frame, NOW)
        world.check_delivery_still_works()

    _run(max_examples, body)


@pytest.mark.parametrize("max_examples", RUNS)
def test_every_frame_before_login_is_refused_without_effect(max_examples: int) -> None:
    """Not logged in: anything but VMAC/EXPTTUN/AUTH closes; nothing is ever relayed."""

    def body(data: st.DataObject) -> None:
        world = World()
        frame = data.draw(frames(None, (b"\x01" + ipv4_packet(G1, G2, b"x"),)))
        session = world.fuzzed[0]
        world.fuzz_frame(0, frame, NOW)
        if not frame or len(frame) > MAX_FRAME_SIZE:
            assert session.close_code == CloseCode.PROTOCOL_VIOLATION
        elif frame[0] in RELAYED_TYPES | {WsType.ROUTE}:
            assert session.close_code == CloseCode.NOT_AUTHENTICATED
        world.check_delivery_still_works()

    _run(max_examples, body)
