"""Two relays of one cluster, wired by hand: the relay's cluster hooks without NATS.

:class:`Bus` stands in for server/cluster.py and NATS: it performs Publish by
handing the frame to the relay that holds the address (as the subject
subscription would), Claim/Release/RecordLease by updating a shared table
and every relay's ClusterView (as the KV watches would), calls kick() when a
watch would show another server's claim, and claims login replay keys the
way ws.py does before it hands a login frame to its relay.
"""

import hashlib
import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvpn.server.cluster_state import ClusterView, OwnerRecord
from p2pvpn.server.relay import (
    Action,
    Claim,
    Close,
    Publish,
    RecordLease,
    Relay,
    Release,
    Send,
)
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import (
    BROADCAST,
    Auth,
    Discovery,
    ExptTun,
    Udp4Conn,
    WsType,
    decode_ws_message,
)
from tests.server import (
    NOW,
    PASSWORD,
    VMAC_A,
    VMAC_B,
    FakeSession,
    auth_frame,
    expttun_frame,
    forward,
    ip,
    vmac_frame,
)

DHCP = IPv4Network("10.77.0.0/24")
TTL = 15.0


class Bus:
    """NATS and the cluster I/O layer of every relay, synchronously."""

    def __init__(self, *server_ids: str) -> None:
        self.relays = {
            server_id: Relay(PASSWORD, dhcp=DHCP, cluster=ClusterView(server_id, TTL))
            for server_id in server_ids
        }
        self.owners: dict[IPv4Address, OwnerRecord] = {}  # the addresses bucket
        self.leases: dict[str, IPv4Address] = {}  # the leases bucket
        self.replay_keys: set[str] = set()  # the replay bucket
        self.performed: list[tuple[str, Action]] = []

    def relay(self, server_id: str) -> Relay:
        return self.relays[server_id]

    def _server_of(self, relay: Relay) -> str:
        assert relay.cluster is not None
        return relay.cluster.server_id

    def perform(self, relay: Relay, actions: list[Action], now: float = NOW) -> None:
        origin = self._server_of(relay)
        for action in actions:
            self.performed.append((origin, action))
            if isinstance(action, Send):
                assert isinstance(action.session, FakeSession)
                action.session.sent.append(action.frame)
            elif isinstance(action, Close):
                assert isinstance(action.session, FakeSession)
                action.session.closes.append((action.code, action.reason))
            elif isinstance(action, Publish):
                self._publish(origin, action, now)
            elif isinstance(action, Claim):
                self._claim(origin, action, now)
            elif isinstance(action, Release):
                self._release(action)
            else:
                self._record_lease(action)

    def _publish(self, origin: str, action: Publish, now: float) -> None:
        # no_echo: a server never gets its own publications back.
        if action.address is None:
            for server_id, other in self.relays.items():
                if server_id != origin:
                    self.perform(
                        other, other.deliver_from_cluster(action.frame, now, broadcast=True)
                    )
            return
        holder = self.owners.get(action.address)
        if holder is not None and holder.server != origin:
            other = self.relays[holder.server]
            self.perform(other, other.deliver_from_cluster(action.frame, now, broadcast=False))

    def _claim(self, origin: str, action: Claim, now: float) -> None:
        assert action.record.server == origin
        self.owners[action.address] = action.record
        for server_id, relay in self.relays.items():
            assert relay.cluster is not None
            relay.cluster.owner_put(action.address, action.record, now)
            if server_id != origin:
                self.perform(relay, relay.kick(action.address, action.record, now))

    def _release(self, action: Release) -> None:
        held = self.owners.get(action.address)
        if held is None or held.session != action.session.session_id:
            return  # the key is someone else's now
        del self.owners[action.address]
        for relay in self.relays.values():
            assert relay.cluster is not None
            relay.cluster.owner_deleted(action.address)

    def _record_lease(self, action: RecordLease) -> None:
        self.leases[action.vmac] = action.address
        for relay in self.relays.values():
            assert relay.cluster is not None
            relay.cluster.lease_put(action.vmac, action.address)

    # -- what ws.py does ------------------------------------------------------

    def feed(self, relay: Relay, session: FakeSession, frame: bytes, now: float = NOW) -> None:
        key = relay.login_replay_key(session, frame, now)
        if key is not None:
            if key in self.replay_keys:
                self.perform(relay, relay.refuse_replay(session, WsType(frame[0]).name, now))
                return
            self.replay_keys.add(key)
        self.perform(relay, relay.handle_frame(session, frame, now), now)

    def connect(self, relay: Relay, remote: str = "192.0.2.1:40000") -> FakeSession:
        session = FakeSession(remote)
        relay.on_connect(session)
        return session

    def disconnect(self, relay: Relay, session: FakeSession) -> None:
        self.perform(relay, relay.on_disconnect(session))

    def login(
        self, relay: Relay, tun_ip: str, *, vmac: str | None = None, now: int = NOW
    ) -> FakeSession:
        session = self.connect(relay)
        if vmac is not None:
            self.feed(relay, session, vmac_frame(vmac, now), now)
        self.feed(relay, session, auth_frame(tun_ip, now), now)
        assert session.closes == [], session.closes
        return session

    def request_address(
        self, relay: Relay, session: FakeSession, cidr: str = "0.0.0.0/0", now: int = NOW
    ) -> IPv4Address:
        before = len(session.sent)
        self.feed(relay, session, expttun_frame(cidr, now), now)
        assert session.closes == [], session.closes
        (reply,) = session.sent[before:]
        grant = decode_ws_message(reply)
        assert isinstance(grant, ExptTun)
        return grant.cidr.ip

    def dhcp_login(
        self, relay: Relay, vmac: str, cidr: str = "0.0.0.0/0", now: int = NOW
    ) -> tuple[FakeSession, IPv4Address]:
        """VMAC, EXPTTUN, AUTH with the granted address, as a dynamic client does."""
        session = self.connect(relay)
        self.feed(relay, session, vmac_frame(vmac, now), now)
        address = self.request_address(relay, session, cidr, now)
        self.feed(relay, session, auth_frame(str(address), now), now)
        assert session.authenticated
        return session, address

    def kinds(self, kind: type) -> list[tuple[str, Action]]:
        return [(origin, action) for origin, action in self.performed if isinstance(action, kind)]


