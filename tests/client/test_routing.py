"""Client-relay distance-vector table (PROTOCOL 5), sans I/O."""

import struct
from collections import deque
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvpn.client.routing import (
    MAX_DELAY,
    MAX_ROUTES,
    Advertise,
    DropRoute,
    Route,
    RouteAction,
    RouteRefused,
    RouteTable,
    SetRoute,
    is_deletion,
)
from p2pvpn.wire.peer import ROUTE_DELETED, RouteAdvert, decode_peer_message

A = IPv4Address("192.168.202.1")
B = IPv4Address("192.168.202.2")
C = IPv4Address("192.168.202.3")
D = IPv4Address("192.168.202.4")
COST = 5


def table(own: IPv4Address = A, cost: int = COST) -> RouteTable:
    return RouteTable(own, cost)


def adverts(actions: list[RouteAction]) -> list[RouteAdvert]:
    return [a.advert for a in actions if isinstance(a, Advertise)]


def deleted(dst: IPv4Address, own: IPv4Address = A) -> Advertise:
    return Advertise(RouteAdvert(dst, own, ROUTE_DELETED))


@pytest.mark.parametrize(
    ("delay", "deletion"),
    [(-1, True), (0, False), (1, False), (MAX_DELAY, False), (1001, True), (ROUTE_DELETED, True)],
)
def test_is_deletion(delay: int, deletion: bool) -> None:
    assert is_deletion(delay) is deletion


def test_route_is_direct_when_next_hop_is_destination() -> None:
    assert Route(B, B, 1).direct
    assert not Route(C, B, 1).direct


def test_negative_cost_rejected() -> None:
    with pytest.raises(ValueError, match="cost"):
        RouteTable(A, -1)


# ------------------------------------------------------------------ cost 0


def test_cost_zero_does_nothing_at_all() -> None:
    routes = table(cost=0)
    assert not routes.enabled
    assert routes.on_direct_rtt(B, 10) == []
    assert routes.on_advert(RouteAdvert(C, B, 10)) == []
    assert routes.on_advert(RouteAdvert(C, B, ROUTE_DELETED)) == []
    assert routes.on_peer_lost(B) == []
    assert routes.routes() == []
    assert routes.lookup(B) is None
    assert routes.advertisements() == []


# ------------------------------------------------------------ direct entries


def test_direct_rtt_creates_an_entry_and_advertises_it() -> None:
    routes = table()
    assert routes.on_direct_rtt(B, 20) == [Advertise(RouteAdvert(B, A, 20 + COST))]
    assert routes.lookup(B) == Route(B, B, 20)
    assert routes.routes() == [Route(B, B, 20)]


def test_direct_rtt_same_next_hop_replaces_even_when_slower() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_direct_rtt(B, 90) == [Advertise(RouteAdvert(B, A, 90 + COST))]
    assert routes.lookup(B) == Route(B, B, 90)


def test_direct_rtt_unchanged_is_re_advertised() -> None:
    # Candy re-sends on every accepted update; peers that connected later
    # learn the route from these refreshes.
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_direct_rtt(B, 20) == [Advertise(RouteAdvert(B, A, 20 + COST))]


def relayed_to_b(delay_via_c: int) -> RouteTable:
    """A table where B is reached through C."""
    routes = table()
    routes.on_direct_rtt(C, 10)
    routes.on_advert(RouteAdvert(B, C, delay_via_c - 10))
    assert routes.lookup(B) == Route(B, C, delay_via_c)
    return routes


def test_faster_direct_entry_replaces_a_relayed_one() -> None:
    routes = relayed_to_b(50)
    actions = routes.on_direct_rtt(B, 30)
    assert actions == [DropRoute(B), Advertise(RouteAdvert(B, A, 30 + COST))]
    assert routes.lookup(B) == Route(B, B, 30)


