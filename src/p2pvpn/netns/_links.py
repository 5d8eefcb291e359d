"""Veth links between two namespaces and bridged segments, with their IPv4 addresses."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from p2pvpn.netns._namespace import Namespace, interface_name

__all__ = ["SEGMENT_BRIDGE", "Link", "Segment", "make_link"]

SEGMENT_BRIDGE = "br0"
"""The bridge of a segment, in its hub namespace."""


@dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces."""

    a: Namespace
    b: Namespace
    ifname_a: str
    ifname_b: str
    address_a: IPv4Interface | None
    address_b: IPv4Interface | None

    def ifname(self, ns: Namespace) -> str:
        return self.ifname_a if ns is self.a else self.ifname_b

    def address(self, ns: Namespace) -> IPv4Interface:
        address = self.address_a if ns is self.a else self.address_b
        if address is None:
            raise ValueError(f"no address on the {ns.logical} side of this link")
        return address

    def ip(self, ns: Namespace) -> IPv4Address:
        return self.address(ns).ip


def make_link(
    a: Namespace,
    b: Namespace,
    addr_a: IPv4Interface | str | None = None,
    addr_b: IPv4Interface | str | None = None,
    *,
    ifname_a: str | None = None,
    ifname_b: str | None = None,
    mtu: int | None = None,
) -> Link:
    """A veth pair between ``a`` and ``b`` (``ethN`` on each side), addressed and up."""
    ifname_a = interface_name(ifname_a or a.next_ifname())
    ifname_b = interface_name(ifname_b or b.next_ifname())
    a.add_veth(ifname_a, b, ifname_b, mtu=mtu)
    link = Link(
        a,
        b,
        ifname_a,
        ifname_b,
        IPv4Interface(addr_a) if addr_a is not None else None,
        IPv4Interface(addr_b) if addr_b is not None else None,
    )
    for ns, ifname, address in ((a, ifname_a, link.address_a), (b, ifname_b, link.address_b)):
        if address is not None:
            ns.add_address(ifname, address)
    return link


@dataclass
class Segment:
    """A switched L2 segment: bridge `SEGMENT_BRIDGE` in a hub namespace, one veth per member.

    Create the hub with `Segment.create`; members join with `attach`.
    """

    name: str
    network: IPv4Network
    hub: Namespace
    mtu: int | None = None
    members: dict[str, tuple[Namespace, str, IPv4Interface]] = field(default_factory=dict)
    _ports: int = 0

    @classmethod
    def create(
        cls, name: str, network: IPv4Network | str, hub: Namespace, mtu: int | None = None
    ) -> Segment:
        """The segment's bridge in ``hub`` (a namespace of its own), no members yet."""
        hub.add_bridge(SEGMENT_BRIDGE)
        return cls(name, IPv4Network(network), hub, mtu)

    def attach(
        self,
        ns: Namespace,
        address: IPv4Interface | IPv4Address | str | None = None,
        ifname: str | None = None,
        *,
        port: str | None = None,
    ) -> IPv4Interface:
        """Plug ``ns`` into the segment; returns its address (next free host when None).

        ``port`` names the veth end on the bridge (``p1``, ``p2``, ... by default).
        """
        if ns.name in self.members:
            raise ValueError(f"{ns.logical} is already on segment {self.name}")
        if address is None:
            iface = self._next_free()
        else:
            text = str(address)
            iface = IPv4Interface(text if "/" in text else f"{text}/{self.network.prefixlen}")
            if iface.ip not in self.network:
                raise ValueError(f"{iface} is not in segment {self.name} ({self.network})")
        ifname = interface_name(ifname or ns.next_ifname())
        self._ports += 1
        port = port or f"p{self._ports}"
        self.hub.add_veth(port, ns, ifname, master=SEGMENT_BRIDGE, mtu=self.mtu)
        ns.add_address(ifname, iface)
        self.members[ns.name] = (ns, ifname, iface)
        return iface

    def _next_free(self) -> IPv4Interface:
        used = {iface.ip for _, _, iface in self.members.values()}
        for host in self.network.hosts():
            if host not in used:
                return IPv4Interface(f"{host}/{self.network.prefixlen}")
        raise ValueError(f"segment {self.name} ({self.network}) is full")

    def address(self, ns: Namespace) -> IPv4Interface:
        return self.members[ns.name][2]

    def ip(self, ns: Namespace) -> IPv4Address:
        return self.address(ns).ip

    def ifname(self, ns: Namespace) -> str:
        return self.members[ns.name][1]
