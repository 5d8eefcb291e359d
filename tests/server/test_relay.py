"""The relay core (PROTOCOL 2.4) driven with plain sessions: no socket, no event loop."""

import logging
import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest

from p2pvpn.config import SdwanRule
from p2pvpn.server.relay import Relay
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import (
    BROADCAST,
    Discovery,
    ExptTun,
    General,
    LanAddress,
    SystemRoutes,
    Udp4Conn,
    decode_ws_message,
)
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


def make_relay(**kwargs: Any) -> Relay:
    return Relay(PASSWORD, **kwargs)


# -- AUTH and sessions ---------------------------------------------------------


def test_auth_maps_the_tun_ip_and_sends_nothing() -> None:
    relay = make_relay()
    session = login(relay, "10.0.0.1")
    assert relay.session_for(ip("10.0.0.1")) is session
    assert session.tun_ip == ip("10.0.0.1")
    assert session.sent == []  # PROTOCOL 2.3: no reply to AUTH
    assert relay.stats()["sessions_authenticated"] == 1


def test_auth_with_a_wrong_password_closes_4001() -> None:
    relay = make_relay()
    session = FakeSession()
    feed(relay, session, auth_frame("10.0.0.1", password="wrong"), NOW)
    assert session.close_code == CloseCode.AUTHENTICATION_FAILED
    assert not session.authenticated
    assert relay.session_for(ip("10.0.0.1")) is None
    assert relay.stats()["rejections"] == {"AUTHENTICATION_FAILED": 1}


def test_empty_password_is_allowed() -> None:
    relay = Relay("")
    session = FakeSession()
    feed(relay, session, auth_frame("10.0.0.1", password=""), NOW)
    assert session.authenticated


def test_second_login_with_the_same_address_kicks_the_older(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = make_relay()
    older = login(relay, "10.0.0.1", now=NOW)
    with caplog.at_level(logging.WARNING, logger="p2pvpn.server.relay"):
        newer = login(relay, "10.0.0.1", now=NOW + 1)
    assert older.close_code == CloseCode.KICKED
    assert newer.closes == []
    assert relay.session_for(ip("10.0.0.1")) is newer
    assert any("kicked" in record.getMessage() for record in caplog.records)


def test_a_second_auth_on_one_connection_is_a_protocol_violation() -> None:
    relay = make_relay()
    session = login(relay, "10.0.0.1")
    feed(relay, session, auth_frame("10.0.0.2", NOW + 1), NOW + 1)
    assert session.closes == [(CloseCode.PROTOCOL_VIOLATION, "repeated AUTH")]
    assert relay.session_for(ip("10.0.0.1")) is None
    assert relay.session_for(ip("10.0.0.2")) is None
    assert relay.stats()["limits"] == {"repeated_login_message": 1}


@pytest.mark.parametrize("address", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1"])
def test_auth_for_an_address_that_cannot_be_a_client_is_refused(address: str) -> None:
    relay = make_relay()
    session = FakeSession()
    feed(relay, session, auth_frame(address), NOW)
    assert session.close_code == CloseCode.ADDRESS_REFUSED


@pytest.mark.parametrize("address", ["10.77.0.0", "10.77.0.255"])
def test_auth_for_the_dhcp_network_or_broadcast_address_is_refused(address: str) -> None:
    relay = make_relay(dhcp=DHCP)
    session = FakeSession()
    feed(relay, session, auth_frame(address), NOW)
    assert session.close_code == CloseCode.ADDRESS_REFUSED


@pytest.mark.parametrize(
    "frame",
    [
        forward("10.0.0.1", "10.0.0.2"),
        Udp4Conn(ip("10.0.0.1"), ip("10.0.0.2"), ip("198.51.100.1"), 4000).encode(),
        Discovery(ip("10.0.0.1"), BROADCAST).encode(),
        LanAddress(ip("10.0.0.1"), ip("10.0.0.2"), ip("192.168.1.2"), 4000).encode(),
        bytes.fromhex("06000000"),  # ROUTE
        b"\x01",  # even a malformed FORWARD: the login check comes first
    ],
)
def test_messages_before_auth_close_4006(frame: bytes) -> None:
    relay = make_relay()
    session = FakeSession()
    feed(relay, session, frame, NOW)
    assert session.close_code == CloseCode.NOT_AUTHENTICATED


def test_vmac_expttun_and_unknown_types_are_allowed_before_auth() -> None:
    relay = make_relay(dhcp=DHCP)
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_A), NOW)
    assert session.vmac == VMAC_A
    assert request_address(relay, session) == IPv4Interface("10.77.0.1/24")
    feed(relay, session, b"\x07whatever", NOW)  # unknown type: ignored
    assert session.closes == []
    assert relay.stats()["drops"]["unknown_type"] == 1