@pytest.mark.parametrize("rtt", [50, 60])
def test_slower_or_equal_direct_entry_keeps_the_relayed_one(rtt: int) -> None:
    routes = relayed_to_b(50)
    assert routes.on_direct_rtt(B, rtt) == []
    assert routes.lookup(B) == Route(B, C, 50)


@pytest.mark.parametrize("rtt", [-1, 1001, ROUTE_DELETED])
def test_out_of_range_direct_rtt_deletes_everything_through_the_peer(rtt: int) -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_advert(RouteAdvert(C, B, 10))
    actions = routes.on_direct_rtt(B, rtt)
    assert actions == [deleted(B), DropRoute(C), deleted(C)]
    assert routes.routes() == []


def test_direct_rtt_to_ourselves_ignored() -> None:
    assert table().on_direct_rtt(A, 1) == []


# ------------------------------------------------------------------- adverts


def test_advert_for_our_own_address_ignored() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_advert(RouteAdvert(A, B, 1)) == []
    assert routes.lookup(A) is None


def test_advert_without_a_direct_entry_for_next_ignored() -> None:
    routes = table()
    assert routes.on_advert(RouteAdvert(C, B, 10)) == []
    assert routes.routes() == []


def test_advert_through_a_relayed_next_hop_ignored() -> None:
    # PROTOCOL 5 needs a *direct* entry for next (Candy takes any entry).
    routes = relayed_to_b(50)
    assert routes.on_advert(RouteAdvert(D, B, 10)) == []
    assert routes.lookup(D) is None


def test_advert_to_next_itself_ignored() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_advert(RouteAdvert(B, B, 500)) == []
    assert routes.on_advert(RouteAdvert(B, B, ROUTE_DELETED)) == []
    assert routes.lookup(B) == Route(B, B, 20)


def test_advert_creates_a_relayed_route() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    actions = routes.on_advert(RouteAdvert(C, B, 15))
    assert actions == [SetRoute(C, B), Advertise(RouteAdvert(C, A, 35 + COST))]
    assert routes.lookup(C) == Route(C, B, 35)


def test_advert_through_the_same_next_hop_always_taken() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    # Worse, but it is the route we use: no new SetRoute, new advert.
    assert routes.on_advert(RouteAdvert(C, B, 400)) == [Advertise(RouteAdvert(C, A, 420 + COST))]
    assert routes.lookup(C) == Route(C, B, 420)


def test_faster_advert_through_another_next_hop_taken() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_direct_rtt(D, 5)
    routes.on_advert(RouteAdvert(C, B, 15))
    actions = routes.on_advert(RouteAdvert(C, D, 10))
    assert actions == [SetRoute(C, D), Advertise(RouteAdvert(C, A, 15 + COST))]
    assert routes.lookup(C) == Route(C, D, 15)


@pytest.mark.parametrize("delay", [30, 31])
def test_slower_or_equal_advert_through_another_next_hop_ignored(delay: int) -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_direct_rtt(D, 5)
    routes.on_advert(RouteAdvert(C, B, 15))  # 35 via B
    assert routes.on_advert(RouteAdvert(C, D, delay)) == []
    assert routes.lookup(C) == Route(C, B, 35)


def test_faster_relay_replaces_a_direct_entry() -> None:
    routes = table()
    routes.on_direct_rtt(B, 10)
    routes.on_direct_rtt(C, 100)
    actions = routes.on_advert(RouteAdvert(C, B, 20))
    assert actions == [SetRoute(C, B), Advertise(RouteAdvert(C, A, 30 + COST))]
    assert routes.lookup(C) == Route(C, B, 30)


@pytest.mark.parametrize("delay", [0, MAX_DELAY])
def test_advert_delay_bounds_are_routes(delay: int) -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_advert(RouteAdvert(C, B, delay))[0] == SetRoute(C, B)


@pytest.mark.parametrize("delay", [-1, MAX_DELAY + 1, ROUTE_DELETED])
def test_deletion_removes_the_route_through_next(delay: int) -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    assert routes.on_advert(RouteAdvert(C, B, delay)) == [DropRoute(C), deleted(C)]
    assert routes.lookup(C) is None
    assert routes.lookup(B) == Route(B, B, 20)


