"""The per-peer state machine (PROTOCOL 4) second by second, with a fake clock."""

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from p2pvpn.client.peer import (
    PATH_CHALLENGE_TIMEOUT,
    RETRY_MAX,
    RETRY_MIN,
    Address,
    PathDown,
    PathUp,
    Peer,
    PeerAction,
    PeerState,
    RequestStun,
    SendDelayProbe,
    SendHeartbeat,
    SendLanAddress,
    SendPathChallenge,
    SendPublicAddress,
    StateChanged,
    is_lan_address,
)

S = PeerState
TUN = IPv4Address("192.168.202.2")
PUB: Address = ("198.51.100.7", 4000)
PUB2: Address = ("203.0.113.9", 5000)
LAN: Address = ("192.168.1.20", 4000)
LAN2: Address = ("10.0.0.5", 4001)
FORGETTING = (S.INIT, S.WAITING, S.FAILED)


def make(*, stun: bool = True, lan: bool = True, probes: bool = False, now: float = 0.0) -> Peer:
    return Peer(TUN, now, stun_enabled=stun, lan_enabled=lan, delay_probes=probes)


def change(actions: list[PeerAction]) -> tuple[PeerState, PeerState] | None:
    changes = [a for a in actions if isinstance(a, StateChanged)]
    assert len(changes) <= 1
    return (changes[0].old, changes[0].new) if changes else None


def without_change(actions: list[PeerAction]) -> list[PeerAction]:
    return [a for a in actions if not isinstance(a, StateChanged)]


# Each helper drives a fresh peer into a state at time `now` (all events at `now`).


def preparing(now: float = 0.0, **kw: bool) -> Peer:
    peer = make(now=now, **kw)
    peer.on_hint(now)
    assert peer.state is S.PREPARING
    return peer


def synchronizing(now: float = 0.0, **kw: bool) -> Peer:
    peer = preparing(now, **kw)
    peer.on_own_public_address(now)
    assert peer.state is S.SYNCHRONIZING
    return peer


def connecting(now: float = 0.0, **kw: bool) -> Peer:
    peer = preparing(now, **kw)
    peer.on_public_address(PUB, now)
    peer.on_own_public_address(now)
    assert peer.state is S.CONNECTING
    return peer


def connected(now: float = 0.0, source: Address = PUB, **kw: bool) -> Peer:
    peer = connecting(now, **kw)
    peer.on_heartbeat(source, True, now)
    assert peer.state is S.CONNECTED
    return peer


def waiting(now: float = 0.0, **kw: bool) -> Peer:
    peer = connecting(now - 10.0, **kw)
    peer.tick(now)
    assert peer.state is S.WAITING
    return peer


def failed(now: float = 0.0, **kw: bool) -> Peer:
    peer = preparing(now - 10.0, **kw)
    peer.tick(now)
    assert peer.state is S.FAILED
    return peer


def init(now: float = 0.0, **kw: bool) -> Peer:
    return make(now=now, **kw)


BUILDERS: dict[PeerState, Callable[..., Peer]] = {
    S.INIT: init,
    S.PREPARING: preparing,
    S.SYNCHRONIZING: synchronizing,
    S.CONNECTING: connecting,
    S.CONNECTED: connected,
    S.WAITING: waiting,
    S.FAILED: failed,
}


def assert_forgotten(peer: Peer) -> None:
    assert peer.public_address is None
    assert peer.lan_address is None
    assert peer.current_address is None
    assert peer.ack is False
    assert peer.rtt_ms is None


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("host", "lan"),
    [
        ("10.0.0.1", True),
        ("10.255.255.255", True),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("172.15.255.255", False),
        ("172.32.0.0", False),
        ("192.168.0.1", True),
        ("169.254.3.4", True),
        ("198.51.100.7", False),
        # is_private says True for these, but they are not LANs.
        ("127.0.0.1", False),
        ("198.18.0.1", False),
        ("192.0.0.8", False),
        ("100.64.0.1", False),
        ("not an address", False),
        ("::1", False),
    ],
)
def test_is_lan_address(host: str, lan: bool) -> None:
    assert is_lan_address(host) is lan


def test_new_peer() -> None:
    peer = make(now=5.0)
    assert peer.tun_ip == TUN
    assert peer.state is S.INIT
    assert peer.state_since == 5.0
    assert peer.retry == RETRY_MIN
    assert peer.last_ack_heartbeat is None
    assert_forgotten(peer)
    assert "INIT" in repr(peer)