def test_candy_login_sequence_is_accepted(candy_vectors: dict[str, Any]) -> None:
    """The frames a real Candy client sent (VMAC, EXPTTUN, AUTH) log in."""
    relay = Relay(candy_vectors["password"], dhcp=IPv4Network("192.168.202.0/24"))
    session = FakeSession()
    for item in candy_vectors["client_to_server_ws"][:3]:
        feed(relay, session, bytes.fromhex(item["hex"]), NOW)
    assert session.closes == []
    assert session.vmac == "1eb9fcc6f6a90f6f"
    assert relay.session_for(ip("192.168.202.1")) is session


def test_expttun_grant_matches_the_candy_server_bytes(candy_vectors: dict[str, Any]) -> None:
    """Same password, range, request and clock: the reply is byte for byte Candy's."""
    captured = candy_vectors["server_to_client_ws"]["expttun_grant_for_request_0.0.0.0/0"]
    grant = decode_ws_message(bytes.fromhex(captured))
    assert isinstance(grant, ExptTun)
    relay = Relay(candy_vectors["password"], dhcp=DHCP)
    session = FakeSession()
    request = next(
        item for item in candy_vectors["client_to_server_ws"] if item["type"] == "EXPTTUN"
    )
    feed(relay, session, bytes.fromhex(request["hex"]), grant.timestamp)
    assert session.sent == [bytes.fromhex(captured)]


# -- FORWARD ---------------------------------------------------------------------


def test_forward_unicast_reaches_only_the_destination() -> None:
    relay = make_relay()
    a, b, c = (login(relay, f"10.0.0.{n}") for n in (1, 2, 3))
    frame = forward("10.0.0.1", "10.0.0.2")
    feed(relay, a, frame, NOW)
    assert b.sent == [frame]
    assert a.sent == c.sent == []
    stats = relay.stats()
    assert stats["frames_relayed"] == 1
    assert stats["bytes_relayed"] == len(frame)


@pytest.mark.parametrize("destination", ["255.255.255.255", "224.0.0.251", "239.1.2.3"])
def test_forward_broadcast_and_multicast_reach_every_other_session(destination: str) -> None:
    relay = make_relay()
    a, b, c = (login(relay, f"10.0.0.{n}") for n in (1, 2, 3))
    unauthenticated = FakeSession()
    feed(relay, unauthenticated, vmac_frame(VMAC_A), NOW)
    frame = forward("10.0.0.1", destination)
    feed(relay, a, frame, NOW)
    assert b.sent == c.sent == [frame]
    assert a.sent == unauthenticated.sent == []


def test_forward_to_the_directed_broadcast_of_the_dhcp_range_fans_out() -> None:
    relay = make_relay(dhcp=DHCP)
    a, b = login(relay, "10.77.0.1"), login(relay, "10.77.0.2")
    frame = forward("10.77.0.1", "10.77.0.255")
    feed(relay, a, frame, NOW)
    assert b.sent == [frame]
    assert a.sent == []


def test_directed_broadcast_needs_a_dhcp_range() -> None:
    relay = make_relay()
    a, b = login(relay, "10.77.0.1"), login(relay, "10.77.0.2")
    feed(relay, a, forward("10.77.0.1", "10.77.0.255"), NOW)
    assert b.sent == []
    assert relay.stats()["drops"] == {"unknown_destination": 1}


