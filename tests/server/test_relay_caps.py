"""The relay core's resource caps, each driven past its limit through handle_frame.

Every test also checks that a well-behaved client is still served while the
cap bites: its login or its relayed frame goes through as usual.
"""

import ast
import inspect
from ipaddress import IPv4Interface, IPv4Network

import pytest

from p2pvpn.server import limits as limits_module
from p2pvpn.server.limits import BucketTable, LogThrottle, ServerLimits, TokenBucket
from p2pvpn.server.relay import Close, Relay, Send
from p2pvpn.wire.close_codes import CLOSE_REASONS, FATAL_CLOSE_CODES, CloseCode
from p2pvpn.wire.ws import BROADCAST, Discovery, General
from tests.server import (
    NOW,
    PASSWORD,
    VMAC_A,
    VMAC_B,
    VMAC_C,
    FakeSession,
    auth_frame,
    expttun_frame,
    feed,
    forward,
    ip,
    login,
    request_address,
    vmac_frame,
)

DHCP = IPv4Network("10.77.0.0/24")


def relay_with(**limits: int | float) -> Relay:
    return Relay(PASSWORD, dhcp=DHCP, limits=ServerLimits(**limits))  # type: ignore[arg-type]


def assert_relays(relay: Relay, sender: FakeSession, receiver: FakeSession, now: float) -> None:
    """A unicast FORWARD from ``sender`` reaches ``receiver``: the relay still serves."""
    assert sender.tun_ip is not None and receiver.tun_ip is not None
    frame = forward(str(sender.tun_ip), str(receiver.tun_ip), b"still-served")
    actions = relay.handle_frame(sender, frame, now)
    assert actions == [Send(receiver, frame)]


