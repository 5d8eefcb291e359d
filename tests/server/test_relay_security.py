"""Security and robustness of the relay core (ARCHITECTURE.md, "Security and robustness")."""

import logging
from ipaddress import IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pvpn.config import SdwanRule
from p2pvpn.server.relay import MAX_FRAME_SIZE, Relay
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import BROADCAST, Discovery, General, LanAddress, Udp4Conn, WsType
from tests.server import (
    NOW,
    PASSWORD,
    VMAC_A,
    VMAC_B,
    FakeSession,
    auth_frame,
    expttun_frame,
    feed,
    forward,
    ip,
    login,
    vmac_frame,
)

# -- stale and replayed login messages --------------------------------------------------


@pytest.mark.parametrize("skew", [-301, 301, -10_000_000])
def test_stale_auth_closes_4002(skew: int) -> None:
    relay = Relay(PASSWORD)
    session = FakeSession()
    feed(relay, session, auth_frame("10.0.0.1", NOW + skew), NOW)
    assert session.close_code == CloseCode.STALE_OR_REPLAYED
    assert relay.session_for(ip("10.0.0.1")) is None


@pytest.mark.parametrize("skew", [-300, 300])
def test_auth_at_the_edge_of_the_window_is_accepted(skew: int) -> None:
    relay = Relay(PASSWORD)
    login(relay, "10.0.0.1", now=NOW + skew, session=None)  # the clock below is NOW
    session = FakeSession()
    feed(relay, session, auth_frame("10.0.0.2", NOW + skew), NOW)
    assert session.closes == []


@pytest.mark.parametrize(
    "frame", [vmac_frame(VMAC_A, NOW - 301), expttun_frame("0.0.0.0/0", NOW + 400)]
)
def test_stale_vmac_and_expttun_close_4002(frame: bytes) -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    session = FakeSession()
    feed(relay, session, frame, NOW)
    assert session.close_code == CloseCode.STALE_OR_REPLAYED
    assert session.sent == []


def test_replayed_auth_closes_4002_and_leaves_the_victim_alone() -> None:
    relay = Relay(PASSWORD)
    victim = login(relay, "10.0.0.1")
    attacker = FakeSession("203.0.113.66:1234")
    feed(relay, attacker, auth_frame("10.0.0.1"), NOW + 10)
    assert attacker.close_code == CloseCode.STALE_OR_REPLAYED
    assert victim.closes == []
    assert relay.session_for(ip("10.0.0.1")) is victim


def test_replayed_vmac_closes_4002() -> None:
    relay = Relay(PASSWORD)
    feed(relay, FakeSession(), vmac_frame(VMAC_A), NOW)
    replayer = FakeSession()
    feed(relay, replayer, vmac_frame(VMAC_A), NOW + 1)
    assert replayer.close_code == CloseCode.STALE_OR_REPLAYED


def test_expttun_in_the_same_second_from_two_installations_is_not_a_replay() -> None:
    """The EXPTTUN hash covers only the timestamp; the vmac tells requests apart."""
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    first, second = FakeSession(), FakeSession()
    for session, vmac in ((first, VMAC_A), (second, VMAC_B)):
        feed(relay, session, vmac_frame(vmac), NOW)
        feed(relay, session, expttun_frame(), NOW)
    assert first.closes == second.closes == []
    replayer = FakeSession()
    feed(relay, replayer, vmac_frame(VMAC_A, NOW + 1), NOW + 1)
    feed(relay, replayer, expttun_frame(), NOW + 1)
    assert replayer.close_code == CloseCode.STALE_OR_REPLAYED


def test_replay_cache_is_pruned_after_the_window() -> None:
    relay = Relay(PASSWORD)
    for n in range(1, 6):
        login(relay, f"10.0.0.{n}")
    assert relay.stats()["replay_cache_entries"] == 5
    login(relay, "10.0.1.1", now=NOW + 301)
    assert relay.stats()["replay_cache_entries"] == 1


def test_a_bad_hash_does_not_enter_the_replay_cache() -> None:
    relay = Relay(PASSWORD)
    for n in range(50):
        feed(relay, FakeSession(), auth_frame(f"10.0.0.{n + 1}", password="x"), NOW)
    assert relay.stats()["replay_cache_entries"] == 0


# -- source address enforcement ---------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        Udp4Conn(ip("10.0.0.9"), ip("10.0.0.2"), ip("198.51.100.1"), 4000).encode(),
        Discovery(ip("10.0.0.9"), BROADCAST).encode(),
        LanAddress(ip("10.0.0.9"), ip("10.0.0.2"), ip("192.168.1.9"), 4000).encode(),
        General(3, 0, ip("10.0.0.9"), ip("10.0.0.2"), b"").encode(),
    ],
)
def test_spoofed_signal_closes_the_sender_4005(frame: bytes) -> None:
    relay = Relay(PASSWORD)
    spoofer, victim = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, spoofer, frame, NOW)
    assert spoofer.close_code == CloseCode.PROTOCOL_VIOLATION
    assert victim.sent == []
    assert victim.closes == []
    assert relay.session_for(ip("10.0.0.2")) is victim