def test_forward_to_an_unknown_destination_is_dropped_and_counted() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, a, forward("10.0.0.1", "10.0.0.99"), NOW)
    assert a.sent == b.sent == []
    assert a.closes == []
    assert relay.stats()["drops"] == {"unknown_destination": 1}


def test_short_or_non_ipv4_forward_is_dropped_not_closed() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, a, forward("10.0.0.1", "10.0.0.2")[:20], NOW)
    ipv6ish = bytearray(forward("10.0.0.1", "10.0.0.2"))
    ipv6ish[1] = 0x60
    feed(relay, a, bytes(ipv6ish), NOW)
    assert a.closes == []
    assert b.sent == []
    assert relay.stats()["drops"] == {"short_forward": 1, "not_ipv4": 1}
    feed(relay, a, forward("10.0.0.1", "10.0.0.2"), NOW)
    assert len(b.sent) == 1


# -- DHCP --------------------------------------------------------------------------


def test_dhcp_grants_distinct_addresses_to_three_vmacs() -> None:
    relay = make_relay(dhcp=DHCP)
    grants = []
    for vmac in (VMAC_A, VMAC_B, VMAC_C):
        session = FakeSession()
        feed(relay, session, vmac_frame(vmac), NOW)
        grants.append(request_address(relay, session))
    assert grants == [IPv4Interface(f"10.77.0.{n}/24") for n in (1, 2, 3)]


def test_grant_carries_a_fresh_timestamp_and_a_valid_hash() -> None:
    relay = make_relay(dhcp=DHCP)
    session = FakeSession()
    feed(relay, session, expttun_frame(now=NOW - 100), NOW)
    (reply,) = session.sent
    grant = decode_ws_message(reply)
    assert isinstance(grant, ExptTun)
    assert grant.timestamp == NOW
    assert grant.verify(PASSWORD)
    assert len(reply) == 73


def test_a_free_requested_address_is_granted() -> None:
    relay = make_relay(dhcp=DHCP)
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_A), NOW)
    assert request_address(relay, session, "10.77.0.50/24") == IPv4Interface("10.77.0.50/24")


@pytest.mark.parametrize("requested", ["10.77.0.0/24", "10.77.0.255/24", "10.78.0.5/24"])
def test_network_broadcast_or_foreign_requests_get_a_pool_address(requested: str) -> None:
    relay = make_relay(dhcp=DHCP)
    session = FakeSession()
    assert request_address(relay, session, requested) == IPv4Interface("10.77.0.1/24")


def test_an_address_held_by_another_client_is_not_granted() -> None:
    relay = make_relay(dhcp=DHCP)
    login(relay, "10.77.0.1", vmac=VMAC_A)
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_B), NOW)
    assert request_address(relay, session, "10.77.0.1/24") == IPv4Interface("10.77.0.2/24")


def test_the_same_vmac_may_take_over_its_address_from_a_stale_connection() -> None:
    relay = make_relay(dhcp=DHCP)
    login(relay, "10.77.0.7", vmac=VMAC_A)
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_A, NOW + 1), NOW + 1)
    assert request_address(relay, session, "10.77.0.7/24", NOW + 1) == IPv4Interface("10.77.0.7/24")


