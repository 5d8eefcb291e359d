"""Builds the demo network of `p2pvpn.demo.topology` out of namespaces, veths and bridges."""

from collections.abc import Callable

from p2pvpn.demo.netns import Namespace
from p2pvpn.demo.topology import (
    BLOCK_TABLE,
    CLIENTS,
    INTERNET_HUB,
    LAN_BRIDGE,
    ROUTERS,
    SERVER,
    WAN_IFNAME,
    ClientSite,
    RouterSite,
    block_ruleset,
    namespace_name,
    nat_ruleset,
)

__all__ = ["DemoNetwork"]

HUB_BRIDGE = "br0"
HOST_IFNAME = "eth0"


class DemoNetwork:
    """The namespaces of one demo, by role ("server", "nat1", "alice", ...)."""

    def __init__(self, on_create: Callable[[str], None]) -> None:
        # Called with a namespace's name just before it is created, so that the
        # record of what exists is never behind (an interrupt can come at any time).
        self._on_create = on_create
        self.namespaces: dict[str, Namespace] = {}

    def __getitem__(self, role: str) -> Namespace:
        return self.namespaces[role]

    def _namespace(self, role: str) -> Namespace:
        ns = Namespace(namespace_name(role))
        self._on_create(ns.name)
        ns.create()
        self.namespaces[role] = ns
        return ns

    def build_internet(self) -> None:
        """The "internet" bridge, with the server and the routers' WAN sides on it."""
        hub = self._namespace(INTERNET_HUB)
        hub.add_bridge(HUB_BRIDGE)
        server = self._namespace(SERVER.name)
        hub.add_veth(SERVER.name, server, HOST_IFNAME, master=HUB_BRIDGE)
        server.add_address(HOST_IFNAME, SERVER.address)
        for router in ROUTERS:
            ns = self._namespace(router.name)
            hub.add_veth(router.name, ns, WAN_IFNAME, master=HUB_BRIDGE)
            ns.add_address(WAN_IFNAME, router.wan)

    def build_site(self, router: RouterSite) -> list[ClientSite]:
        """The router's LAN (a bridge inside the router) with its clients, and its NAT."""
        ns = self.namespaces[router.name]
        ns.add_bridge(LAN_BRIDGE)
        ns.add_address(LAN_BRIDGE, router.lan)
        clients = [client for client in CLIENTS if client.router == router.name]
        for client in clients:
            host = self._namespace(client.name)
            ns.add_veth(client.port_name, host, HOST_IFNAME, master=LAN_BRIDGE)
            host.add_address(HOST_IFNAME, client.lan)
            host.add_route("default", router.lan.ip)
        ns.enable_forwarding()
        ns.nft(nat_ruleset())
        return clients

    def block_udp(self, router: RouterSite, remote: RouterSite) -> None:
        """``router`` drops UDP to and from ``remote``'s WAN address (not the server's)."""
        self.namespaces[router.name].nft(block_ruleset(remote.wan.ip))

    def unblock_udp(self, router: RouterSite) -> None:
        self.namespaces[router.name].run(["nft", "delete", "table", "ip", BLOCK_TABLE])