def test_spoofed_forward_is_dropped_counted_and_logged_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = Relay(PASSWORD)
    sender, receiver = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    with caplog.at_level(logging.WARNING, logger="p2pvpn.server.relay"):
        for _ in range(5):
            feed(relay, sender, forward("10.0.0.9", "10.0.0.2"), NOW)
    assert receiver.sent == []
    assert sender.closes == []
    assert relay.stats()["drops"] == {"spoofed_source": 5}
    spoof_lines = [r for r in caplog.records if "with source 10.0.0.9" in r.getMessage()]
    assert len(spoof_lines) == 1
    # The sender keeps working.
    legit = forward("10.0.0.1", "10.0.0.2")
    feed(relay, sender, legit, NOW)
    assert receiver.sent == [legit]
    # After the interval the next drop is logged again, with the suppressed count.
    with caplog.at_level(logging.WARNING, logger="p2pvpn.server.relay"):
        feed(relay, sender, forward("10.0.0.9", "10.0.0.2"), NOW + 11)
    assert "4 similar drops" in caplog.records[-1].getMessage()


def test_an_sdwan_next_hop_may_forward_replies_from_its_lan() -> None:
    rule = SdwanRule(IPv4Network("10.77.0.0/24"), IPv4Network("172.30.0.0/16"), ip("10.77.0.9"))
    relay = Relay(PASSWORD, sdwan=[rule])
    gateway, client = login(relay, "10.77.0.9"), login(relay, "10.77.0.1")
    reply = forward("172.30.4.5", "10.77.0.1")
    feed(relay, gateway, reply, NOW)
    assert client.sent[-1] == reply
    # Nobody else may use those sources.
    feed(relay, client, forward("172.30.4.5", "10.77.0.9"), NOW)
    assert relay.stats()["drops"] == {"spoofed_source": 1}


# -- malformed input and internal errors -------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        auth_frame("10.0.0.1")[:44],
        vmac_frame(VMAC_A)[:56],
        b"\x04" + b"\xff" * 56,  # VMAC that is not ASCII
        b"\x02" + bytes(8) + b"not-a-cidr".ljust(32, b"\0") + bytes(32),
    ],
)
def test_malformed_frames_close_4005(frame: bytes) -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    session = FakeSession()
    feed(relay, session, frame, NOW)
    assert session.close_code == CloseCode.PROTOCOL_VIOLATION


def test_oversized_frame_into_the_core_closes_4005() -> None:
    relay = Relay(PASSWORD)
    sender, other = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, sender, forward("10.0.0.1", "10.0.0.2", bytes(MAX_FRAME_SIZE)), NOW)
    assert sender.close_code == CloseCode.PROTOCOL_VIOLATION
    assert other.sent == []
    assert relay.session_for(ip("10.0.0.2")) is other
    largest = forward("10.0.0.2", "10.0.0.3", bytes(MAX_FRAME_SIZE - 21))
    assert len(largest) == MAX_FRAME_SIZE
    feed(relay, other, largest, NOW)
    assert other.closes == []


def test_a_bug_closes_only_the_session_that_hit_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay(PASSWORD)
    bystander = login(relay, "10.0.0.2")
    victim = login(relay, "10.0.0.1")

    def broken(*args: Any) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(relay, "_relay_signal", broken)
    with caplog.at_level(logging.ERROR, logger="p2pvpn.server.relay"):
        feed(relay, victim, Discovery(ip("10.0.0.1"), BROADCAST).encode(), NOW)
    assert victim.close_code == 1011
    assert bystander.closes == []
    assert relay.session_for(ip("10.0.0.2")) is bystander
    assert relay.stats()["internal_errors"] == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None  # logged with traceback


def test_password_never_appears_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    with caplog.at_level(logging.DEBUG):
        session = login(relay, "10.77.0.1", vmac=VMAC_A)
        feed(relay, session, expttun_frame(now=NOW + 1), NOW + 1)
        feed(relay, FakeSession(), auth_frame("10.0.0.1", password="wrong"), NOW)
        relay.on_disconnect(session)
    assert caplog.records
    assert PASSWORD not in caplog.text


_TYPE_BYTES = st.sampled_from([int(kind) for kind in WsType] + [7, 100])
_FRAMES = st.one_of(
    st.binary(max_size=200),
    st.tuples(_TYPE_BYTES, st.binary(max_size=120)).map(lambda t: bytes([t[0]]) + t[1]),
    # FORWARDs with the sender's own source to arbitrary destinations.
    st.tuples(st.binary(min_size=12, max_size=12), st.binary(min_size=4, max_size=4)).map(
        lambda t: b"\x01\x45" + t[0][:11] + ip("10.0.0.1").packed + t[1]
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_FRAMES, min_size=1, max_size=6))
def test_garbage_never_raises_nor_touches_another_session(frames: list[bytes]) -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.0.0.0/24"))
    fuzzed = login(relay, "10.0.0.1", vmac=VMAC_A)
    other = login(relay, "10.0.0.2", vmac=VMAC_B)
    third = login(relay, "10.0.0.3")
    for frame in frames:
        feed(relay, fuzzed, frame, NOW)
    assert relay.stats()["internal_errors"] == 0
    assert other.closes == []
    assert other.authenticated
    assert relay.session_for(ip("10.0.0.2")) is other
    assert relay.lease_of(VMAC_B) == ip("10.0.0.2")
    unicast = forward("10.0.0.3", "10.0.0.2")
    feed(relay, third, unicast, NOW)
    assert other.sent[-1] == unicast