def test_deletion_through_another_next_hop_ignored() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_direct_rtt(D, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    assert routes.on_advert(RouteAdvert(C, D, ROUTE_DELETED)) == []
    assert routes.on_advert(RouteAdvert(D, B, ROUTE_DELETED)) == []  # D is direct
    assert routes.lookup(C) == Route(C, B, 35)
    assert routes.lookup(D) == Route(D, D, 20)


def test_deletion_of_an_unknown_route_ignored() -> None:
    assert table().on_advert(RouteAdvert(C, B, ROUTE_DELETED)) == []


@pytest.mark.parametrize("size", [13, 17])
def test_decoded_adverts_of_both_sizes_feed_the_table(size: int) -> None:
    # The 13-byte (i32) and 17-byte (i64) layouts are wire/peer.py's business;
    # the table only sees RouteAdvert.
    layout = "!B4s4si" if size == 13 else "!B4s4sq"
    advert = decode_peer_message(struct.pack(layout, 4, C.packed, B.packed, 15))
    assert advert == RouteAdvert(C, B, 15)
    assert isinstance(advert, RouteAdvert)
    routes = table()
    routes.on_direct_rtt(B, 20)
    assert routes.on_advert(advert)[0] == SetRoute(C, B)


def test_decoded_deletion_from_a_17_byte_advert() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    advert = decode_peer_message(struct.pack("!B4s4sq", 4, C.packed, B.packed, 2**40))
    assert isinstance(advert, RouteAdvert)
    assert routes.on_advert(advert) == [DropRoute(C), deleted(C)]


# ---------------------------------------------------------------- peer lost


def test_peer_lost_removes_every_route_through_it() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_direct_rtt(D, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    actions = routes.on_peer_lost(B)
    # The direct entry was never given to the data plane: no DropRoute for it.
    assert actions == [deleted(B), DropRoute(C), deleted(C)]
    assert routes.routes() == [Route(D, D, 20)]


def test_peer_lost_keeps_routes_to_it_through_others() -> None:
    routes = relayed_to_b(50)
    assert routes.on_peer_lost(B) == []
    assert routes.lookup(B) == Route(B, C, 50)


def test_unknown_peer_lost() -> None:
    assert table().on_peer_lost(B) == []


def test_advertisements_are_the_whole_table_plus_cost() -> None:
    routes = table()
    routes.on_direct_rtt(B, 20)
    routes.on_advert(RouteAdvert(C, B, 15))
    assert routes.advertisements() == [RouteAdvert(B, A, 25), RouteAdvert(C, A, 40)]


# --------------------------------------------------------------------- cap


def test_table_cap_refuses_new_relayed_destinations() -> None:
    routes = RouteTable(A, COST, max_routes=3)
    routes.on_direct_rtt(B, 10)
    routes.on_advert(RouteAdvert(C, B, 10))
    routes.on_advert(RouteAdvert(D, B, 10))
    far = IPv4Address("192.168.202.99")
    assert routes.on_advert(RouteAdvert(far, B, 10)) == [RouteRefused(far)]
    assert routes.lookup(far) is None
    assert len(routes.routes()) == 3
    # Entries already there still update, and a removal makes room again.
    assert adverts(routes.on_advert(RouteAdvert(C, B, 20))) == [RouteAdvert(C, A, 10 + 20 + COST)]
    routes.on_advert(RouteAdvert(D, B, ROUTE_DELETED))
    assert SetRoute(far, B) in routes.on_advert(RouteAdvert(far, B, 10))


def test_table_cap_does_not_refuse_direct_entries() -> None:
    # A flood of adverts must not stop us from advertising the peers we reach.
    routes = RouteTable(A, COST, max_routes=2)
    routes.on_direct_rtt(B, 10)
    routes.on_advert(RouteAdvert(C, B, 10))
    assert routes.on_direct_rtt(D, 10) == [Advertise(RouteAdvert(D, A, 10 + COST))]
    assert routes.lookup(D) == Route(D, D, 10)


def test_default_cap_under_a_flood_of_adverts() -> None:
    routes = table()
    routes.on_direct_rtt(B, 10)
    refused = 0
    for n in range(MAX_ROUTES + 100):
        dst = IPv4Address(int(IPv4Address("10.0.0.0")) + n)
        refused += any(
            isinstance(a, RouteRefused) for a in routes.on_advert(RouteAdvert(dst, B, 1))
        )
    assert len(routes.routes()) == MAX_ROUTES
    assert refused == 101  # B's direct entry took one place


# ---------------------------------------------------------- small networks


class Network:
    """Tables joined by direct links; adverts travel over the links only."""

    def __init__(self, cost: int = COST) -> None:
        self.tables: dict[IPv4Address, RouteTable] = {}
        self.links: dict[frozenset[IPv4Address], int] = {}
        self.cost = cost
        self.queue: deque[tuple[IPv4Address, RouteAdvert]] = deque()
        self.messages = 0

    def node(self, ip: IPv4Address) -> RouteTable:
        return self.tables.setdefault(ip, RouteTable(ip, self.cost))

    def neighbours(self, ip: IPv4Address) -> list[IPv4Address]:
        return sorted(other for link in self.links for other in link - {ip} if ip in link)

    def send(self, ip: IPv4Address, actions: list[RouteAction]) -> None:
        for advert in adverts(actions):
            for neighbour in self.neighbours(ip):
                self.queue.append((neighbour, advert))

    def link(self, x: IPv4Address, y: IPv4Address, rtt: int) -> None:
        """Both ends measure the rtt, then each sends its table to the other.

        Routes learnt before the link existed reach the new neighbour only
        through ``advertisements()``: without it they would wait for the next
        refresh. They must follow the rtt, as adverts from a peer without a
        direct entry are ignored.
        """
        self.links[frozenset((x, y))] = rtt
        for me, other in ((x, y), (y, x)):
            self.send(me, self.node(me).on_direct_rtt(other, rtt))
        for me, other in ((x, y), (y, x)):
            self.queue.extend((other, advert) for advert in self.node(me).advertisements())
        self.settle()

    def unlink(self, x: IPv4Address, y: IPv4Address) -> None:
        del self.links[frozenset((x, y))]
        for me, other in ((x, y), (y, x)):
            self.send(me, self.node(me).on_peer_lost(other))
        self.settle()

    def settle(self) -> None:
        while self.queue:
            self.messages += 1
            assert self.messages < 10_000, "adverts never settle"
            ip, advert = self.queue.popleft()
            self.send(ip, self.node(ip).on_advert(advert))

    def refresh(self) -> None:
        """The periodic DELAY probes: every link measures its rtt again."""
        for link, rtt in sorted(self.links.items(), key=lambda item: sorted(item[0])):
            x, y = sorted(link)
            for me, other in ((x, y), (y, x)):
                self.send(me, self.node(me).on_direct_rtt(other, rtt))
        self.settle()

    def path(self, src: IPv4Address, dst: IPv4Address) -> list[IPv4Address]:
        """Where a packet goes: the relay route if any, else the direct link
        (PROTOCOL 4: a CONNECTED peer is reached directly without a route)."""
        hops = [src]
        while hops[-1] != dst:
            route = self.node(hops[-1]).lookup(dst)
            if route is None and frozenset((hops[-1], dst)) in self.links:
                route = Route(dst, dst, self.links[frozenset((hops[-1], dst))])
            assert route is not None, f"{hops[-1]} has no route to {dst}"
            assert frozenset((hops[-1], route.next_hop)) in self.links
            hops.append(route.next_hop)
            assert len(hops) <= len(self.tables), f"loop: {hops}"
        return hops


def test_routes_learnt_before_a_link_need_the_table_dump() -> None:
    net = Network()
    net.link(A, B, 20)
    c = net.node(C)
    c.on_direct_rtt(B, 10)
    # B's route to A was advertised before C was there.
    assert c.lookup(A) is None
    for advert in net.node(B).advertisements():
        c.on_advert(advert)
    assert c.lookup(A) == Route(A, B, 10 + 20 + COST)


def test_a_b_c_line_routes_through_b() -> None:
    net = Network()
    net.link(A, B, 20)
    net.link(B, C, 10)
    # B advertises C with d = rtt(B, C) + cost; A adds rtt(A, B).
    assert net.node(A).lookup(C) == Route(C, B, 20 + 10 + COST)
    assert net.node(C).lookup(A) == Route(A, B, 10 + 20 + COST)
    assert net.node(B).lookup(A) == Route(A, A, 20)
    assert net.node(B).lookup(C) == Route(C, C, 10)
    assert net.path(A, C) == [A, B, C]
    assert net.path(C, A) == [C, B, A]


def test_a_b_c_line_forgets_c_when_b_loses_it() -> None:
    net = Network()
    net.link(A, B, 20)
    net.link(B, C, 10)
    net.unlink(B, C)
    assert net.node(A).lookup(C) is None
    assert net.node(C).lookup(A) is None
    assert net.node(A).lookup(B) == Route(B, B, 20)


def test_triangle_prefers_the_faster_relay_and_falls_back() -> None:
    net = Network(cost=1)
    net.link(A, B, 10)
    net.link(B, C, 10)
    net.link(A, C, 100)
    assert net.path(A, C) == [A, B, C]
    assert net.node(A).lookup(C) == Route(C, B, 21)
    net.unlink(A, B)
    # One entry per destination: the direct A-C entry was replaced by the
    # relay, so it is gone until the next measurement; packets still go
    # directly because C is CONNECTED. B is unreachable until C re-advertises.
    assert net.node(A).lookup(C) is None
    assert net.path(A, C) == [A, C]
    assert net.node(A).lookup(B) is None
    net.refresh()
    assert net.node(A).lookup(C) == Route(C, C, 100)
    assert net.path(A, B) == [A, C, B]
    assert net.node(A).lookup(B) == Route(B, C, 100 + 10 + 1)


def test_square_is_loop_free() -> None:
    net = Network(cost=2)
    net.link(A, B, 10)
    net.link(B, C, 10)
    net.link(C, D, 10)
    net.link(D, A, 50)
    for src in (A, B, C, D):
        for dst in (A, B, C, D):
            if src != dst:
                net.path(src, dst)
    assert net.path(A, D) == [A, B, C, D]


NODES = [IPv4Address(f"192.168.202.{i}") for i in range(1, 6)]
LINKS = st.tuples(st.sampled_from(NODES), st.sampled_from(NODES)).filter(lambda p: p[0] < p[1])
OPERATIONS = st.lists(
    st.tuples(st.booleans(), LINKS, st.integers(1, 300), st.booleans()), max_size=25
)


@settings(max_examples=300, deadline=None)
@given(operations=OPERATIONS, cost=st.integers(1, 50))
def test_random_topologies_settle_loop_free(
    operations: list[tuple[bool, tuple[IPv4Address, IPv4Address], int, bool]], cost: int
) -> None:
    net = Network(cost=cost)
    for ip in NODES:
        net.node(ip)
    for up, (x, y), rtt, refresh in operations:
        if up and frozenset((x, y)) not in net.links:
            net.link(x, y, rtt)
        elif not up and frozenset((x, y)) in net.links:
            net.unlink(x, y)
        if refresh:
            net.refresh()
        for ip, routes in net.tables.items():
            for route in routes.routes():
                assert route.destination != ip
                assert frozenset((ip, route.next_hop)) in net.links, "route via a lost peer"
        for src in NODES:
            for dst in NODES:
                if src != dst and net.node(src).lookup(dst) is not None:
                    net.path(src, dst)  # asserts: no loop, every hop a live link
