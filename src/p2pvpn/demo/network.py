"""Builds the demo network of `p2pvpn.demo.topology` out of namespaces, veths and bridges."""

from collections.abc import Callable

from p2pvpn.demo.topology import (
    BLOCK_TABLE,
    CLIENTS,
    INTERNET,
    INTERNET_HUB,
    LAN_BRIDGE,
    NAT_TABLE,
    ROUTERS,
    SERVER,
    WAN_IFNAME,
    WEB,
    WEB_NETWORK,
    ClientSite,
    RouterSite,
    block_ruleset,
    namespace_name,
)
from p2pvpn.netns import InternetHost, Namespace, Segment, link_internet_host, make_nat_router

__all__ = ["DemoNetwork"]

HOST_IFNAME = "eth0"
UPLINK = "uplink0"
"""The exit node's link to web."""


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
        name = namespace_name(role)
        self._on_create(name)
        ns = Namespace.create(name, logical=role)
        self.namespaces[role] = ns
        return ns

    def build_internet(self) -> None:
        """The "internet" bridge, with the server and the routers' WAN sides on it."""
        internet = Segment.create("internet", INTERNET, self._namespace(INTERNET_HUB))
        server = self._namespace(SERVER.name)
        internet.attach(server, SERVER.address, HOST_IFNAME, port=SERVER.name)
        for router in ROUTERS:
            ns = self._namespace(router.name)
            internet.attach(ns, router.wan, WAN_IFNAME, port=router.name)

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
            host.default_route(router.lan)
            # Programs in the namespace ask the client's own DNS (ping bob.vpn in a shell).
            host.write_resolv_conf([client.vpn.ip])
        make_nat_router(ns, WAN_IFNAME, table=NAT_TABLE)
        return clients

    def build_web(self, exit_node: ClientSite) -> InternetHost:
        """The host "web", linked to ``exit_node`` alone and its default route; the exit
        node keeps the demo internet (server, peers) through its router."""
        ns = self.namespaces[exit_node.name]
        router = next(router for router in ROUTERS if router.name == exit_node.router)
        ns.add_route(INTERNET, via=router.lan)
        return link_internet_host(self._namespace(WEB), ns, WEB_NETWORK, gateway_ifname=UPLINK)

    def block_udp(self, router: RouterSite, remote: RouterSite) -> None:
        """``router`` drops UDP to and from ``remote``'s WAN address (not the server's)."""
        self.namespaces[router.name].nft(block_ruleset(remote.wan.ip))

    def unblock_udp(self, router: RouterSite) -> None:
        self.namespaces[router.name].run(["nft", "delete", "table", "ip", BLOCK_TABLE])
