"""What the sans-I/O relay core returns for each event, action by action.

Plain :class:`RelaySession` objects stand in for connections: no socket, no
event loop, no clock but the ``now`` each call is given.
"""

import ast
import inspect
from ipaddress import IPv4Interface, IPv4Network

from p2pvpn.config import SdwanRule
from p2pvpn.server import relay as relay_module
from p2pvpn.server.relay import Action, Close, Relay, RelaySession, Send
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import (
    BROADCAST,
    Discovery,
    ExptTun,
    SystemRoute,
    SystemRoutes,
    decode_ws_message,
)
from tests.server import (
    NOW,
    PASSWORD,
    VMAC_A,
    VMAC_B,
    auth_frame,
    expttun_frame,
    forward,
    ip,
    vmac_frame,
)


def connect(relay: Relay, remote: str = "192.0.2.1:40000") -> RelaySession:
    session = RelaySession(remote)
    relay.on_connect(session)
    return session


def logged_in(relay: Relay, tun_ip: str, *, vmac: str | None = None) -> RelaySession:
    session = connect(relay)
    if vmac is not None:
        assert relay.handle_frame(session, vmac_frame(vmac), NOW) == []
    assert relay.handle_frame(session, auth_frame(tun_ip), NOW) == []
    return session


def test_the_core_imports_no_io() -> None:
    tree = ast.parse(inspect.getsource(relay_module))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"asyncio", "websockets", "socket", "time", "selectors"}, roots


# -- login ------------------------------------------------------------------------------


def test_auth_returns_nothing_and_maps_the_session() -> None:
    relay = Relay(PASSWORD)
    session = connect(relay)
    assert relay.handle_frame(session, auth_frame("10.0.0.1"), NOW) == []
    assert session.authenticated
    assert relay.session_for(ip("10.0.0.1")) is session


def test_a_wrong_password_returns_one_close() -> None:
    relay = Relay(PASSWORD)
    session = connect(relay)
    actions = relay.handle_frame(session, auth_frame("10.0.0.1", password="wrong"), NOW)
    assert actions == [Close(session, CloseCode.AUTHENTICATION_FAILED, "authentication failed")]
    assert session.closed
    assert not session.authenticated


def test_a_duplicate_address_closes_the_older_session_then_sends_routes_to_the_newer() -> None:
    rule = SdwanRule(IPv4Network("10.0.0.0/24"), IPv4Network("172.30.0.0/16"), ip("10.0.0.9"))
    relay = Relay(PASSWORD, sdwan=[rule])
    older = connect(relay)
    relay.handle_frame(older, auth_frame("10.0.0.1"), NOW)
    newer = connect(relay)
    actions = relay.handle_frame(newer, auth_frame("10.0.0.1", NOW + 1), NOW + 1)
    routes = SystemRoutes(
        (SystemRoute(ip("172.30.0.0"), ip("255.255.0.0"), ip("10.0.0.9")),)
    ).encode()
    assert actions == [
        Close(older, CloseCode.KICKED, "another client logged in"),
        Send(newer, routes),
    ]
    assert relay.session_for(ip("10.0.0.1")) is newer
    # The kicked session is not read any more: its frames cause nothing.
    assert relay.handle_frame(older, forward("10.0.0.1", "10.0.0.2"), NOW + 1) == []
    assert relay.stats()["drops"] == {"after_close": 1}


def test_the_login_deadline_closes_only_sessions_that_did_not_log_in() -> None:
    relay = Relay(PASSWORD)
    silent, active = connect(relay), logged_in(relay, "10.0.0.1")
    assert relay.login_timed_out(active, 30.0, NOW) == []
    assert relay.login_timed_out(silent, 30.0, NOW) == [
        Close(silent, CloseCode.NOT_AUTHENTICATED, "no login")
    ]
    assert relay.login_timed_out(silent, 30.0, NOW) == []  # already closed
    assert relay.stats()["limits"] == {"login_timeout": 1}


# -- replay cache -----------------------------------------------------------------------


def test_a_replayed_login_is_refused_until_its_timestamp_goes_stale() -> None:
    relay = Relay(PASSWORD)
    victim = logged_in(relay, "10.0.0.1")
    captured = auth_frame("10.0.0.1")
    attacker = connect(relay, "203.0.113.66:1234")
    assert relay.handle_frame(attacker, captured, NOW + 299) == [
        Close(attacker, CloseCode.STALE_OR_REPLAYED, "replayed")
    ]
    later = connect(relay, "203.0.113.66:1235")
    assert relay.handle_frame(later, captured, NOW + 301) == [
        Close(later, CloseCode.STALE_OR_REPLAYED, "stale timestamp")
    ]
    assert relay.session_for(ip("10.0.0.1")) is victim
    assert not victim.closed


