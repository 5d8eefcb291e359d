"""The sdwan route policy (client/route_policy.py): every rule, every policy value, the cap."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from p2pvpn.client.route_policy import (
    MAX_ACCEPTED_ROUTES,
    Decision,
    RefusalLog,
    RouteEntry,
    Underlay,
    decide,
)
from p2pvpn.config import AcceptRoutes

VPN = IPv4Network("10.77.0.0/24")
OWN = IPv4Address("10.77.0.11")
PEER = IPv4Address("10.77.0.12")
UNDERLAY = Underlay(
    vpn=VPN,
    own_ip=OWN,
    endpoints=(
        (IPv4Address("203.0.113.5"), "the server's address"),
        (IPv4Address("198.51.100.7"), "the STUN server's address"),
        (IPv4Address("100.64.3.4"), "the peer endpoint"),
        (IPv4Address("192.168.1.1"), "the default gateway"),
    ),
    subnets=(IPv4Network("192.168.1.0/24"),),
)
GOOD = (IPv4Network("172.30.0.0/16"), PEER)


def entry(network: str, nexthop: IPv4Address | str = PEER) -> RouteEntry:
    return IPv4Network(network), IPv4Address(nexthop)


def reason(policy: AcceptRoutes, route: RouteEntry, underlay: Underlay = UNDERLAY) -> str | None:
    decision = decide(policy, underlay, [route])
    if decision.accepted:
        assert decision.accepted == (route,)
        return None
    ((refused, why),) = decision.refused
    assert refused == route
    return why


@pytest.mark.parametrize("policy", ["safe", "all", (IPv4Network("172.16.0.0/12"),)])
def test_an_ordinary_route_is_accepted(policy: AcceptRoutes) -> None:
    assert reason(policy, GOOD) is None


def test_none_refuses_everything_even_routes_via_us() -> None:
    assert reason("none", GOOD) == "accept_routes = none"
    assert reason("none", entry("172.30.0.0/16", OWN)) == "accept_routes = none"


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("0.0.0.0/0", "the default route shorter than /8"),
        ("0.0.0.0/1", "a prefix shorter than /8"),
        ("172.0.0.0/7", "a prefix shorter than /8"),
    ],
)
def test_wide_prefixes_need_all(network: str, why: str) -> None:
    assert (reason("safe", entry(network)) or "").startswith(why)
    assert reason((IPv4Network("0.0.0.0/0"),), entry(network)) is not None


def test_all_accepts_a_wide_prefix_that_captures_nothing() -> None:
    assert reason("all", entry("128.0.0.0/2")) is None
    assert reason("safe", entry("11.0.0.0/8")) is None  # exactly /8 is fine


@pytest.mark.parametrize(
    ("network", "label"),
    [
        ("203.0.113.0/24", "the server's address 203.0.113.5"),
        ("203.0.113.5/32", "the server's address 203.0.113.5"),
        ("198.51.100.0/24", "the STUN server's address 198.51.100.7"),
        ("100.64.0.0/10", "the peer endpoint 100.64.3.4"),
    ],
)
@pytest.mark.parametrize("policy", ["safe", "all"])
def test_routes_capturing_an_underlay_endpoint_are_refused(
    network: str, label: str, policy: AcceptRoutes
) -> None:
    assert reason(policy, entry(network)) == f"would capture {label}"


def test_routes_capturing_the_gateway_or_overlapping_the_lan_are_refused() -> None:
    assert (
        reason("safe", entry("192.168.1.1/32")) == "would capture the default gateway 192.168.1.1"
    )
    assert reason("safe", entry("192.168.1.128/25")) == "overlaps the LAN subnet 192.168.1.0/24"
    assert (
        reason("safe", entry("192.168.0.0/16")) == "would capture the default gateway 192.168.1.1"
    )
    gateway_elsewhere = Underlay(VPN, OWN, subnets=(IPv4Network("192.168.1.0/24"),))
    assert reason("all", entry("192.168.0.0/16"), gateway_elsewhere) == (
        "overlaps the LAN subnet 192.168.1.0/24"
    )


def test_routes_overlapping_the_vpn_network_are_refused() -> None:
    assert reason("safe", entry("10.77.0.128/25")) == "overlaps the VPN network 10.77.0.0/24"
    assert reason("all", entry("10.0.0.0/8")) == "overlaps the VPN network 10.77.0.0/24"


@pytest.mark.parametrize(
    ("network", "name"),
    [
        ("127.0.0.0/8", "loopback"),
        ("127.1.2.0/24", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("169.254.7.0/24", "link-local"),
        ("224.0.0.0/8", "multicast"),
        ("239.1.0.0/16", "multicast"),
        ("255.255.255.255/32", "reserved and broadcast"),
        ("0.0.0.0/8", "'this network'"),
    ],
)
@pytest.mark.parametrize("policy", ["safe", "all"])
def test_special_ranges_are_refused(network: str, name: str, policy: AcceptRoutes) -> None:
    assert (reason(policy, entry(network)) or "").startswith(f"reaches into {name}")


def test_all_lets_a_wide_route_span_a_special_range_safe_does_not() -> None:
    clear = Underlay(VPN, OWN)
    assert reason("all", entry("128.0.0.0/1"), clear) is None  # spans multicast
    assert reason("safe", entry("224.0.0.0/3"), clear) is not None


def test_the_next_hop_must_be_in_the_vpn_unless_all() -> None:
    outside = entry("172.30.0.0/16", "10.99.0.1")
    assert reason("safe", outside) == "next hop 10.99.0.1 is outside the VPN network 10.77.0.0/24"
    assert reason((IPv4Network("172.16.0.0/12"),), outside) is not None
    assert reason("all", outside) is None


def test_a_list_accepts_only_routes_inside_one_of_its_networks() -> None:
    policy = (IPv4Network("172.30.0.0/16"), IPv4Network("10.200.0.0/16"))
    assert reason(policy, entry("172.30.5.0/24")) is None
    assert reason(policy, entry("10.200.0.0/16")) is None
    assert reason(policy, entry("172.16.0.0/12")) == "outside the networks of accept_routes"
    assert reason(policy, entry("10.201.0.0/16")) == "outside the networks of accept_routes"


def test_a_list_does_not_lift_the_underlay_rules() -> None:
    policy = (IPv4Network("192.168.0.0/16"),)
    assert (
        reason(policy, entry("192.168.1.0/24")) == "would capture the default gateway 192.168.1.1"
    )


def test_routes_via_ourselves_install_nothing_and_are_not_judged() -> None:
    assert reason("safe", entry("192.168.1.0/24", OWN)) is None


def test_duplicates_count_once_and_order_is_kept() -> None:
    routes = [entry("172.30.0.0/16"), entry("172.31.0.0/16"), entry("172.30.0.0/16")]
    assert decide("safe", UNDERLAY, routes).accepted == tuple(routes[:2])


def test_the_cap_refuses_what_is_over_it() -> None:
    routes = [entry(f"172.{16 + i // 256}.{i % 256}.0/24") for i in range(MAX_ACCEPTED_ROUTES + 5)]
    decision = decide("safe", UNDERLAY, [entry("127.0.0.0/8"), *routes])
    assert len(decision.accepted) == MAX_ACCEPTED_ROUTES
    assert decision.over_cap == 5
    assert len(decision.refused) == 6
    assert all(why.startswith("over the cap") for _, why in decision.refused[1:])


def test_refusals_are_logged_once_per_entry_and_reason() -> None:
    log = RefusalLog()
    first = decide("safe", UNDERLAY, [entry("127.0.0.0/8"), entry("0.0.0.0/0"), GOOD])
    assert [route for route, _ in log.new_refusals(first)] == [
        entry("127.0.0.0/8"),
        entry("0.0.0.0/0"),
    ]
    assert log.new_refusals(first) == []  # the same set re-sent
    other_reason = decide("none", UNDERLAY, [entry("127.0.0.0/8")])
    assert len(log.new_refusals(other_reason)) == 1


def test_the_cap_warning_comes_once_and_over_cap_entries_are_not_logged_one_by_one() -> None:
    log = RefusalLog()
    routes = [entry(f"172.{16 + i // 256}.{i % 256}.0/24") for i in range(MAX_ACCEPTED_ROUTES + 1)]
    decision = decide("safe", UNDERLAY, routes)
    assert log.cap_warning_due(decision)
    assert not log.cap_warning_due(decision)
    assert log.new_refusals(decision) == []
    assert not RefusalLog().cap_warning_due(Decision())


def test_the_refusal_log_is_bounded() -> None:
    log = RefusalLog(limit=2)
    decision = decide("none", UNDERLAY, [entry(f"172.30.{i}.0/24") for i in range(5)])
    assert len(log.new_refusals(decision)) == 2
    assert log.new_refusals(decision) == []
