"""Which sdwan ROUTE entries (PROTOCOL 2.6) a client installs: the decision, without I/O.

A route from the server goes into the client's kernel routing table, so a
hostile server (or anyone on a ``ws://`` path) could otherwise send the
client's own traffic to the server, cut it off from its gateway, or black-hole
its LAN. `decide` applies the ``accept_routes`` policy and the underlay rules
to the entries offered; the caller gathers the facts (`Underlay`) and does the
installing and the logging (`RefusalLog` says what is new enough to log).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from p2pvpn.config import AcceptRoutes

__all__ = [
    "MAX_ACCEPTED_ROUTES",
    "MIN_PREFIX_LENGTH",
    "Decision",
    "RefusalLog",
    "RouteEntry",
    "Underlay",
    "decide",
]

RouteEntry = tuple[IPv4Network, IPv4Address]  # (destination, next hop)

MAX_ACCEPTED_ROUTES = 256
MIN_PREFIX_LENGTH = 8  # shorter prefixes (and the default route) only with accept_routes = all

# Ranges a route must never reach into: traffic to them is local to this host or its link.
_SPECIAL_RANGES: tuple[tuple[IPv4Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (IPv4Network("240.0.0.0/4"), "reserved and broadcast (240.0.0.0/4)"),
)

OVER_CAP = f"over the cap of {MAX_ACCEPTED_ROUTES} accepted routes"


@dataclass(frozen=True, slots=True)
class Underlay:
    """What the client's own connectivity depends on, gathered by the caller.

    ``endpoints`` are single addresses with a label for the refusal reason
    (the server, the STUN server, peer endpoints, the default gateway);
    ``subnets`` are the LAN subnets of this host's other interfaces.
    """

    vpn: IPv4Network
    own_ip: IPv4Address
    endpoints: tuple[tuple[IPv4Address, str], ...] = ()
    subnets: tuple[IPv4Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    accepted: tuple[RouteEntry, ...] = ()
    refused: tuple[tuple[RouteEntry, str], ...] = ()
    over_cap: int = 0  # how many refused entries only fell over the cap


def decide(policy: AcceptRoutes, underlay: Underlay, offered: Iterable[RouteEntry]) -> Decision:
    """Split ``offered`` into accepted entries and refused (entry, reason) pairs.

    Duplicates count once; the order of the offer is kept. An entry whose next
    hop is this client installs nothing (we are the gateway; the kernel routes
    it), so only the policy ``none`` refuses it.
    """
    accepted: list[RouteEntry] = []
    refused: list[tuple[RouteEntry, str]] = []
    over_cap = 0
    for entry in dict.fromkeys(offered):
        reason = _refusal(policy, underlay, entry)
        if reason is None and len(accepted) >= MAX_ACCEPTED_ROUTES:
            reason = OVER_CAP
            over_cap += 1
        if reason is None:
            accepted.append(entry)
        else:
            refused.append((entry, reason))
    return Decision(tuple(accepted), tuple(refused), over_cap)


def _refusal(policy: AcceptRoutes, underlay: Underlay, entry: RouteEntry) -> str | None:
    network, nexthop = entry
    if policy == "none":
        return "accept_routes = none"
    if nexthop == underlay.own_ip:
        return None
    if isinstance(policy, tuple) and not any(network.subnet_of(allowed) for allowed in policy):
        return "outside the networks of accept_routes"
    if policy != "all":
        if network.prefixlen < MIN_PREFIX_LENGTH:
            what = "the default route" if network.prefixlen == 0 else "a prefix"
            return f"{what} shorter than /{MIN_PREFIX_LENGTH} (needs accept_routes = all)"
        if nexthop not in underlay.vpn:
            return f"next hop {nexthop} is outside the VPN network {underlay.vpn}"
    return _special_range(policy, network) or _underlay_capture(underlay, network)


def _special_range(policy: AcceptRoutes, network: IPv4Network) -> str | None:
    for special, name in _SPECIAL_RANGES:
        # With accept_routes = all a wide route may span these ranges (the
        # local table still wins for loopback); a route into one never makes sense.
        hit = network.subnet_of(special) if policy == "all" else network.overlaps(special)
        if hit:
            return f"reaches into {name}"
    return None


def _underlay_capture(underlay: Underlay, network: IPv4Network) -> str | None:
    if network.overlaps(underlay.vpn):
        return f"overlaps the VPN network {underlay.vpn}"
    for address, label in underlay.endpoints:
        if address in network:
            return f"would capture {label} {address}"
    for subnet in underlay.subnets:
        if network.overlaps(subnet):
            return f"overlaps the LAN subnet {subnet}"
    return None


@dataclass(slots=True)
class RefusalLog:
    """Remembers what was logged, so a re-sent set logs nothing new.

    Bounded: a server sending ever new entries cannot grow it without limit;
    once full, refusals are no longer logged one by one.
    """

    limit: int = 4096
    _seen: set[tuple[RouteEntry, str]] = field(default_factory=set)
    _cap_warned: bool = False

    def new_refusals(self, decision: Decision) -> list[tuple[RouteEntry, str]]:
        """The refusals of ``decision`` not returned before (the over-cap ones excepted)."""
        fresh = []
        for refusal in decision.refused:
            if refusal[1] == OVER_CAP or refusal in self._seen:
                continue
            if len(self._seen) >= self.limit:
                break
            self._seen.add(refusal)
            fresh.append(refusal)
        return fresh

    def cap_warning_due(self, decision: Decision) -> bool:
        """True the first time a decision hits the cap."""
        if decision.over_cap == 0 or self._cap_warned:
            return False
        self._cap_warned = True
        return True