def test_a_returning_vmac_gets_its_address_back_after_disconnect() -> None:
    relay = make_relay(dhcp=DHCP)
    first = FakeSession()
    feed(relay, first, vmac_frame(VMAC_A), NOW)
    assert request_address(relay, first) == IPv4Interface("10.77.0.1/24")
    feed(relay, first, auth_frame("10.77.0.1"), NOW)
    relay.on_disconnect(first)
    # Another installation comes and goes meanwhile; it must not take .1.
    other = FakeSession()
    feed(relay, other, vmac_frame(VMAC_B), NOW)
    assert request_address(relay, other) == IPv4Interface("10.77.0.2/24")
    again = FakeSession()
    feed(relay, again, vmac_frame(VMAC_A, NOW + 5), NOW + 5)
    assert request_address(relay, again, "0.0.0.0/0", NOW + 5) == IPv4Interface("10.77.0.1/24")
    # Asking for an address leased to someone else also gets the own one back.
    relay.on_disconnect(again)
    last = FakeSession()
    feed(relay, last, vmac_frame(VMAC_A, NOW + 6), NOW + 6)
    feed(relay, last, expttun_frame("10.77.0.2/24", NOW + 6), NOW + 6)
    assert decode_ws_message(last.sent[-1]) == ExptTun.create(
        PASSWORD, IPv4Interface("10.77.0.1/24"), NOW + 6
    )


def test_exhausted_pool_closes_4007_try_again_later() -> None:
    relay = make_relay(dhcp=IPv4Network("10.9.0.0/30"))  # hosts .1 and .2
    login(relay, "10.9.0.1", vmac=VMAC_A)
    login(relay, "10.9.0.2", vmac=VMAC_B)
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_C), NOW)
    assert request_address(relay, session) is None
    assert session.closes == [(CloseCode.TRY_AGAIN_LATER, "dhcp range exhausted, try again later")]
    assert relay.stats()["limits"] == {"dhcp_exhausted": 1}


def test_leases_of_absent_clients_are_reclaimed_when_nothing_else_is_left() -> None:
    relay = make_relay(dhcp=IPv4Network("10.9.0.0/30"))
    for vmac, address in ((VMAC_A, "10.9.0.1"), (VMAC_B, "10.9.0.2")):
        relay.on_disconnect(login(relay, address, vmac=vmac))
    session = FakeSession()
    feed(relay, session, vmac_frame(VMAC_C), NOW)
    granted = request_address(relay, session)
    assert granted is not None
    assert granted.ip in {ip("10.9.0.1"), ip("10.9.0.2")}
    assert relay.lease_of(VMAC_C) == granted.ip
    previous_owner = VMAC_A if granted.ip == ip("10.9.0.1") else VMAC_B
    assert relay.lease_of(previous_owner) is None


def test_expttun_without_dhcp_range_closes_4003() -> None:
    relay = make_relay()
    session = FakeSession()
    feed(relay, session, expttun_frame(), NOW)
    assert session.closes == [(CloseCode.ADDRESS_REFUSED, "no dhcp range configured")]


# -- UDP4CONN, DISCOVERY, GENERAL ------------------------------------------------------


def test_udp4conn_is_relayed_unchanged_including_trailing_bytes() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    frame = Udp4Conn(ip("10.0.0.1"), ip("10.0.0.2"), ip("198.51.100.7"), 41641).encode()
    feed(relay, a, frame + b"\xaa\xbb", NOW)
    assert b.sent == [frame + b"\xaa\xbb"]


def test_udp4conn_to_broadcast_is_not_fanned_out() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, a, Udp4Conn(ip("10.0.0.1"), BROADCAST, ip("198.51.100.7"), 1).encode(), NOW)
    assert b.sent == []
    assert relay.stats()["drops"] == {"unknown_destination": 1}


def test_discovery_broadcast_and_unicast() -> None:
    relay = make_relay()
    a, b, c = (login(relay, f"10.0.0.{n}") for n in (1, 2, 3))
    broadcast = Discovery(ip("10.0.0.1"), BROADCAST).encode()
    feed(relay, a, broadcast, NOW)
    assert b.sent == c.sent == [broadcast]
    assert a.sent == []
    answer = Discovery(ip("10.0.0.2"), ip("10.0.0.1")).encode()
    feed(relay, b, answer, NOW)
    assert a.sent == [answer]
    assert c.sent == [broadcast]


