"""Client-relay distance-vector table (PROTOCOL 5), sans I/O.

Inputs are measured round trips to direct peers, ROUTE adverts received from
peers and lost peers; outputs are actions for the caller: data-plane route
changes and adverts to send to every CONNECTED peer. With a route cost of 0
(relaying off) the table stays empty and every method returns nothing.

Adverts come from peers that may be hostile, so the number of relayed entries
is capped: a destination beyond the cap is refused (``RouteRefused``) rather
than letting one member grow our memory without end.
"""

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TypeAlias

from p2pvpn.wire.peer import ROUTE_DELETED, RouteAdvert

__all__ = [
    "MAX_DELAY",
    "MAX_ROUTES",
    "Advertise",
    "DropRoute",
    "Route",
    "RouteAction",
    "RouteRefused",
    "RouteTable",
    "SetRoute",
    "is_deletion",
]

logger = logging.getLogger(__name__)

# Delays outside 0..MAX_DELAY ms mean "no route" (PROTOCOL 5).
MAX_DELAY = 1000
# Relayed entries the table holds at most. Direct entries are not counted
# against it: they are bounded by the peer table, and refusing one would stop
# us from advertising a peer we really reach.
MAX_ROUTES = 4096


def is_deletion(delay_ms: int) -> bool:
    return delay_ms < 0 or delay_ms > MAX_DELAY


@dataclass(frozen=True, slots=True)
class Route:
    destination: IPv4Address
    next_hop: IPv4Address
    delay_ms: int

    @property
    def direct(self) -> bool:
        return self.next_hop == self.destination


@dataclass(frozen=True, slots=True)
class SetRoute:
    """Relay packets for ``destination`` through ``next_hop`` (data_plane.set_route)."""

    destination: IPv4Address
    next_hop: IPv4Address


@dataclass(frozen=True, slots=True)
class DropRoute:
    """Stop relaying ``destination`` (data_plane.drop_route); only after a SetRoute."""

    destination: IPv4Address


@dataclass(frozen=True, slots=True)
class Advertise:
    """Send ``advert`` to every CONNECTED peer."""

    advert: RouteAdvert


@dataclass(frozen=True, slots=True)
class RouteRefused:
    """The table is full: no entry for ``destination`` (the caller counts it)."""

    destination: IPv4Address


RouteAction: TypeAlias = SetRoute | DropRoute | Advertise | RouteRefused


class RouteTable:
    """One entry per destination: the best next hop we know and its delay."""

    def __init__(self, own_ip: IPv4Address, cost: int, *, max_routes: int = MAX_ROUTES) -> None:
        if cost < 0:
            raise ValueError(f"route cost must be >= 0, got {cost}")
        self._own_ip = own_ip
        self._cost = cost
        self._max_routes = max_routes
        self._routes: dict[IPv4Address, Route] = {}

    @property
    def enabled(self) -> bool:
        return self._cost > 0

    def lookup(self, dst: IPv4Address) -> Route | None:
        return self._routes.get(dst)

    def routes(self) -> list[Route]:
        return sorted(self._routes.values(), key=lambda route: route.destination)

    def advertisements(self) -> list[RouteAdvert]:
        """The whole table as adverts, for a peer that has just connected."""
        return [self._advert(route) for route in self.routes()]

    # --------------------------------------------------------------- events

    def on_direct_rtt(self, peer: IPv4Address, rtt_ms: int) -> list[RouteAction]:
        """A DELAY probe to the directly connected ``peer`` came back."""
        if not self.enabled or peer == self._own_ip:
            return []
        if is_deletion(rtt_ms):
            # Candy feeds an out-of-range direct rtt to the same code path as
            # a lost peer: every route through it goes.
            return self.on_peer_lost(peer)
        current = self._routes.get(peer)
        if current is None or current.next_hop == peer or rtt_ms < current.delay_ms:
            return self._install(Route(peer, peer, rtt_ms))
        return []

    def on_advert(self, advert: RouteAdvert) -> list[RouteAction]:
        """A peer's ROUTE{dst, next, delay} arrived."""
        if not self.enabled or advert.dst == self._own_ip:
            return []
        if advert.dst == advert.next:
            # A client never advertises a route to itself; taking it as
            # "through next" would overwrite our direct entry with a worse one.
            return []
        if is_deletion(advert.delay_ms):
            return self._withdraw(advert.dst, advert.next)
        via = self._routes.get(advert.next)
        if via is None or not via.direct:
            return []
        candidate = via.delay_ms + advert.delay_ms
        current = self._routes.get(advert.dst)
        if current is None or current.next_hop == advert.next or candidate < current.delay_ms:
            return self._install(Route(advert.dst, advert.next, candidate))
        return []

    def on_peer_lost(self, peer: IPv4Address) -> list[RouteAction]:
        """``peer`` left CONNECTED: every route through it is gone."""
        if not self.enabled:
            return []
        actions: list[RouteAction] = []
        for route in self.routes():
            if route.next_hop == peer:
                actions += self._remove(route)
        return actions

    # ------------------------------------------------------------- internals

    def _withdraw(self, dst: IPv4Address, next_hop: IPv4Address) -> list[RouteAction]:
        current = self._routes.get(dst)
        if current is None or current.next_hop != next_hop:
            return []
        return self._remove(current)

    def _install(self, route: Route) -> list[RouteAction]:
        old = self._routes.get(route.destination)
        if old is None and not route.direct and len(self._routes) >= self._max_routes:
            logger.debug("route: dst=%s refused, table full", route.destination)
            return [RouteRefused(route.destination)]
        self._routes[route.destination] = route
        actions: list[RouteAction] = []
        if not route.direct and (old is None or old.next_hop != route.next_hop):
            actions.append(SetRoute(route.destination, route.next_hop))
        elif route.direct and old is not None and not old.direct:
            actions.append(DropRoute(route.destination))
        # Like Candy, re-advertise on every accepted update, even one that
        # changes nothing: Candy has no full-table dump, so peers that
        # connected later learn our routes from these refreshes (each DELAY
        # answer, every 60 s).
        actions.append(Advertise(self._advert(route)))
        logger.debug(
            "route: dst=%s next=%s delay=%d", route.destination, route.next_hop, route.delay_ms
        )
        return actions

    def _remove(self, route: Route) -> list[RouteAction]:
        del self._routes[route.destination]
        actions: list[RouteAction] = []
        if not route.direct:
            actions.append(DropRoute(route.destination))
        deleted = RouteAdvert(route.destination, self._own_ip, ROUTE_DELETED)
        actions.append(Advertise(deleted))
        logger.debug("route: dst=%s next=%s deleted", route.destination, route.next_hop)
        return actions

    def _advert(self, route: Route) -> RouteAdvert:
        return RouteAdvert(route.destination, self._own_ip, route.delay_ms + self._cost)