@pytest.fixture
def bus() -> Bus:
    return Bus("s1", "s2")


# -- relaying --------------------------------------------------------------------


def test_forward_reaches_a_client_on_the_other_relay(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    a = bus.login(r1, "10.77.0.1")
    b = bus.login(r2, "10.77.0.2")
    frame = forward("10.77.0.1", "10.77.0.2")
    bus.feed(r1, a, frame)
    assert b.sent == [frame]
    assert [action.address for _, action in bus.kinds(Publish)] == [ip("10.77.0.2")]
    assert r1.stats()["frames_published"] == 1
    assert r1.stats()["frames_relayed"] == 0  # nothing went to a local session
    assert r2.stats()["frames_from_cluster"] == 1
    assert r2.stats()["frames_relayed"] == 1
    assert (a.frames_relayed, a.bytes_relayed) == (1, len(frame))
    assert (b.frames_delivered, b.bytes_delivered) == (1, len(frame))
    # And back.
    reply = forward("10.77.0.2", "10.77.0.1")
    bus.feed(r2, b, reply)
    assert a.sent == [reply]


def test_signalling_reaches_a_client_on_the_other_relay(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    a = bus.login(r1, "10.77.0.1")
    b = bus.login(r2, "10.77.0.2")
    frame = Udp4Conn(ip("10.77.0.1"), ip("10.77.0.2"), ip("198.51.100.1"), 40000).encode()
    bus.feed(r1, a, frame)
    assert b.sent == [frame]


def test_a_destination_held_nowhere_is_dropped_without_publishing(bus: Bus) -> None:
    r1 = bus.relay("s1")
    a = bus.login(r1, "10.77.0.1")
    bus.feed(r1, a, forward("10.77.0.1", "10.77.0.9"))
    assert bus.kinds(Publish) == []
    assert r1.stats()["drops"] == {"unknown_destination": 1}
    assert a.frames_relayed == 0


def test_a_remote_holder_that_stopped_refreshing_is_not_published_to(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    a = bus.login(r1, "10.77.0.1")
    bus.login(r2, "10.77.0.2")
    assert r1.cluster is not None
    r1.cluster.expire(NOW + TTL + 1)  # s2 died: its record was not refreshed
    bus.feed(r1, a, forward("10.77.0.1", "10.77.0.2"), NOW + TTL + 1)
    assert bus.kinds(Publish) == []
    assert r1.stats()["drops"] == {"unknown_destination": 1}


def test_a_local_holder_wins_over_the_cluster(bus: Bus) -> None:
    """The hit path never consults the cluster: a local session gets the frame."""
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    a = bus.login(r1, "10.77.0.1")
    c = bus.login(r1, "10.77.0.3")
    assert r1.cluster is not None
    r1.cluster.owner_put(ip("10.77.0.3"), OwnerRecord("s2", "x", None, NOW - 1), NOW)
    bus.feed(r1, a, forward("10.77.0.1", "10.77.0.3"))
    assert len(c.sent) == 1
    assert bus.kinds(Publish) == []
    assert r2.stats()["frames_from_cluster"] == 0


def test_broadcast_reaches_the_other_relay_once_and_not_back() -> None:
    bus = Bus("s1", "s2", "s3")
    r1, r2, r3 = bus.relay("s1"), bus.relay("s2"), bus.relay("s3")
    a = bus.login(r1, "10.77.0.1")
    d = bus.login(r1, "10.77.0.4")
    b = bus.login(r2, "10.77.0.2")
    c = bus.login(r2, "10.77.0.3")
    e = bus.login(r3, "10.77.0.5")
    discovery = Discovery(ip("10.77.0.1"), BROADCAST).encode()
    bus.feed(r1, a, discovery)
    assert (a.sent, d.sent, b.sent, c.sent, e.sent) == ([], *[[discovery]] * 4)
    # One publication, by s1; the receiving relays publish nothing back.
    assert [(origin, action.address) for origin, action in bus.kinds(Publish)] == [("s1", None)]
    assert a.frames_relayed == 1  # one broadcast passed on, however many got it
    broadcast_forward = forward("10.77.0.2", "10.77.0.255")
    bus.feed(r2, b, broadcast_forward)
    assert a.sent == [broadcast_forward]
    assert (d.sent, c.sent, e.sent) == ([discovery, broadcast_forward],) * 3
    assert b.sent == [discovery]
    assert [origin for origin, _ in bus.kinds(Publish)] == ["s1", "s2"]


def test_broadcast_is_capped_before_it_is_published(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    a = bus.login(r1, "10.77.0.1")
    b = bus.login(r2, "10.77.0.2")
    discovery = Discovery(ip("10.77.0.1"), BROADCAST).encode()
    # The default bucket holds 2 * broadcast_rate; all frames in the same instant.
    for _ in range(300):
        bus.feed(r1, a, discovery)
    assert len(b.sent) == 200
    assert len(bus.kinds(Publish)) == 200
    assert r1.stats()["drops"]["broadcast_rate"] == 100


def test_a_broadcast_from_the_cluster_skips_a_local_session_with_the_senders_address(
    bus: Bus,
) -> None:
    r2 = bus.relay("s2")
    twin = bus.login(r2, "10.77.0.1")
    other = bus.login(r2, "10.77.0.2")
    frame = Discovery(ip("10.77.0.1"), BROADCAST).encode()
    bus.perform(r2, r2.deliver_from_cluster(frame, NOW, broadcast=True))
    assert twin.sent == []
    assert other.sent == [frame]


# -- ownership -------------------------------------------------------------------


def test_login_claims_and_disconnect_releases(bus: Bus) -> None:
    r1 = bus.relay("s1")
    a = bus.login(r1, "10.77.0.1", vmac=VMAC_A)
    assert bus.owners[ip("10.77.0.1")] == OwnerRecord("s1", a.session_id, VMAC_A, NOW)
    assert a.since == NOW
    bus.disconnect(r1, a)
    assert bus.owners == {}
    # Idempotent: a second on_disconnect releases nothing more.
    assert r1.on_disconnect(a) == []


def test_duplicate_address_on_the_other_relay_kicks_the_old_session(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    old = bus.login(r1, "10.77.0.5", now=NOW)
    new = bus.login(r2, "10.77.0.5", now=NOW + 1)
    assert old.closes == [(CloseCode.KICKED, "another client logged in")]
    assert r1.session_for(ip("10.77.0.5")) is None
    assert r1.stats()["rejections"] == {"KICKED": 1}
    assert new.closes == []
    # The kicked session's release leaves the new owner's record alone.
    bus.disconnect(r1, old)
    assert bus.owners[ip("10.77.0.5")].session == new.session_id
    assert bus.kinds(Release)[0][1].session is old
    # Frames for the address now go to the new holder.
    sender = bus.login(r1, "10.77.0.1", now=NOW + 2)
    frame = forward("10.77.0.1", "10.77.0.5")
    bus.feed(r1, sender, frame, NOW + 2)
    assert new.sent == [frame]


def test_kick_spares_our_own_and_older_records(bus: Bus) -> None:
    r1 = bus.relay("s1")
    a = bus.login(r1, "10.77.0.5", now=NOW)
    address = ip("10.77.0.5")
    assert r1.kick(address, OwnerRecord("s1", "other", None, NOW + 5), NOW + 5) == []
    assert r1.kick(address, OwnerRecord("s2", a.session_id, None, NOW + 5), NOW + 5) == []
    # A refresh of the previous holder's record that arrives after our claim.
    assert r1.kick(address, OwnerRecord("s2", "older", None, NOW - 5), NOW + 5) == []
    assert r1.kick(ip("10.77.0.6"), OwnerRecord("s2", "x", None, NOW + 5), NOW + 5) == []
    assert a.closes == []
    assert r1.kick(address, OwnerRecord("s2", "newer", None, NOW + 5), NOW + 5) == [
        Close(a, CloseCode.KICKED, "another client logged in")
    ]


def test_a_session_closed_before_login_releases_nothing(bus: Bus) -> None:
    r1 = bus.relay("s1")
    session = bus.connect(r1)
    bus.feed(r1, session, auth_frame("10.77.0.1", password="wrong"))
    assert session.close_code == CloseCode.AUTHENTICATION_FAILED
    assert r1.on_disconnect(session) == []


# -- DHCP ------------------------------------------------------------------------


def test_sticky_lease_across_relays(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    session, address = bus.dhcp_login(r1, VMAC_A, "10.77.0.7/24")
    assert address == ip("10.77.0.7")
    assert bus.leases == {VMAC_A: address}
    bus.disconnect(r1, session)
    # The same installation on the other server asks for "any": it gets its address back.
    _, again = bus.dhcp_login(r2, VMAC_A, now=NOW + 1)
    assert again == address
    assert (
        sum(isinstance(a, RecordLease) and a.vmac == VMAC_A for _, a in bus.performed) >= 3
    )  # the grant and the login on s1, again on s2


def test_sticky_lease_while_the_old_session_still_lives(bus: Bus) -> None:
    """A client moving to another server before the first noticed: same address, old kicked."""
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    old, address = bus.dhcp_login(r1, VMAC_A, "10.77.0.7/24")
    _, again = bus.dhcp_login(r2, VMAC_A, now=NOW + 1)
    assert again == address
    assert old.close_code == CloseCode.KICKED


def test_an_address_held_remotely_by_another_vmac_is_not_granted(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    _, taken = bus.dhcp_login(r1, VMAC_A, "10.77.0.7/24")
    _, address = bus.dhcp_login(r2, VMAC_B, "10.77.0.7/24")
    assert address != taken
    assert address in DHCP


def test_next_free_skips_addresses_held_or_leased_elsewhere(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    _, first = bus.dhcp_login(r1, VMAC_A)
    _, second = bus.dhcp_login(r2, VMAC_B)
    assert first == ip("10.77.0.1")
    assert second == ip("10.77.0.2")


# -- login replay across relays --------------------------------------------------


def test_replayed_auth_on_the_other_relay_is_refused(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    bus.login(r1, "10.77.0.1")
    replayer = bus.connect(r2, "203.0.113.9:5555")
    bus.feed(r2, replayer, auth_frame("10.77.0.1"))
    assert replayer.closes == [(CloseCode.STALE_OR_REPLAYED, "replayed")]
    assert r2.session_for(ip("10.77.0.1")) is None
    assert r2.stats()["rejections"] == {"STALE_OR_REPLAYED": 1}
    # Nothing was claimed for the replayer.
    assert [origin for origin, _ in bus.kinds(Claim)] == ["s1"]


def test_replay_key_is_the_same_on_both_relays(bus: Bus) -> None:
    r1, r2 = bus.relay("s1"), bus.relay("s2")
    one, two = FakeSession(), FakeSession()
    for frame in (auth_frame("10.77.0.1"), vmac_frame(VMAC_A), expttun_frame()):
        key = r1.login_replay_key(one, frame, NOW)
        assert key is not None
        assert len(key) == 64
        assert key == r2.login_replay_key(two, frame, NOW + 10)
    # EXPTTUN hashes only password and time: the vmac tells two clients apart.
    one.vmac, two.vmac = VMAC_A, VMAC_B
    assert r1.login_replay_key(one, expttun_frame(), NOW) != r1.login_replay_key(
        two, expttun_frame(), NOW
    )
    # Computing a key changes nothing: the frame still logs in.
    bus.feed(r1, one, auth_frame("10.77.0.1"))
    assert one.authenticated


def test_replay_key_form_is_fixed() -> None:
    """Servers of different versions must compute the same key: its form is pinned."""
    relay = Relay(PASSWORD, dhcp=DHCP, cluster=ClusterView("s1", TTL))
    session = FakeSession()
    frame = auth_frame("10.77.0.1")
    message = decode_ws_message(frame)
    assert isinstance(message, Auth)
    expected = json.dumps([int(WsType.AUTH), message.hash.hex()]).encode()
    assert relay.login_replay_key(session, frame, NOW) == hashlib.sha256(expected).hexdigest()
    session.vmac = VMAC_A
    frame = expttun_frame()
    request = decode_ws_message(frame)
    assert isinstance(request, ExptTun)
    expected = json.dumps([int(WsType.EXPTTUN), VMAC_A, request.hash.hex()]).encode()
    assert relay.login_replay_key(session, frame, NOW) == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize(
    "frame",
    [
        auth_frame("10.77.0.1", password="wrong"),
        vmac_frame(VMAC_A, password="wrong"),
        auth_frame("10.77.0.1", now=NOW - 301),
        expttun_frame(now=NOW + 301),
        forward("10.77.0.1", "10.77.0.2"),
        Discovery(ip("10.77.0.1"), BROADCAST).encode(),
        auth_frame("10.77.0.1")[:-1],  # malformed
        b"",
    ],
)
def test_no_replay_key_for_what_the_relay_refuses_anyway(frame: bytes) -> None:
    relay = Relay(PASSWORD, dhcp=DHCP, cluster=ClusterView("s1", TTL))
    assert relay.login_replay_key(FakeSession(), frame, NOW) is None


def test_no_replay_key_for_a_repeat_or_a_closed_session(bus: Bus) -> None:
    r1 = bus.relay("s1")
    session = bus.login(r1, "10.77.0.1")
    assert r1.login_replay_key(session, auth_frame("10.77.0.2"), NOW) is None
    session.closed = True
    assert r1.login_replay_key(session, vmac_frame(VMAC_A), NOW) is None
    assert r1.refuse_replay(session, "VMAC", NOW) == []


# -- junk from the cluster -------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "broadcast"),
    [
        (b"", False),
        (b"\x01\x45", False),  # short FORWARD
        (b"\x01" + b"\x65" + bytes(19), False),  # not IPv4
        (forward("10.77.0.1", "10.77.0.255"), False),  # broadcast on a unicast subject
        (forward("10.77.0.1", "10.77.0.2"), True),  # unicast on the broadcast subject
        (Udp4Conn(ip("10.77.0.1"), BROADCAST, ip("198.51.100.1"), 1).encode(), True),
        (auth_frame("10.77.0.2"), False),  # not relayable
        (bytes([WsType.DISCOVERY]) + b"\x00", False),  # truncated
        (b"\xfe" * 30, False),  # unknown type
        (forward("10.77.0.1", "10.77.0.2") + bytes(70_000), False),  # oversized
    ],
)
def test_junk_from_the_cluster_is_dropped_and_counted(frame: bytes, broadcast: bool) -> None:
    bus = Bus("s1", "s2")
    r2 = bus.relay("s2")
    b = bus.login(r2, "10.77.0.2")
    assert r2.deliver_from_cluster(frame, NOW, broadcast=broadcast) == []
    assert b.sent == []
    stats = r2.stats()
    assert stats["drops"] == {"cluster_malformed": 1}
    assert stats["frames_from_cluster"] == 1
    assert stats["internal_errors"] == 0


def test_a_frame_for_an_address_not_held_here_is_counted(bus: Bus) -> None:
    r2 = bus.relay("s2")
    assert r2.deliver_from_cluster(forward("10.77.0.1", "10.77.0.2"), NOW, broadcast=False) == []
    assert r2.stats()["drops"] == {"cluster_unknown_destination": 1}


@settings(max_examples=300)
@given(frame=st.binary(max_size=120), broadcast=st.booleans())
def test_deliver_from_cluster_never_raises(frame: bytes, broadcast: bool) -> None:
    relay = Relay(PASSWORD, dhcp=DHCP, cluster=ClusterView("s2", TTL))
    sessions = {}
    for address in ("10.77.0.1", "10.77.0.2", "10.77.0.3"):
        session = FakeSession()
        relay.on_connect(session)
        relay.handle_frame(session, auth_frame(address), NOW)
        sessions[address] = session
    actions = relay.deliver_from_cluster(frame, NOW, broadcast=broadcast)
    # Only sends, of the frame unchanged, to logged-in sessions; nothing published back.
    assert all(isinstance(action, Send) and action.frame == frame for action in actions)
    assert all(action.session in sessions.values() for action in actions)
    stats = relay.stats()
    assert stats["internal_errors"] == 0
    assert stats["frames_from_cluster"] == 1


@given(
    frame=st.builds(
        lambda src, dst, payload: forward(str(src), str(dst), payload),
        st.sampled_from(["10.77.0.1", "10.77.0.9"]),
        st.sampled_from(["10.77.0.2", "10.77.0.255", "224.0.0.1", "10.77.0.8"]),
        st.binary(max_size=40),
    ),
    broadcast=st.booleans(),
)
def test_deliver_from_cluster_sends_forwards_only_where_the_subject_says(
    frame: bytes, broadcast: bool
) -> None:
    relay = Relay(PASSWORD, dhcp=DHCP, cluster=ClusterView("s2", TTL))
    session = FakeSession()
    relay.on_connect(session)
    relay.handle_frame(session, auth_frame("10.77.0.2"), NOW)
    actions = relay.deliver_from_cluster(frame, NOW, broadcast=broadcast)
    destination = IPv4Address(frame[17:21])
    expect_broadcast = destination.is_multicast or destination == ip("10.77.0.255")
    delivered = actions == [Send(session, frame)]
    if broadcast:
        assert delivered == expect_broadcast
    else:
        assert delivered == (destination == ip("10.77.0.2"))


# -- status ----------------------------------------------------------------------


def test_session_rows(bus: Bus) -> None:
    r1 = bus.relay("s1")
    b = bus.login(r1, "10.77.0.2", vmac=VMAC_B, now=NOW)
    a = bus.login(r1, "10.77.0.1", now=NOW + 3)
    a.tls = True
    pending = bus.connect(r1)  # not logged in: no row
    frame = forward("10.77.0.1", "10.77.0.2")
    bus.feed(r1, a, frame, NOW + 4)
    bus.feed(r1, a, frame, NOW + 4)
    rows = r1.session_rows(NOW + 5)
    assert rows == [
        {
            "address": "10.77.0.1",
            "vmac": None,
            "remote": a.remote,
            "since": NOW + 3,
            "frames_relayed": 2,
            "bytes_relayed": 2 * len(frame),
            "frames_delivered": 0,
            "bytes_delivered": 0,
            "tls": True,
            "name": None,
            "p2pvpn": False,
            "exit_node": False,
            "version": None,
        },
        {
            "address": "10.77.0.2",
            "vmac": VMAC_B,
            "remote": b.remote,
            "since": NOW,
            "frames_relayed": 0,
            "bytes_relayed": 0,
            "frames_delivered": 2,
            "bytes_delivered": 2 * len(frame),
            "tls": False,
            "name": None,
            "p2pvpn": False,
            "exit_node": False,
            "version": None,
        },
    ]
    assert pending.since is None
    bus.disconnect(r1, a)
    assert [row["address"] for row in r1.session_rows(NOW + 6)] == ["10.77.0.2"]


def test_session_rows_sort_by_address_not_text() -> None:
    relay = Relay(PASSWORD)
    for address in ("10.0.0.10", "10.0.0.9"):
        session = FakeSession()
        relay.on_connect(session)
        relay.handle_frame(session, auth_frame(address), NOW)
    assert [row["address"] for row in relay.session_rows(NOW)] == ["10.0.0.9", "10.0.0.10"]


# -- without a cluster -----------------------------------------------------------


def test_without_a_cluster_no_cluster_action_appears() -> None:
    relay = Relay(PASSWORD, dhcp=DHCP)
    assert relay.cluster is None
    session = FakeSession()
    relay.on_connect(session)
    actions = relay.handle_frame(session, vmac_frame(VMAC_A), NOW)
    actions += relay.handle_frame(session, expttun_frame(), NOW)
    actions += relay.handle_frame(session, auth_frame("10.77.0.1"), NOW)
    actions += relay.handle_frame(session, forward("10.77.0.1", "10.77.0.9"), NOW)
    actions += relay.handle_frame(session, Discovery(ip("10.77.0.1"), BROADCAST).encode(), NOW)
    assert all(isinstance(action, Send | Close) for action in actions)
    assert relay.on_disconnect(session) == []
    stats = relay.stats()
    assert (stats["frames_published"], stats["frames_from_cluster"]) == (0, 0)


@settings(max_examples=300)
@given(
    frame=st.binary(max_size=80)
    | st.builds(
        forward,
        st.sampled_from(["10.77.0.1", "10.77.0.9"]),
        st.sampled_from(["10.77.0.2", "10.77.0.3", "10.77.0.255", "239.1.2.3"]),
    )
    | st.builds(
        lambda src, dst: Discovery(ip(src), ip(dst)).encode(),
        st.sampled_from(["10.77.0.1", "10.77.0.9"]),
        st.sampled_from(["10.77.0.2", "10.77.0.3", "255.255.255.255"]),
    )
)
def test_handle_frame_with_a_cluster_publishes_only_checked_frames(frame: bytes) -> None:
    """Whatever a client sends, a Publish carries its own frame from its own address."""
    view = ClusterView("s1", TTL)
    relay = Relay(PASSWORD, dhcp=DHCP, cluster=view)
    view.owner_put(ip("10.77.0.2"), OwnerRecord("s2", "x", None, NOW), NOW)
    session = FakeSession()
    relay.on_connect(session)
    relay.handle_frame(session, auth_frame("10.77.0.1"), NOW)
    actions = relay.handle_frame(session, frame, NOW)
    for action in actions:
        if isinstance(action, Publish):
            assert action.frame == frame
            assert action.address in (None, ip("10.77.0.2"))
            assert frame[0] in (WsType.FORWARD, WsType.UDP4CONN, WsType.DISCOVERY, WsType.GENERAL)
            offset = {WsType.FORWARD: 13, WsType.GENERAL: 4}.get(WsType(frame[0]), 1)
            source = frame[offset : offset + 4]
            assert source == ip("10.77.0.1").packed
        else:
            assert isinstance(action, Send | Close)
    assert relay.stats()["internal_errors"] == 0
