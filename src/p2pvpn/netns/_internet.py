"""An "internet" host that only one namespace reaches: the uplink of an exit node.

The host is linked to its gateway namespace alone and becomes the gateway's
default route, so traffic from anywhere else reaches it only through the
gateway (for an exit node: into the tunnel, out of the exit's masquerade).
It has no route of its own beyond the link, like a server on the internet
that only ever sees the gateway's public address.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from p2pvpn.netns._links import Link, make_link
from p2pvpn.netns._namespace import Namespace

__all__ = ["INTERNET_NETWORK", "InternetHost", "link_internet_host"]

INTERNET_NETWORK = IPv4Network("198.51.100.0/24")
"""The host is .1 of it, the gateway .2 (TEST-NET-2: never a real address)."""


@dataclass(frozen=True)
class InternetHost:
    """``ns``, reachable only through ``gateway`` over ``link``."""

    ns: Namespace
    gateway: Namespace
    link: Link

    @property
    def address(self) -> IPv4Address:
        return self.link.ip(self.ns)

    @property
    def gateway_address(self) -> IPv4Address:
        """The gateway's address on the link: what the host sees as the source of it all."""
        return self.link.ip(self.gateway)


def link_internet_host(
    host: Namespace,
    gateway: Namespace,
    network: IPv4Network | str = INTERNET_NETWORK,
    *,
    gateway_ifname: str | None = None,
) -> InternetHost:
    """Link ``host`` (.1 of ``network``) to ``gateway`` (.2) and make ``host`` the gateway's
    default route. Routes the gateway needs for anything else (its server, its peers) must
    be more specific than the default: this one replaces the one it had.
    ``gateway_ifname``: the link's name on the gateway (default: its next ``ethN``)."""
    net = IPv4Network(network)
    host_address = IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")
    gateway_address = IPv4Interface(f"{net.network_address + 2}/{net.prefixlen}")
    link = make_link(host, gateway, host_address, gateway_address, ifname_b=gateway_ifname)
    gateway.default_route(host_address)
    return InternetHost(host, gateway, link)