def test_general_lan_address_unicast_and_other_subtypes_broadcast() -> None:
    relay = make_relay()
    a, b, c = (login(relay, f"10.0.0.{n}") for n in (1, 2, 3))
    lan = LanAddress(ip("10.0.0.1"), ip("10.0.0.3"), ip("192.168.1.20"), 5000).encode()
    feed(relay, a, lan, NOW)
    assert c.sent == [lan]
    assert b.sent == []
    general = General(9, 7, ip("10.0.0.2"), BROADCAST, b"payload").encode()
    feed(relay, b, general, NOW)
    assert a.sent == [general]
    assert c.sent == [lan, general]


def test_signal_to_an_unknown_destination_is_dropped() -> None:
    relay = make_relay()
    a = login(relay, "10.0.0.1")
    feed(relay, a, Discovery(ip("10.0.0.1"), ip("10.0.0.9")).encode(), NOW)
    assert a.closes == []
    assert relay.stats()["drops"] == {"unknown_destination": 1}


def test_route_and_unknown_types_from_a_client_are_ignored() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, a, SystemRoutes(()).encode(), NOW)
    feed(relay, a, b"\x63anything", NOW)
    assert a.closes == []
    assert b.sent == []


# -- sdwan ---------------------------------------------------------------------------


def test_sdwan_route_after_auth_matches_the_candy_server(candy_vectors: dict[str, Any]) -> None:
    key = "route_after_auth_of_10.77.0.1 (sdwan rule 10.77.0.0/24,172.30.0.0/16,10.77.0.9)"
    expected = bytes.fromhex(candy_vectors["server_to_client_ws"][key])
    rule = SdwanRule(IPv4Network("10.77.0.0/24"), IPv4Network("172.30.0.0/16"), ip("10.77.0.9"))
    relay = make_relay(sdwan=[rule])
    session = login(relay, "10.77.0.1")
    assert session.sent == [expected]
    outside = login(relay, "10.78.0.1")
    assert outside.sent == []


def test_more_than_100_routes_are_split() -> None:
    device = IPv4Network("10.0.0.0/8")
    rules = [
        SdwanRule(device, IPv4Network(f"172.16.{n}.0/24"), ip("10.0.0.254")) for n in range(150)
    ]
    relay = make_relay(sdwan=rules)
    session = login(relay, "10.0.0.1")
    messages = [decode_ws_message(frame) for frame in session.sent]
    assert [len(message.routes) for message in messages if isinstance(message, SystemRoutes)] == [
        100,
        50,
    ]
    routes = [
        route
        for message in messages
        if isinstance(message, SystemRoutes)
        for route in message.routes
    ]
    assert [route.network for route in routes] == [rule.destination for rule in rules]
    assert {route.nexthop for route in routes} == {ip("10.0.0.254")}


# -- disconnect ------------------------------------------------------------------------


def test_disconnect_removes_the_mapping_only_if_still_owned() -> None:
    relay = make_relay()
    older = login(relay, "10.0.0.1", now=NOW)
    newer = login(relay, "10.0.0.1", now=NOW + 1)
    relay.on_disconnect(older)
    assert relay.session_for(ip("10.0.0.1")) is newer
    relay.on_disconnect(newer)
    relay.on_disconnect(newer)  # idempotent
    assert relay.session_for(ip("10.0.0.1")) is None
    assert relay.stats()["connections_open"] == 0


def test_frames_after_a_close_are_ignored() -> None:
    relay = make_relay()
    a, b = login(relay, "10.0.0.1"), login(relay, "10.0.0.2")
    feed(relay, a, Discovery(ip("10.0.0.9"), ip("10.0.0.2")).encode(), NOW)  # spoofed
    assert a.close_code == CloseCode.PROTOCOL_VIOLATION
    feed(relay, a, forward("10.0.0.1", "10.0.0.2"), NOW)
    assert b.sent == []
    assert relay.session_for(ip("10.0.0.1")) is None


def test_ipv4_packet_helper_is_a_valid_header() -> None:
    packet = forward("10.0.0.1", "10.0.0.2")[1:]
    version_ihl, _, total = struct.unpack_from("!BBH", packet)
    assert version_ihl == 0x45
    assert total == len(packet)
    assert IPv4Address(packet[12:16]) == ip("10.0.0.1")
