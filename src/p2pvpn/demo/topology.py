"""The demo network: who lives where, and the nftables rule set that cuts a direct path.

::

                      "internet" 203.0.113.0/24 (bridge in p2pdemo-inet)
           +-------------------------+--------------------------+
        server .1                 nat1 .11                   nat2 .12
     (ws :8080, STUN :3478)          | masquerade                | masquerade
                            LAN 192.168.1.0/24           LAN 192.168.2.0/24
                             alice .2   carol .3               bob .2
                                          |
                              web 198.51.100.1 (carol's uplink)

alice and carol share a LAN (they connect over their LAN addresses); bob is
behind a second NAT (alice <-> bob and carol <-> bob punch through both NATs).
The NAT routers are those of `p2pvpn.netns.nat_ruleset`: endpoint-independent
and port-preserving (plain ``masquerade``), dropping unsolicited packets from
the internet.

Every client has a name (its ``hostname``, answered as ``<name>.vpn`` by each
member's DNS on its VPN address). carol is an exit node (``exit_node =
true``): the host "web" is linked to carol alone and is her default route (the
demo internet stays reachable through nat1), and bob sends all his traffic
out through her (``exit = carol``), so his pings reach web, which nothing
else in the demo can reach.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

__all__ = [
    "BLOCK_TABLE",
    "CLIENTS",
    "DOMAIN",
    "EXIT_NODE",
    "EXIT_USER",
    "INTERNET",
    "NAMESPACE_PREFIX",
    "NAT_TABLE",
    "ROUTERS",
    "SERVER",
    "STUN_PORT",
    "VPN_NETWORK",
    "WAN_IFNAME",
    "WEB",
    "WEB_NETWORK",
    "WS_PORT",
    "ClientSite",
    "RouterSite",
    "ServerSite",
    "block_ruleset",
    "namespace_name",
    "pairs",
]

NAMESPACE_PREFIX = "p2pdemo-"
INTERNET = IPv4Network("203.0.113.0/24")
VPN_NETWORK = IPv4Network("10.77.0.0/24")
WS_PORT = 8080
STUN_PORT = 3478
WAN_IFNAME = "wan0"
LAN_BRIDGE = "br0"
NAT_TABLE = "p2pdemo_nat"
BLOCK_TABLE = "p2pdemo_block"


def namespace_name(role: str) -> str:
    return f"{NAMESPACE_PREFIX}{role}"


@dataclass(frozen=True)
class ServerSite:
    name: str
    address: IPv4Interface

    @property
    def namespace(self) -> str:
        return namespace_name(self.name)

    @property
    def ws_url(self) -> str:
        return f"wss://{self.address.ip}:{WS_PORT}/"

    @property
    def stun_url(self) -> str:
        return f"stun://{self.address.ip}:{STUN_PORT}"


@dataclass(frozen=True)
class RouterSite:
    name: str
    wan: IPv4Interface
    lan: IPv4Interface  # the router's own address on its LAN bridge

    @property
    def namespace(self) -> str:
        return namespace_name(self.name)


@dataclass(frozen=True)
class ClientSite:
    name: str  # also its hostname: <name>.vpn in the DNS
    router: str
    lan: IPv4Interface
    vpn: IPv4Interface
    exit_node: bool = False  # offers itself as an exit node, with "web" behind it
    exit: str | None = None  # the exit node it sends its traffic out through

    @property
    def namespace(self) -> str:
        return namespace_name(self.name)

    @property
    def interface(self) -> str:
        return f"p2pvpn-{self.name}"

    @property
    def port_name(self) -> str:
        """Its veth end on the router's LAN bridge."""
        return f"lan-{self.name}"


SERVER = ServerSite("server", IPv4Interface("203.0.113.1/24"))
ROUTERS = (
    RouterSite("nat1", IPv4Interface("203.0.113.11/24"), IPv4Interface("192.168.1.1/24")),
    RouterSite("nat2", IPv4Interface("203.0.113.12/24"), IPv4Interface("192.168.2.1/24")),
)
EXIT_NODE = "carol"
EXIT_USER = "bob"
CLIENTS = (
    ClientSite("alice", "nat1", IPv4Interface("192.168.1.2/24"), IPv4Interface("10.77.0.1/24")),
    ClientSite(
        EXIT_USER,
        "nat2",
        IPv4Interface("192.168.2.2/24"),
        IPv4Interface("10.77.0.2/24"),
        exit=EXIT_NODE,
    ),
    ClientSite(
        EXIT_NODE,
        "nat1",
        IPv4Interface("192.168.1.3/24"),
        IPv4Interface("10.77.0.3/24"),
        exit_node=True,
    ),
)
INTERNET_HUB = "inet"
DOMAIN = "vpn"
WEB = "web"
"""The role of the host behind the exit node."""
WEB_NETWORK = IPv4Network("198.51.100.0/24")
"""web is .1 on it, the exit node .2 (see `p2pvpn.netns.link_internet_host`)."""


def pairs(names: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """Every ordered pair of distinct names: (a, b), (a, c), (b, a), ..."""
    for source in names:
        for destination in names:
            if source != destination:
                yield source, destination


def block_ruleset(remote: IPv4Address, wan_ifname: str = WAN_IFNAME) -> str:
    """A firewall that drops UDP between this router and ``remote`` (another router).

    Traffic to the server is untouched, so the clients behind this router keep
    their WebSocket and STUN, but no direct path to anyone behind ``remote``.
    """
    wan = json.dumps(wan_ifname)
    return f"""\
table ip {BLOCK_TABLE} {{
    chain forward {{
        type filter hook forward priority filter - 1; policy accept;
        oifname {wan} ip daddr {remote} meta l4proto udp drop
        iifname {wan} ip saddr {remote} meta l4proto udp drop
    }}
}}
"""
