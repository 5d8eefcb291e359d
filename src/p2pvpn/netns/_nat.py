"""NAT routers: THE nftables rule set of every NAT in the test bed, the demo and the benchmarks,
and cutting the direct UDP path between two NAT sites."""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Literal

from p2pvpn.netns._links import Link, make_link
from p2pvpn.netns._namespace import Namespace

__all__ = [
    "CUT_TABLE",
    "NAT_TABLE",
    "NatMode",
    "NatSite",
    "block_udp_between",
    "make_nat_router",
    "nat_ruleset",
    "nat_site",
    "unblock",
]

NAT_TABLE = "p2t_nat"
"""The nftables table of `nat_ruleset` (rules can be added to it, e.g. to rebind ports)."""

NatMode = Literal["port-preserving", "random"]


def nat_ruleset(
    wan_ifname: str, mode: NatMode = "port-preserving", *, table: str = NAT_TABLE
) -> str:
    """A NAT towards ``wan_ifname`` that drops unsolicited traffic from the WAN.

    Both modes masquerade what leaves through the WAN interface and drop
    packets that come in on it without a conntrack entry, to the router itself
    too: a punching packet that arrives before ours went out must not create a
    conntrack entry that would then clash with our mapping.
    ``"port-preserving"`` keeps the source port when it is free (plain
    ``masquerade``: an endpoint-independent mapping, good for hole punching);
    ``"random"`` uses ``masquerade random,fully-random`` (a new random port per
    connection, like a symmetric NAT).
    """
    if mode == "port-preserving":
        masquerade = "masquerade"
    elif mode == "random":
        masquerade = "masquerade random,fully-random"
    else:
        raise ValueError(f"unknown NAT mode {mode!r}")
    wan = json.dumps(wan_ifname)
    return f"""\
table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname {wan} {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {wan} ct state new drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {wan} ct state new drop
    }}
}}
"""


def make_nat_router(
    router: Namespace,
    wan_ifname: str,
    mode: NatMode = "port-preserving",
    *,
    table: str = NAT_TABLE,
) -> str:
    """Make ``router`` forward and NAT towards ``wan_ifname`` (`nat_ruleset`); returns the rules."""
    ruleset = nat_ruleset(wan_ifname, mode, table=table)
    router.enable_forwarding()
    router.nft(ruleset)
    return ruleset


@dataclass(frozen=True)
class NatSite:
    """A host behind a NAT router."""

    router: Namespace
    host: Namespace
    wan_ifname: str
    wan_address: IPv4Interface
    lan: Link
    ruleset: str

    @property
    def public_ip(self) -> IPv4Address:
        return self.wan_address.ip

    @property
    def host_ip(self) -> IPv4Address:
        return self.lan.ip(self.host)


def nat_site(
    router: Namespace,
    host: Namespace,
    wan_ifname: str,
    wan_address: IPv4Interface,
    lan_cidr: IPv4Network | str,
    *,
    mode: NatMode = "port-preserving",
) -> NatSite:
    """Put ``host`` behind ``router``, whose WAN side (``wan_ifname``) is wired already.

    The LAN is a veth link on ``lan_cidr``: router .1, host .2; the host's
    default route goes through the router.
    """
    lan_net = IPv4Network(lan_cidr)
    router_lan = IPv4Interface(f"{lan_net.network_address + 1}/{lan_net.prefixlen}")
    host_lan = IPv4Interface(f"{lan_net.network_address + 2}/{lan_net.prefixlen}")
    lan = make_link(router, host, router_lan, host_lan)
    host.default_route(router_lan)
    ruleset = make_nat_router(router, wan_ifname, mode)
    return NatSite(router, host, wan_ifname, wan_address, lan, ruleset)


CUT_TABLE = "p2t_cut"


def block_udp_between(router: Namespace, other_public_ip: str) -> None:
    """Cut the direct UDP path between ``router``'s site and ``other_public_ip`` (another
    site's NAT); STUN to the server stays open. `unblock` restores it."""
    router.nft(f"""
table ip {CUT_TABLE} {{
    chain forward {{
        type filter hook forward priority -10; policy accept;
        ip daddr {other_public_ip} udp dport != 3478 drop
        ip saddr {other_public_ip} meta l4proto udp drop
    }}
}}
""")


def unblock(router: Namespace) -> None:
    """Undo `block_udp_between`."""
    router.run(["nft", "delete", "table", "ip", CUT_TABLE])