@pytest.mark.parametrize("state", list(S))
def test_state_changed_is_the_first_action_and_carries_a_reason(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    for actions in (peer.tick(100.0), peer.on_public_address(PUB2, 100.0)):
        if change(actions):
            assert isinstance(actions[0], StateChanged)
            assert actions[0].reason


# --------------------------------------------------------------------- INIT


def test_init_tick_does_nothing() -> None:
    peer = make()
    for second in range(5000):
        assert peer.tick(float(second)) == []
    assert peer.state is S.INIT


def test_init_hint_goes_preparing() -> None:
    peer = make()
    actions = peer.on_hint(3.0)
    assert actions == [StateChanged(S.INIT, S.PREPARING, "relayed packet or discovery from peer")]
    assert peer.state_since == 3.0
    assert peer.retry == RETRY_MIN


@pytest.mark.parametrize("state", [s for s in S if s is not S.INIT])
def test_hint_ignored_outside_init(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    assert peer.on_hint(1.0) == []
    assert peer.state is state


def test_init_public_address_goes_preparing_and_sends_lan_address() -> None:
    peer = make()
    actions = peer.on_public_address(PUB, 1.0)
    assert change(actions) == (S.INIT, S.PREPARING)
    assert "198.51.100.7:4000" in actions[0].reason  # type: ignore[union-attr]
    assert without_change(actions) == [SendLanAddress()]
    assert peer.public_address == PUB


def test_init_lan_address_ignored() -> None:
    peer = make()
    assert peer.on_lan_address(LAN, 1.0) == []
    assert peer.state is S.INIT
    assert peer.lan_address is None


# ---------------------------------------------------------------- PREPARING


def test_preparing_requests_stun_for_ten_seconds() -> None:
    peer = preparing(100.0)
    for now in (100.0, 101.0, 105.0, 109.0, 109.9):
        assert peer.tick(now) == [RequestStun()]
    assert peer.state is S.PREPARING


def test_preparing_times_out_to_failed() -> None:
    peer = preparing(100.0)
    actions = peer.tick(110.1)
    assert change(actions) == (S.PREPARING, S.FAILED)
    assert "STUN" in actions[0].reason  # type: ignore[union-attr]
    assert without_change(actions) == []
    assert peer.retry == RETRY_MIN


def test_preparing_limit_is_strict() -> None:
    # Candy: checkActivityWithin(10 s) is `elapsed < 10 s`.
    peer = preparing(0.0)
    assert change(peer.tick(10.0)) == (S.PREPARING, S.FAILED)


def test_without_stun_preparing_fails_at_first_tick() -> None:
    peer = preparing(0.0, stun=False)
    actions = peer.tick(0.0)
    assert change(actions) == (S.PREPARING, S.FAILED)
    assert "no STUN server" in actions[0].reason  # type: ignore[union-attr]
    assert RequestStun() not in actions


def test_own_public_address_without_peer_address_goes_synchronizing() -> None:
    peer = preparing(0.0)
    actions = peer.on_own_public_address(2.0)
    assert actions[0] == StateChanged(
        S.PREPARING, S.SYNCHRONIZING, "own public address known, waiting for the peer's"
    )
    assert actions[1:] == [SendPublicAddress(), SendLanAddress()]
    assert peer.state_since == 2.0


def test_own_public_address_with_peer_address_goes_connecting() -> None:
    peer = preparing(0.0)
    peer.on_public_address(PUB, 1.0)
    actions = peer.on_own_public_address(2.0)
    assert change(actions) == (S.PREPARING, S.CONNECTING)
    assert without_change(actions) == [SendPublicAddress(), SendLanAddress()]


def test_lan_address_is_sent_even_when_both_peers_finish_stun_first() -> None:
    # Regression: both sides answered by STUN before either UDP4CONN arrived
    # went SYNCHRONIZING -> CONNECTING without ever sending a LAN address.
    peer = preparing(0.0)
    actions = peer.on_own_public_address(1.0)
    assert SendLanAddress() in actions
    assert SendLanAddress() not in peer.on_public_address(PUB, 1.5)


def test_lan_address_not_sent_with_the_public_one_when_lan_is_disabled() -> None:
    peer = preparing(0.0, lan=False)
    assert SendLanAddress() not in peer.on_own_public_address(1.0)


@pytest.mark.parametrize("state", [s for s in S if s is not S.PREPARING])
def test_own_public_address_ignored_outside_preparing(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    assert peer.on_own_public_address(1.0) == []
    assert peer.state is state


def test_preparing_public_address_is_stored_and_answered_with_lan_address() -> None:
    peer = preparing(0.0)
    assert peer.on_public_address(PUB, 5.0) == [SendLanAddress()]
    assert peer.state is S.PREPARING
    assert peer.public_address == PUB


def test_preparing_public_address_restarts_the_timer() -> None:
    # Candy calls updateState(PREPARING), which refreshes lastActiveTime.
    peer = preparing(0.0)
    peer.on_public_address(PUB, 5.0)
    assert peer.state_since == 0.0
    assert peer.tick(14.9) == [RequestStun()]
    assert change(peer.tick(15.1)) == (S.PREPARING, S.FAILED)


def test_preparing_public_address_without_lan_sends_nothing() -> None:
    peer = preparing(0.0, lan=False)
    assert peer.on_public_address(PUB, 1.0) == []
    assert peer.public_address == PUB


def test_preparing_lan_address_stored() -> None:
    peer = preparing(0.0)
    assert peer.on_lan_address(LAN, 1.0) == []
    assert peer.lan_address == LAN
    assert peer.state is S.PREPARING


def test_preparing_heartbeat_with_ack_connects() -> None:
    peer = preparing(0.0)
    actions = peer.on_heartbeat(PUB, True, 1.0)
    assert actions == [
        StateChanged(S.PREPARING, S.CONNECTED, "heartbeat ack from 198.51.100.7:4000"),
        PathUp(PUB),
        SendDelayProbe(PUB),
    ]


def test_heartbeat_in_preparing_teaches_the_public_address() -> None:
    # Candy stores a heartbeat's public source as the peer's public address,
    # so the STUN answer then leads straight to CONNECTING.
    peer = preparing(0.0)
    assert peer.on_heartbeat(PUB, False, 1.0) == []
    assert peer.ack is True
    assert peer.public_address == PUB
    assert change(peer.on_own_public_address(2.0)) == (S.PREPARING, S.CONNECTING)


# ------------------------------------------------------------ SYNCHRONIZING


def test_synchronizing_without_lan_address_sends_nothing() -> None:
    peer = synchronizing(0.0)
    assert peer.tick(1.0) == []
    assert peer.state is S.SYNCHRONIZING


def test_synchronizing_heartbeats_the_lan_address() -> None:
    peer = synchronizing(0.0)
    peer.on_lan_address(LAN, 0.5)
    assert peer.tick(1.0) == [SendHeartbeat(LAN, False)]


def test_synchronizing_timer_edges() -> None:
    peer = synchronizing(50.0)
    peer.on_lan_address(LAN, 50.0)
    assert peer.tick(59.9) == [SendHeartbeat(LAN, False)]
    actions = peer.tick(60.1)
    assert change(actions) == (S.SYNCHRONIZING, S.FAILED)
    assert actions[0].reason == "timeout after 10 s in SYNCHRONIZING"  # type: ignore[union-attr]
    assert_forgotten(peer)


def test_synchronizing_public_address_goes_connecting() -> None:
    peer = synchronizing(0.0)
    actions = peer.on_public_address(PUB, 8.0)
    assert change(actions) == (S.SYNCHRONIZING, S.CONNECTING)
    assert without_change(actions) == []
    assert peer.public_address == PUB
    # CONNECTING gets its own 10 s from the transition.
    assert peer.tick(17.9) == [SendHeartbeat(PUB, False)]
    assert change(peer.tick(18.1)) == (S.CONNECTING, S.WAITING)


def test_synchronizing_heartbeat_sets_ack() -> None:
    peer = synchronizing(0.0)
    peer.on_lan_address(LAN, 0.0)
    assert peer.on_heartbeat(LAN, False, 1.0) == []
    assert peer.ack is True
    assert peer.tick(2.0) == [SendHeartbeat(LAN, True)]


def test_synchronizing_heartbeat_with_ack_connects() -> None:
    peer = synchronizing(0.0)
    actions = peer.on_heartbeat(LAN, True, 1.0)
    assert change(actions) == (S.SYNCHRONIZING, S.CONNECTED)
    assert without_change(actions) == [PathUp(LAN), SendDelayProbe(LAN)]
    assert peer.current_address == LAN


# --------------------------------------------------------------- CONNECTING


def test_connecting_heartbeats_public_and_lan() -> None:
    peer = connecting(0.0)
    assert peer.tick(1.0) == [SendHeartbeat(PUB, False)]
    peer.on_lan_address(LAN, 1.5)
    assert peer.tick(2.0) == [SendHeartbeat(PUB, False), SendHeartbeat(LAN, False)]


def test_connecting_timer_edges_and_waiting() -> None:
    peer = connecting(20.0)
    peer.on_lan_address(LAN, 20.0)
    assert peer.tick(29.9) == [SendHeartbeat(PUB, False), SendHeartbeat(LAN, False)]
    actions = peer.tick(30.1)
    assert actions == [StateChanged(S.CONNECTING, S.WAITING, "timeout after 10 s in CONNECTING")]
    assert peer.retry == RETRY_MIN
    assert_forgotten(peer)


def test_connecting_heartbeat_with_ack_connects() -> None:
    peer = connecting(0.0)
    actions = peer.on_heartbeat(PUB, True, 4.0)
    assert actions == [
        StateChanged(S.CONNECTING, S.CONNECTED, "heartbeat ack from 198.51.100.7:4000"),
        PathUp(PUB),
        SendDelayProbe(PUB),
    ]
    assert peer.state_since == 4.0
    assert peer.last_ack_heartbeat == 4.0
    assert peer.ack is True


def test_connecting_heartbeat_without_ack_only_sets_ack() -> None:
    peer = connecting(0.0)
    assert peer.on_heartbeat(PUB, False, 1.0) == []
    assert peer.state is S.CONNECTING
    assert peer.ack is True
    assert peer.current_address == PUB
    assert peer.tick(2.0) == [SendHeartbeat(PUB, True)]


def test_connecting_heartbeat_from_new_public_port_is_punched_too() -> None:
    # Candy: a heartbeat's public source replaces the stored public address.
    peer = connecting(0.0)
    peer.on_heartbeat(PUB2, False, 1.0)
    assert peer.public_address == PUB2
    assert peer.tick(2.0) == [SendHeartbeat(PUB2, True)]


def test_connecting_public_address_only_updates() -> None:
    peer = connecting(0.0)
    assert peer.on_public_address(PUB2, 5.0) == []
    assert peer.state is S.CONNECTING
    assert peer.public_address == PUB2
    assert peer.state_since == 0.0
    assert change(peer.tick(10.1)) == (S.CONNECTING, S.WAITING)


# ---------------------------------------------------------------- CONNECTED


def test_connected_heartbeats_the_path() -> None:
    peer = connected(0.0)
    peer.on_lan_address(LAN, 0.0)
    assert peer.tick(1.0) == [SendHeartbeat(PUB, True)]
    assert peer.tick(2.0) == [SendHeartbeat(PUB, True)]


def test_connected_ack_window() -> None:
    peer = connected(0.0)
    assert peer.tick(2.9) == [SendHeartbeat(PUB, True)]
    actions = peer.tick(3.1)
    assert actions == [
        StateChanged(S.CONNECTED, S.INIT, "no heartbeat with ack for 3 s"),
        PathDown(),
    ]
    assert_forgotten(peer)
    assert peer.last_ack_heartbeat is None


def test_connected_heartbeat_with_ack_refreshes() -> None:
    peer = connected(0.0)
    assert peer.on_heartbeat(PUB, True, 2.0) == []
    assert peer.last_ack_heartbeat == 2.0
    assert peer.state_since == 0.0
    assert peer.tick(4.9) == [SendHeartbeat(PUB, True)]
    assert change(peer.tick(5.1)) == (S.CONNECTED, S.INIT)


def test_connected_heartbeat_without_ack_does_not_refresh() -> None:
    peer = connected(0.0)
    assert peer.on_heartbeat(PUB, False, 2.0) == []
    assert change(peer.tick(3.1)) == (S.CONNECTED, S.INIT)


def test_connected_public_address_only_updates() -> None:
    peer = connected(0.0)
    assert peer.on_public_address(PUB2, 1.0) == []
    assert peer.state is S.CONNECTED
    assert peer.public_address == PUB2
    assert peer.current_address == PUB


def test_connected_delay_probe_every_60_ticks() -> None:
    peer = connected(0.0, probes=True)
    probes = []
    for second in range(1, 181):
        peer.on_heartbeat(PUB, True, float(second))
        actions = peer.tick(float(second))
        assert actions[0] == SendHeartbeat(PUB, True)
        if SendDelayProbe(PUB) in actions:
            probes.append(second)
    assert probes == [60, 120, 180]


def test_connected_no_periodic_probe_without_relaying() -> None:
    peer = connected(0.0, probes=False)
    for second in range(1, 181):
        peer.on_heartbeat(PUB, True, float(second))
        assert peer.tick(float(second)) == [SendHeartbeat(PUB, True)]


def test_connected_stores_rtt_and_loses_it_on_init() -> None:
    peer = connected(0.0)
    assert peer.on_rtt(12.5, 1.0) == []
    assert peer.rtt_ms == 12.5
    peer.tick(10.0)
    assert peer.state is S.INIT
    assert peer.rtt_ms is None


@pytest.mark.parametrize("state", [s for s in S if s is not S.CONNECTED])
def test_rtt_ignored_unless_connected(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    assert peer.on_rtt(12.5, 1.0) == []
    assert peer.rtt_ms is None


def test_connected_reconnects_after_loss() -> None:
    peer = connected(0.0)
    peer.tick(3.5)
    assert peer.state is S.INIT
    assert change(peer.on_hint(4.0)) == (S.INIT, S.PREPARING)


# ------------------------------------------------------------------ WAITING


def test_waiting_for_retry_seconds() -> None:
    peer = waiting(10.0)
    assert peer.state_since == 10.0
    assert peer.tick(11.0) == []
    assert peer.tick(39.9) == []
    actions = peer.tick(40.1)
    assert actions == [StateChanged(S.WAITING, S.INIT, "back-off of 30 s over")]
    assert peer.retry == 60


def test_waiting_public_address_goes_preparing_keeping_back_off() -> None:
    peer = waiting(0.0)
    actions = peer.on_public_address(PUB, 1.0)
    assert change(actions) == (S.WAITING, S.PREPARING)
    assert without_change(actions) == [SendLanAddress()]
    assert peer.public_address == PUB
    assert peer.retry == RETRY_MIN


def test_waiting_lan_address_ignored() -> None:
    peer = waiting(0.0)
    assert peer.on_lan_address(LAN, 1.0) == []
    assert peer.state is S.WAITING
    assert peer.lan_address is None


# ------------------------------------------------------------------- FAILED


def test_failed_ticks_do_nothing() -> None:
    peer = failed(0.0)
    for second in range(1, 10000, 7):
        assert peer.tick(float(second)) == []
    assert peer.state is S.FAILED


def test_failed_left_on_public_address() -> None:
    peer = failed(0.0)
    actions = peer.on_public_address(PUB, 1.0)
    assert change(actions) == (S.FAILED, S.PREPARING)
    assert without_change(actions) == [SendLanAddress()]
    assert peer.public_address == PUB


def test_failed_left_on_lan_address() -> None:
    peer = failed(0.0)
    actions = peer.on_lan_address(LAN, 1.0)
    assert change(actions) == (S.FAILED, S.PREPARING)
    assert without_change(actions) == []
    assert peer.lan_address == LAN


def test_failed_not_left_on_anything_else() -> None:
    peer = failed(0.0)
    assert peer.on_hint(1.0) == []
    assert peer.on_own_public_address(1.0) == []
    assert peer.on_heartbeat(PUB, True, 1.0) == []
    assert peer.on_rtt(5.0, 1.0) == []
    assert peer.tick(100000.0) == []
    assert peer.state is S.FAILED


# ------------------------------------------------------------------ details


@pytest.mark.parametrize("state", FORGETTING)
@pytest.mark.parametrize("ack", [False, True])
def test_heartbeat_ignored_in_init_waiting_failed(state: PeerState, ack: bool) -> None:
    peer = BUILDERS[state](0.0)
    assert peer.on_heartbeat(PUB, ack, 1.0) == []
    assert peer.state is state
    assert_forgotten(peer)


@pytest.mark.parametrize("state", [S.PREPARING, S.SYNCHRONIZING, S.CONNECTING, S.CONNECTED])
def test_any_heartbeat_sets_ack_and_path(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    peer.on_heartbeat(PUB2, False, 1.0)
    assert peer.ack is True
    if state is not S.CONNECTED:
        assert peer.current_address == PUB2


def challenge_of(actions: list[PeerAction]) -> SendPathChallenge:
    (challenge,) = actions
    assert isinstance(challenge, SendPathChallenge)
    return challenge


def move_path(peer: Peer, source: Address, now: float) -> list[PeerAction]:
    """A CONNECTED peer's heartbeat from ``source``, our challenge, its echo from there."""
    challenge = challenge_of(peer.on_heartbeat(source, True, now))
    assert challenge.address == source
    assert peer.path_challenge == (source, challenge.timestamp_ms)
    return peer.on_path_echo(source, challenge.timestamp_ms, now + 0.05)


def test_lan_path_preferred_over_public() -> None:
    peer = connected(0.0, source=PUB)
    assert move_path(peer, LAN, 1.0) == [PathUp(LAN)]
    assert peer.current_address == LAN
    assert peer.lan_address == LAN
    # Never back from LAN to public: not even worth a challenge.
    assert peer.on_heartbeat(PUB2, True, 2.0) == []
    assert peer.path_challenge is None
    assert peer.current_address == LAN
    assert peer.tick(3.0) == [SendHeartbeat(LAN, True)]


def test_lan_seen_before_connecting_wins() -> None:
    peer = connecting(0.0)
    peer.on_heartbeat(LAN, False, 1.0)
    actions = peer.on_heartbeat(PUB, True, 1.5)
    assert without_change(actions) == [PathUp(LAN), SendDelayProbe(LAN)]


def test_public_path_follows_the_newest_public_source() -> None:
    # A NAT rebinding moves the path (Candy: real = address unless real is LAN),
    # here once the new address has answered a challenge.
    peer = connected(0.0, source=PUB)
    assert move_path(peer, PUB2, 1.0) == [PathUp(PUB2)]
    assert peer.public_address == PUB2
    assert peer.on_heartbeat(PUB2, True, 2.0) == []


def test_lan_path_follows_the_newest_lan_source() -> None:
    peer = connected(0.0, source=LAN)
    assert move_path(peer, LAN2, 1.0) == [PathUp(LAN2)]


def test_lan_disabled_ignores_lan_addresses_and_lan_heartbeats() -> None:
    peer = connecting(0.0, lan=False)
    assert peer.on_lan_address(LAN, 1.0) == []
    assert peer.lan_address is None
    # Candy drops heartbeats from LAN sources when local P2P is disabled.
    assert peer.on_heartbeat(LAN, True, 1.0) == []
    assert peer.state is S.CONNECTING
    assert peer.ack is False
    assert peer.tick(2.0) == [SendHeartbeat(PUB, False)]


def test_lan_disabled_failed_stays_failed_on_lan_address() -> None:
    peer = failed(0.0, lan=False)
    assert peer.on_lan_address(LAN, 1.0) == []
    assert peer.state is S.FAILED


def test_lan_disabled_never_sends_lan_address() -> None:
    for state in (S.INIT, S.WAITING, S.FAILED, S.PREPARING):
        peer = BUILDERS[state](0.0, lan=False)
        assert SendLanAddress() not in peer.on_public_address(PUB, 1.0)


def test_on_lan_path() -> None:
    assert not connected(0.0, source=PUB).on_lan_path
    assert connected(0.0, source=LAN).on_lan_path
    assert not make().on_lan_path


def test_disable_lan_while_connected_over_the_lan() -> None:
    peer = connected(0.0, source=LAN)
    peer.disable_lan()
    assert peer.lan_address is None
    assert peer.state is S.CONNECTED
    assert peer.current_address == LAN  # kept until something better arrives
    assert peer.on_heartbeat(LAN, True, 1.0) == []  # now dropped
    assert peer.last_ack_heartbeat == 0.0
    assert move_path(peer, PUB, 2.0) == [PathUp(PUB)]  # public replaces it
    assert not peer.on_lan_path
    assert peer.tick(3.0) == [SendHeartbeat(PUB, True)]


def test_disable_lan_times_out_a_lan_only_path() -> None:
    peer = connected(0.0, source=LAN)
    peer.disable_lan()
    peer.on_heartbeat(LAN, True, 2.0)
    assert change(peer.tick(3.1)) == (S.CONNECTED, S.INIT)


def test_disable_lan_before_connected_forgets_the_lan_path() -> None:
    peer = connecting(0.0)
    peer.on_lan_address(LAN2, 0.0)
    peer.on_heartbeat(LAN, False, 0.5)
    peer.disable_lan()
    assert peer.current_address is None
    assert peer.lan_address is None
    assert peer.tick(1.0) == [SendHeartbeat(PUB, True)]
    assert peer.on_lan_address(LAN, 1.0) == []
    actions = peer.on_heartbeat(PUB, True, 1.5)
    assert without_change(actions) == [PathUp(PUB), SendDelayProbe(PUB)]


def test_disable_lan_stops_sending_lan_addresses() -> None:
    peer = make()
    peer.disable_lan()
    assert peer.on_public_address(PUB, 0.0) == [
        StateChanged(S.INIT, S.PREPARING, "public address 198.51.100.7:4000 from peer")
    ]


@pytest.mark.parametrize(
    ("build", "expire_at"),
    [(connecting, 10.5), (synchronizing, 10.5), (connected, 3.5)],
)
def test_leaving_forgets_the_peer(build: Callable[..., Peer], expire_at: float) -> None:
    peer = build(0.0)
    peer.on_lan_address(LAN, 0.0)
    peer.on_heartbeat(LAN, False, 0.0)
    if peer.state is S.CONNECTED:
        peer.on_rtt(3.0, 0.0)
    peer.tick(expire_at)
    assert peer.state in FORGETTING
    assert_forgotten(peer)


def test_entering_preparing_keeps_what_is_known() -> None:
    peer = make()
    peer.on_public_address(PUB, 0.0)
    peer.on_lan_address(LAN, 0.0)
    assert (peer.public_address, peer.lan_address) == (PUB, LAN)


# ------------------------------------------------------------ path challenge


def test_heartbeat_from_another_address_is_challenged_not_believed() -> None:
    # What a third host replaying a captured heartbeat from its own address gets.
    peer = connected(0.0, source=PUB)
    assert peer.on_heartbeat(PUB2, True, 2.0) == [SendPathChallenge(PUB2, 2000)]
    assert peer.current_address == PUB
    assert peer.public_address == PUB
    assert peer.last_ack_heartbeat == 0.0  # no refresh: the path still times out
    assert peer.path_challenge == (PUB2, 2000)
    assert peer.tick(2.5) == [SendHeartbeat(PUB, True)]  # heartbeats stay on the path
    assert change(peer.tick(3.1)) == (S.CONNECTED, S.INIT)
    assert peer.path_challenge is None


def test_heartbeat_from_the_path_behaves_as_before() -> None:
    peer = connected(0.0, source=PUB)
    peer.on_heartbeat(PUB2, True, 1.0)
    assert peer.on_heartbeat(PUB, True, 2.0) == []
    assert peer.last_ack_heartbeat == 2.0
    assert peer.path_challenge == (PUB2, 1000)  # still waiting for PUB2


@pytest.mark.parametrize(
    ("source", "delta_ms"),
    [(PUB, 0), (LAN, 0), (("203.0.113.9", 5001), 0), (PUB2, 1), (PUB2, -1), (PUB2, -1000)],
)
def test_wrong_echo_does_nothing(source: Address, delta_ms: int) -> None:
    peer = connected(0.0, source=PUB)
    challenge = challenge_of(peer.on_heartbeat(PUB2, True, 1.0))
    assert peer.on_path_echo(source, challenge.timestamp_ms + delta_ms, 1.1) == []
    assert peer.current_address == PUB
    assert peer.last_ack_heartbeat == 0.0
    # A wrong echo does not cancel the challenge: the right one still counts.
    assert peer.on_path_echo(PUB2, challenge.timestamp_ms, 1.2) == [PathUp(PUB2)]


def test_right_echo_moves_the_path_and_refreshes_the_timer() -> None:
    peer = connected(0.0, source=PUB)
    challenge = challenge_of(peer.on_heartbeat(PUB2, True, 2.0))
    assert peer.on_path_echo(PUB2, challenge.timestamp_ms, 2.05) == [PathUp(PUB2)]
    assert peer.current_address == PUB2
    assert peer.public_address == PUB2
    assert peer.last_ack_heartbeat == 2.05
    assert peer.path_challenge is None
    assert peer.tick(5.0) == [SendHeartbeat(PUB2, True)]  # 3 s after the echo, not after 0
    # The same echo again (a replay) finds no challenge.
    assert peer.on_path_echo(PUB2, challenge.timestamp_ms, 5.1) == []
    assert change(peer.tick(5.1)) == (S.CONNECTED, S.INIT)


def test_echo_of_an_older_challenge_to_the_same_candidate_counts() -> None:
    # An echo slower than the challenge interval must not lose the race forever.
    peer = connected(0.0, source=PUB)
    first = challenge_of(peer.on_heartbeat(PUB2, True, 1.0))
    second = challenge_of(peer.on_heartbeat(PUB2, True, 2.0))
    assert second.timestamp_ms > first.timestamp_ms
    assert peer.on_path_echo(PUB2, first.timestamp_ms, 2.5) == [PathUp(PUB2)]


def test_late_echo_is_ignored() -> None:
    peer = connected(0.0, source=PUB)
    challenge = challenge_of(peer.on_heartbeat(PUB2, False, 1.0))
    peer.on_heartbeat(PUB, True, 2.0)
    peer.on_heartbeat(PUB, True, 4.0)
    assert peer.on_path_echo(PUB2, challenge.timestamp_ms, 1.0 + PATH_CHALLENGE_TIMEOUT + 0.1) == []
    assert peer.current_address == PUB


def test_challenges_are_rate_limited_per_candidate() -> None:
    peer = connected(0.0, source=PUB)
    sent = []
    for step in range(40):  # a replay flood: 20 per second for two seconds
        now = 1.0 + step * 0.05
        sent += peer.on_heartbeat(PUB2, True, now)
    assert sent == [SendPathChallenge(PUB2, 1000), SendPathChallenge(PUB2, 2000)]


def test_a_new_candidate_replaces_the_old_one() -> None:
    peer = connected(0.0, source=PUB)
    old = challenge_of(peer.on_heartbeat(PUB2, True, 1.0))
    new = challenge_of(peer.on_heartbeat(LAN2, True, 1.0))
    assert new.address == LAN2
    assert new.timestamp_ms > old.timestamp_ms  # fresh even within one millisecond
    assert peer.on_path_echo(PUB2, old.timestamp_ms, 1.1) == []
    assert peer.on_path_echo(LAN2, new.timestamp_ms, 1.1) == [PathUp(LAN2)]


def test_no_challenge_for_what_could_not_become_the_path() -> None:
    peer = connected(0.0, source=LAN)
    assert peer.on_heartbeat(PUB, True, 1.0) == []  # LAN beats public
    assert peer.path_challenge is None
    peer = connected(0.0, source=PUB, lan=False)
    assert peer.on_heartbeat(LAN, True, 1.0) == []  # LAN off
    assert peer.path_challenge is None


def test_echo_after_lan_was_disabled_does_not_move_to_the_lan() -> None:
    peer = connected(0.0, source=PUB)
    challenge = challenge_of(peer.on_heartbeat(LAN, True, 1.0))
    peer.disable_lan()
    assert peer.on_path_echo(LAN, challenge.timestamp_ms, 1.1) == []
    assert peer.current_address == PUB


@pytest.mark.parametrize("state", [s for s in S if s is not S.CONNECTED])
def test_path_echo_ignored_unless_connected(state: PeerState) -> None:
    peer = BUILDERS[state](0.0)
    assert peer.on_path_echo(PUB2, 1000, 1.0) == []
    assert peer.path_challenge is None


def test_nat_rebinding_moves_the_path_within_seconds() -> None:
    """The peer's NAT picks a new port: its heartbeats come from there, and so does the echo."""
    peer = connected(0.0, source=PUB)
    rebound: Address = (PUB[0], PUB[1] + 1)
    moved_at = None
    for second in range(1, 6):
        now = float(second)
        for action in peer.on_heartbeat(rebound, True, now):
            assert isinstance(action, SendPathChallenge)
            # The peer echoes the probe; it arrives from the new mapping 40 ms later.
            if peer.on_path_echo(rebound, action.timestamp_ms, now + 0.04) == [PathUp(rebound)]:
                moved_at = now + 0.04
        assert change(peer.tick(now + 0.5)) is None
    assert moved_at == 1.04
    assert peer.current_address == rebound


# ------------------------------------------------------------------ back-off


def cycle_through_waiting(peer: Peer, now: float) -> float:
    """INIT -> ... -> CONNECTING -> WAITING -> INIT; returns the time it ends."""
    peer.on_hint(now)
    peer.on_public_address(PUB, now)
    assert change(peer.on_own_public_address(now)) == (S.PREPARING, S.CONNECTING)
    assert change(peer.tick(now + 10.0)) == (S.CONNECTING, S.WAITING)
    waited_from = now + 10.0
    assert peer.tick(waited_from + peer.retry - 0.1) == []
    retry = peer.retry
    peer.tick(waited_from + retry)
    assert peer.state is S.INIT
    return waited_from + retry


def test_back_off_sequence() -> None:
    peer = make()
    now = 0.0
    waits = []
    for _ in range(10):
        waits.append(peer.retry)
        now = cycle_through_waiting(peer, now)
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert peer.retry == RETRY_MAX


def test_back_off_resets_when_connected_is_lost() -> None:
    peer = make()
    now = cycle_through_waiting(peer, 0.0)
    now = cycle_through_waiting(peer, now)
    assert peer.retry == 120
    peer.on_hint(now)
    peer.on_public_address(PUB, now)
    peer.on_own_public_address(now)
    assert change(peer.on_heartbeat(PUB, True, now)) == (S.CONNECTING, S.CONNECTED)
    assert peer.retry == 120  # connecting does not reset it ...
    assert change(peer.tick(now + 3.0)) == (S.CONNECTED, S.INIT)
    assert peer.retry == RETRY_MIN  # ... losing the connection does


def test_back_off_resets_when_entering_failed() -> None:
    peer = make()
    now = cycle_through_waiting(peer, 0.0)
    assert peer.retry == 60
    peer.on_hint(now)
    peer.tick(now + 10.0)
    assert peer.state is S.FAILED
    assert peer.retry == RETRY_MIN


def test_back_off_kept_through_preparing_from_waiting() -> None:
    peer = make()
    now = cycle_through_waiting(peer, 0.0)
    peer.on_hint(now)
    peer.on_public_address(PUB, now)
    peer.on_own_public_address(now)
    peer.tick(now + 10.0)
    assert peer.state is S.WAITING
    assert peer.retry == 60
    peer.on_public_address(PUB, now + 11.0)  # WAITING -> PREPARING
    assert peer.retry == 60


# ------------------------------------------------------------ two real peers


@dataclass
class Side:
    peer: Peer
    public: Address
    lan: Address
    stun_pending: bool = False
    log: list[PeerAction] = field(default_factory=list)


def run_pair(a: Side, b: Side, seconds: int, reachable: set[Address]) -> None:
    """Two peers that signal through a server and punch through a network
    where only the addresses in ``reachable`` deliver heartbeats."""
    queue: deque[tuple[Side, Side, PeerAction]] = deque()

    def emit(me: Side, other: Side, actions: Iterable[PeerAction]) -> None:
        for action in actions:
            me.log.append(action)
            queue.append((me, other, action))

    for second in range(seconds):
        now = float(second)
        for me, other in ((a, b), (b, a)):
            emit(me, other, me.peer.tick(now))
            if me.stun_pending:
                me.stun_pending = False
                emit(me, other, me.peer.on_own_public_address(now))
        while queue:
            me, other, action = queue.popleft()
            emit(other, me, deliver(me, other, action, now, reachable))


def deliver(
    me: Side, other: Side, action: PeerAction, now: float, reachable: set[Address]
) -> list[PeerAction]:
    match action:
        case RequestStun():
            me.stun_pending = True
        case SendPublicAddress():
            return other.peer.on_public_address(me.public, now)
        case SendLanAddress():
            return other.peer.on_lan_address(me.lan, now)
        case SendHeartbeat(address, ack) if address in reachable:
            source = me.lan if address == other.lan else me.public
            return other.peer.on_heartbeat(source, ack, now)
    return []


def side(public: Address, lan: Address) -> Side:
    return Side(
        Peer(TUN, 0.0, stun_enabled=True, lan_enabled=True, delay_probes=False), public, lan
    )


def test_two_peers_connect_when_only_one_gets_a_hint() -> None:
    a = side(PUB, LAN)
    b = side(PUB2, LAN2)
    emit_a = a.peer.on_hint(0.0)
    assert change(emit_a) == (S.INIT, S.PREPARING)
    run_pair(a, b, 6, reachable={PUB, PUB2})
    assert a.peer.state is S.CONNECTED
    assert b.peer.state is S.CONNECTED
    assert a.peer.current_address == PUB2
    assert b.peer.current_address == PUB
    # B learnt about A only through A's UDP4CONN, and answered with its LAN address.
    assert SendLanAddress() in b.log


def test_two_peers_on_one_lan_connect_over_the_lan() -> None:
    a = side(PUB, LAN)
    b = side(PUB2, LAN2)
    a.peer.on_hint(0.0)
    run_pair(a, b, 8, reachable={LAN, LAN2})  # no hairpinning on the NAT
    assert a.peer.state is S.CONNECTED
    assert b.peer.state is S.CONNECTED
    assert a.peer.current_address == LAN2
    assert b.peer.current_address == LAN


def test_two_peers_that_cannot_punch_back_off() -> None:
    a = side(PUB, LAN)
    b = side(PUB2, LAN2)
    a.peer.on_hint(0.0)
    run_pair(a, b, 20, reachable=set())
    assert a.peer.state is S.WAITING
    assert b.peer.state is S.WAITING


# ------------------------------------------------------------- state machine

ADDRESSES = st.sampled_from([PUB, PUB2, LAN, LAN2])


class PeerMachine(RuleBasedStateMachine):
    """Random event sequences; the invariants below must hold after each step."""

    peer: Peer

    @initialize(stun=st.booleans(), lan=st.booleans(), probes=st.booleans())
    def start(self, stun: bool, lan: bool, probes: bool) -> None:
        self.now = 0.0
        self.stun = stun
        self.lan = lan
        self.peer = Peer(TUN, 0.0, stun_enabled=stun, lan_enabled=lan, delay_probes=probes)
        self.path_up: Address | None = None
        self.retries_seen = {RETRY_MIN}
        self.last_challenge_ms = -(2**63)
        self.challenges: list[SendPathChallenge] = []

    def step(self, actions: list[PeerAction], before: PeerState) -> None:
        changes = [a for a in actions if isinstance(a, StateChanged)]
        assert len(changes) <= 1
        if changes:
            assert actions[0] is changes[0]
            assert changes[0].old is before
            assert changes[0].new is self.peer.state
            assert changes[0].old is not changes[0].new
            assert changes[0].reason
            assert self.peer.state_since == self.now
        else:
            assert self.peer.state is before
        for action in actions:
            self.check_action(action)
        assert (self.path_up is not None) == (self.peer.state is S.CONNECTED)
        assert self.path_up == self.peer.current_address or self.path_up is None

    def check_action(self, action: PeerAction) -> None:
        match action:
            case PathDown():
                assert self.path_up is not None, "PathDown without PathUp"
                self.path_up = None
            case PathUp(address):
                assert address != self.path_up, "PathUp repeated for the same path"
                self.path_up = address
            case SendPathChallenge(address, timestamp_ms):
                assert self.peer.state is S.CONNECTED
                assert address != self.peer.current_address
                assert timestamp_ms > self.last_challenge_ms, "challenge timestamp reused"
                self.last_challenge_ms = timestamp_ms
                self.challenges.append(action)
            case SendLanAddress():
                assert self.lan
            case RequestStun():
                assert self.stun
                assert self.peer.state is S.PREPARING
            case SendHeartbeat(address, ack):
                assert ack == self.peer.ack
                # With LAN off, a private address is only punched when the
                # peer's UDP4CONN says it is its public one (Candy does too).
                # A LAN path that was up when LAN got disabled lives on until
                # it times out (Candy keeps sending to it as well).
                known = (self.peer.public_address, self.peer.current_address)
                lan_target = is_lan_address(address[0]) and address not in known
                assert self.lan or not lan_target

    def run(self, event: str, *args: object) -> None:
        before = self.peer.state
        actions = getattr(self.peer, event)(*args, self.now)
        self.step(actions, before)

    @rule(dt=st.one_of(st.floats(0.0, 4.0), st.sampled_from([2.9, 3.1, 9.9, 10.1, 30.0, 3600.0])))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.run("tick")

    @rule()
    def hint(self) -> None:
        self.run("on_hint")

    @rule(address=ADDRESSES)
    def public_address(self, address: Address) -> None:
        self.run("on_public_address", address)

    @rule(address=ADDRESSES)
    def lan_address(self, address: Address) -> None:
        self.run("on_lan_address", address)

    @rule()
    def own_public_address(self) -> None:
        if self.stun:  # without a STUN server no answer can arrive
            self.run("on_own_public_address")

    @rule(source=ADDRESSES, ack=st.booleans())
    def heartbeat(self, source: Address, ack: bool) -> None:
        self.run("on_heartbeat", source, ack)

    @rule()
    def disable_lan(self) -> None:
        self.lan = False
        self.peer.disable_lan()
        assert self.peer.lan_address is None
        if self.peer.state is not S.CONNECTED:
            assert not self.peer.on_lan_path

    @rule(rtt=st.floats(0.0, 2000.0))
    def rtt(self, rtt: float) -> None:
        self.run("on_rtt", rtt)

    @rule(data=st.data(), source=ADDRESSES, stamp=st.integers(0, 10**7))
    def path_echo(self, data: st.DataObject, source: Address, stamp: int) -> None:
        """Mostly the echo of a challenge we sent (from anywhere), sometimes made up."""
        if self.challenges and data.draw(st.booleans()):
            challenge = data.draw(st.sampled_from(self.challenges))
            source = data.draw(st.sampled_from([challenge.address, source]))
            stamp = challenge.timestamp_ms
        before = self.peer.current_address
        self.run("on_path_echo", source, stamp)
        if self.peer.current_address != before:
            assert source == self.peer.current_address
            assert any(c == SendPathChallenge(source, stamp) for c in self.challenges)

    @invariant()
    def consistent(self) -> None:
        peer = self.peer
        assert isinstance(peer.state, PeerState)
        assert RETRY_MIN <= peer.retry <= RETRY_MAX
        assert peer.retry in {30, 60, 120, 240, 480, 960, 1920, 3600}
        if peer.state in FORGETTING:
            assert_forgotten(peer)
        if peer.state is S.CONNECTED:
            assert peer.current_address is not None
            assert peer.ack
            assert peer.last_ack_heartbeat is not None
        if not self.lan:
            assert peer.lan_address is None
        if not self.stun:
            assert peer.state not in (S.SYNCHRONIZING,)


PeerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPeerMachine = PeerMachine.TestCase