def test_the_replay_cache_forgets_what_the_clock_it_is_given_has_passed() -> None:
    relay = Relay(PASSWORD)
    logged_in(relay, "10.0.0.1")
    assert relay.stats()["replay_cache_entries"] == 1
    session = connect(relay)
    relay.handle_frame(session, auth_frame("10.0.0.2", NOW + 301), NOW + 301)
    assert relay.stats()["replay_cache_entries"] == 1


# -- address pool -----------------------------------------------------------------------


def grant_of(actions: list[Action], session: RelaySession) -> IPv4Interface:
    (action,) = actions
    assert isinstance(action, Send)
    assert action.session is session
    grant = decode_ws_message(action.frame)
    assert isinstance(grant, ExptTun)
    assert grant.verify(PASSWORD)
    return grant.cidr


def test_the_pool_grants_in_turn_then_refuses_when_exhausted() -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/30"))  # two hosts
    granted = []
    for vmac in (VMAC_A, VMAC_B):
        session = connect(relay)
        relay.handle_frame(session, vmac_frame(vmac), NOW)
        actions = relay.handle_frame(session, expttun_frame(), NOW)
        cidr = grant_of(actions, session)
        relay.handle_frame(session, auth_frame(str(cidr.ip)), NOW)
        granted.append(cidr)
    assert granted == [IPv4Interface("10.77.0.1/30"), IPv4Interface("10.77.0.2/30")]
    late = connect(relay)
    relay.handle_frame(late, vmac_frame("00112233445566aa"), NOW)
    assert relay.handle_frame(late, expttun_frame(), NOW) == [
        Close(late, CloseCode.TRY_AGAIN_LATER, "dhcp range exhausted, try again later")
    ]


def test_a_grant_is_stamped_with_the_now_it_was_given() -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    session = connect(relay)
    actions = relay.handle_frame(session, expttun_frame(now=NOW - 100), NOW + 0.9)
    (action,) = actions
    assert isinstance(action, Send)
    assert action.frame == ExptTun.create(PASSWORD, IPv4Interface("10.77.0.1/24"), NOW).encode()


def test_a_returning_vmac_gets_its_lease_back() -> None:
    relay = Relay(PASSWORD, dhcp=IPv4Network("10.77.0.0/24"))
    first = logged_in(relay, "10.77.0.7", vmac=VMAC_A)
    relay.on_disconnect(first)
    again = connect(relay)
    relay.handle_frame(again, vmac_frame(VMAC_A, NOW + 1), NOW + 1)
    actions = relay.handle_frame(again, expttun_frame(now=NOW + 1), NOW + 1)
    assert grant_of(actions, again) == IPv4Interface("10.77.0.7/24")


# -- relaying ---------------------------------------------------------------------------


def test_forward_between_two_sessions_is_one_send_each_way() -> None:
    relay = Relay(PASSWORD)
    a, b = logged_in(relay, "10.0.0.1"), logged_in(relay, "10.0.0.2")
    to_b, to_a = forward("10.0.0.1", "10.0.0.2"), forward("10.0.0.2", "10.0.0.1")
    assert relay.handle_frame(a, to_b, NOW) == [Send(b, to_b)]
    assert relay.handle_frame(b, to_a, NOW) == [Send(a, to_a)]
    assert relay.stats()["frames_relayed"] == 2


def test_a_broadcast_is_one_send_per_other_session() -> None:
    relay = Relay(PASSWORD)
    a, b, c = (logged_in(relay, f"10.0.0.{n}") for n in (1, 2, 3))
    discovery = Discovery(ip("10.0.0.2"), BROADCAST).encode()
    assert relay.handle_frame(b, discovery, NOW) == [Send(a, discovery), Send(c, discovery)]


def test_a_spoofed_forward_is_dropped_without_any_action() -> None:
    relay = Relay(PASSWORD)
    a, _ = logged_in(relay, "10.0.0.1"), logged_in(relay, "10.0.0.2")
    assert relay.handle_frame(a, forward("10.0.0.9", "10.0.0.2"), NOW) == []
    assert not a.closed
    assert relay.stats()["drops"] == {"spoofed_source": 1}


def test_every_call_returns_a_list_of_its_own() -> None:
    relay = Relay(PASSWORD)
    a, b = logged_in(relay, "10.0.0.1"), logged_in(relay, "10.0.0.2")
    frame = forward("10.0.0.1", "10.0.0.2")
    first = relay.handle_frame(a, frame, NOW)
    second = relay.handle_frame(a, frame, NOW)
    assert first == second == [Send(b, frame)]
    assert first is not second