def test_the_limits_module_is_sans_io() -> None:
    tree = ast.parse(inspect.getsource(limits_module))
    roots = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    roots |= {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not roots & {"asyncio", "socket", "time", "websockets", "selectors"}, roots


# -- one login message of each kind per connection ---------------------------------------


def test_the_login_of_todays_clients_passes() -> None:
    """client/signaling.py: VMAC, at most one EXPTTUN, AUTH, on each connection."""
    relay = relay_with()
    session = FakeSession()
    relay.on_connect(session)
    feed(relay, session, vmac_frame(VMAC_A))
    granted = request_address(relay, session)
    assert granted is not None
    feed(relay, session, auth_frame(str(granted.ip)))
    assert session.closes == [] and session.authenticated
    assert relay.stats()["limits"] == {}


@pytest.mark.parametrize(
    ("first", "second", "name"),
    [
        (vmac_frame(VMAC_A), vmac_frame(VMAC_B, NOW + 1), "VMAC"),
        (expttun_frame(), expttun_frame(now=NOW + 1), "EXPTTUN"),
        (auth_frame("10.77.0.9"), auth_frame("10.77.0.9", NOW + 1), "AUTH"),
    ],
)
def test_a_second_login_message_of_a_kind_closes_4005(
    first: bytes, second: bytes, name: str
) -> None:
    relay = relay_with()
    good = login(relay, "10.77.0.1", vmac=VMAC_C)
    session = FakeSession("198.51.100.7:1234")
    relay.on_connect(session)
    feed(relay, session, first)
    assert session.closes == []
    assert relay.handle_frame(session, second, NOW + 1) == [
        Close(session, CloseCode.PROTOCOL_VIOLATION, f"repeated {name}")
    ]
    assert relay.stats()["limits"] == {"repeated_login_message": 1}
    # Someone else logs in and is relayed to as usual.
    other = login(relay, "10.77.0.2", vmac=VMAC_B, now=NOW + 2)
    assert_relays(relay, other, good, NOW + 2)


# -- the replay cache ------------------------------------------------------------------


def test_a_full_replay_cache_refuses_new_logins_as_retryable() -> None:
    relay = relay_with(max_replay_entries=16)
    good = login(relay, "10.77.0.1", vmac=VMAC_A)  # two entries
    peer = login(relay, "10.77.0.2", vmac=VMAC_B)  # four
    for n in range(12):
        login(relay, f"10.77.0.{10 + n}", now=NOW + n)
    assert relay.stats()["replay_cache_entries"] == 16
    late = FakeSession()
    relay.on_connect(late)
    assert relay.handle_frame(late, auth_frame("10.77.0.99", NOW + 20), NOW + 20) == [
        Close(late, CloseCode.TRY_AGAIN_LATER, "server busy, try again later")
    ]
    # Nothing was evicted: every remembered login is still refused as a replay.
    replayer = FakeSession()
    relay.on_connect(replayer)
    feed(relay, replayer, auth_frame("10.77.0.1"), NOW + 21)
    assert replayer.close_code == CloseCode.STALE_OR_REPLAYED
    assert relay.stats()["limits"] == {"replay_cache_full": 1}
    # Logged-in clients are still relayed, and once the window has passed the
    # cache empties and logins are taken again.
    assert_relays(relay, good, peer, NOW + 21)
    later = NOW + 400
    login(relay, "10.77.0.99", now=later)


def test_4007_is_retryable_and_explained() -> None:
    assert CloseCode.TRY_AGAIN_LATER == 4007
    assert CloseCode.TRY_AGAIN_LATER not in FATAL_CLOSE_CODES
    assert "retrying" in CLOSE_REASONS[CloseCode.TRY_AGAIN_LATER]


# -- broadcasts ------------------------------------------------------------------------


def test_a_broadcast_flood_is_cut_to_the_token_bucket_and_the_sender_stays() -> None:
    relay = relay_with(broadcast_rate=10)  # bursts of 20
    flooder = login(relay, "10.77.0.1", vmac=VMAC_A)
    good = login(relay, "10.77.0.2", vmac=VMAC_B)
    listener = login(relay, "10.77.0.3", vmac=VMAC_C)
    broadcast = forward("10.77.0.1", "10.77.0.255", b"flood")
    for _ in range(1000):
        feed(relay, flooder, broadcast)
    assert flooder.closes == []
    assert listener.sent.count(broadcast) == 20
    stats = relay.stats()
    assert stats["drops"]["broadcast_rate"] == 980
    assert stats["limits"]["broadcast_rate"] == 980
    # Other clients' broadcasts have their own buckets, and unicast is not limited.
    from_good = forward("10.77.0.2", "10.77.0.255", b"mine")
    feed(relay, good, from_good)
    assert listener.sent[-1] == from_good
    assert_relays(relay, flooder, good, NOW)
    # The bucket refills with time: half a second later, five more pass.
    before = listener.sent.count(broadcast)
    for _ in range(100):
        feed(relay, flooder, broadcast, NOW + 0.5)
    assert listener.sent.count(broadcast) - before == 5


@pytest.mark.parametrize("kind", ["discovery", "general"])
def test_discovery_and_general_broadcasts_share_the_bucket(kind: str) -> None:
    relay = relay_with(broadcast_rate=1)  # bursts of 2
    flooder = login(relay, "10.77.0.1", vmac=VMAC_A)
    listener = login(relay, "10.77.0.3", vmac=VMAC_C)
    if kind == "discovery":
        frame = Discovery(ip("10.77.0.1"), BROADCAST).encode()
    else:
        frame = General(7, 0, ip("10.77.0.1"), BROADCAST, b"x").encode()
    for _ in range(50):
        feed(relay, flooder, frame)
    assert flooder.closes == []
    assert listener.sent.count(frame) == 2
    assert relay.stats()["limits"] == {"broadcast_rate": 48}


def test_an_oversized_broadcast_is_dropped_and_counted() -> None:
    relay = relay_with(max_broadcast_size=200)
    sender = login(relay, "10.77.0.1", vmac=VMAC_A)
    listener = login(relay, "10.77.0.3", vmac=VMAC_C)
    big = forward("10.77.0.1", "10.77.0.255", bytes(400))
    small = forward("10.77.0.1", "10.77.0.255", bytes(100))
    feed(relay, sender, big)
    feed(relay, sender, small)
    assert listener.sent == [small]
    assert sender.closes == []
    assert relay.stats()["drops"]["broadcast_too_large"] == 1
    assert relay.stats()["limits"] == {"broadcast_size": 1}
    # The size cap is for fan-out only: a unicast of that size is relayed.
    unicast = forward("10.77.0.1", "10.77.0.3", bytes(400))
    feed(relay, sender, unicast)
    assert listener.sent[-1] == unicast


# -- the DHCP pool ---------------------------------------------------------------------


def vmac(n: int) -> str:
    return f"{n:016x}"


def take_address(relay: Relay, host: str, n: int, now: float = NOW) -> FakeSession:
    session = FakeSession(f"{host}:{1000 + n}")
    relay.on_connect(session)
    feed(relay, session, vmac_frame(vmac(n), int(now)), now)
    granted = request_address(relay, session, now=int(now))
    if granted is not None:
        feed(relay, session, auth_frame(str(granted.ip), int(now)), now)
    return session


def test_one_source_address_gets_at_most_max_leases_per_ip_vmacs() -> None:
    relay = relay_with(max_leases_per_ip=4)
    held = [take_address(relay, "203.0.113.5", n) for n in range(4)]
    assert all(session.authenticated for session in held)
    extra = take_address(relay, "203.0.113.5", 4)
    assert extra.closes == [
        (CloseCode.TRY_AGAIN_LATER, "too many addresses for this source address, try again later")
    ]
    assert relay.stats()["limits"] == {"dhcp_leases_per_ip": 1}
    assert relay.stats()["dhcp_leases"] == 4
    # Another source address is served as usual.
    good = take_address(relay, "198.51.100.1", 100)
    assert good.authenticated
    assert_relays(relay, good, held[0], NOW)
    # A vmac of that address that already holds a lease comes back to it.
    relay.on_disconnect(held[0])
    back = take_address(relay, "203.0.113.5", 0, NOW + 1)
    assert back.authenticated and back.tun_ip == held[0].tun_ip


def test_a_gone_client_of_the_source_address_makes_room_for_a_new_vmac() -> None:
    relay = relay_with(max_leases_per_ip=2)
    first, second = (take_address(relay, "203.0.113.5", n) for n in range(2))
    relay.on_disconnect(first)
    third = take_address(relay, "203.0.113.5", 2, NOW + 1)
    assert third.authenticated
    assert relay.lease_of(vmac(0)) is None  # the stale lease made room
    assert relay.lease_of(vmac(1)) == second.tun_ip
    assert relay.stats()["dhcp_leases"] == 2


def test_an_exhausted_pool_is_retryable_and_the_pool_serves_again_when_a_client_leaves() -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.9.0.0/29"))  # six hosts
    sessions = [take_address(relay, f"192.0.2.{n}", n) for n in range(6)]
    late = take_address(relay, "198.51.100.1", 6)
    assert late.closes == [(CloseCode.TRY_AGAIN_LATER, "dhcp range exhausted, try again later")]
    relay.on_disconnect(sessions[2])
    retried = take_address(relay, "198.51.100.1", 6, NOW + 1)
    assert retried.authenticated
    assert retried.tun_ip == IPv4Interface("10.9.0.3/29").ip


# -- the building blocks ---------------------------------------------------------------


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    # A clock stepping backwards gives nothing away.
    assert not bucket.take(-100.0)
    assert bucket.take(0.5)  # 0.5 s after the step back, one token again


def test_a_bucket_table_stays_bounded_under_many_keys() -> None:
    overall = TokenBucket(rate=1000, burst=1000, now=0.0)
    table = BucketTable(rate=1, burst=1, size=3, overall=overall)
    for n in range(10_000):
        table.take(f"198.51.{n // 256}.{n % 256}", 0.0)
    assert len(table) == 3
    # The overall bucket caps what fresh buckets of evicted keys give away.
    assert sum(table.take(f"k{n}", 0.0) for n in range(100)) == 0


def test_the_log_throttle_lets_one_line_through_per_interval() -> None:
    throttle = LogThrottle(10.0)
    assert throttle.allow("x", 0.0) == 0
    assert throttle.allow("x", 1.0) is None
    assert throttle.allow("x", 2.0) is None
    assert throttle.allow("x", 11.0) == 2


def test_every_dropped_frame_counts_against_its_sender_only() -> None:
    """The WebSocket layer slows the reading of a session by these counts (junk_rate)."""
    relay = relay_with(broadcast_rate=1)
    sender = login(relay, "10.77.0.1", vmac=VMAC_A)
    receiver = login(relay, "10.77.0.2", vmac=VMAC_B)
    junk = [
        forward("10.77.0.9", "10.77.0.2"),  # spoofed source
        forward("10.77.0.1", "10.77.0.2")[:12],  # short
        forward("10.77.0.1", "10.77.0.99"),  # nobody there
        bytes((200,)) + b"future message",  # unknown type
    ]
    for frame in junk:
        feed(relay, sender, frame)
    assert sender.dropped_frames == len(junk)
    feed(relay, sender, forward("10.77.0.1", "10.77.0.2"))
    assert sender.dropped_frames == len(junk)
    assert receiver.dropped_frames == 0
    assert receiver.sent[-1] == forward("10.77.0.1", "10.77.0.2")
