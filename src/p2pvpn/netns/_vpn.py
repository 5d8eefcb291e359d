"""A p2pvpn network on a test bed: one server namespace, clients around it.

Every client is a real ``p2pvpn run`` process in its own namespace; the
server is a real ``p2pvpn server``. Waits poll a condition (never fixed
sleeps) and state is read the way an admin would: ``ip``, ping and
``p2pvpn status --json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from p2pvpn.netns._links import Segment
from p2pvpn.netns._namespace import Namespace
from p2pvpn.netns._nat import NatMode, NatSite
from p2pvpn.netns._process import Process, p2pvpn_argv
from p2pvpn.netns._testbed import TestBed

__all__ = [
    "DHCP",
    "STUN_PORT",
    "WS_PORT",
    "Client",
    "VpnNetwork",
    "nat_client",
    "peer_state",
    "wait_connected",
    "wait_state",
]

PASSWORD = "integration-password"
WS_PORT = 8080
STUN_PORT = 3478
DHCP = "10.77.0.0/24"


@dataclass
class Client:
    """One ``p2pvpn run`` in namespace ``ns``; ``process`` once started."""

    name: str
    ns: Namespace
    state_root: Path
    argv: list[str]
    process: Process | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def interface(self) -> str:
        return f"p2pvpn-{self.name}"

    def tun_address(self) -> IPv4Interface | None:
        addresses = self.ns.addresses(self.interface) if self.has_tun() else []
        return addresses[0] if addresses else None

    def tun_ip(self) -> str:
        """The TUN device's address; AssertionError while there is none."""
        address = self.tun_address()
        assert address is not None, f"{self.name} has no TUN address"
        return str(address.ip)

    def has_tun(self) -> bool:
        return self.interface in self.ns.interfaces()

    def status(self) -> dict[str, Any]:
        result = self.ns.run(
            p2pvpn_argv("status", "--json", "--state-dir", str(self.state_root), "-n", self.name),
            check=True,
        )
        return dict(json.loads(result.stdout))

    def peer(self, tun_ip: IPv4Address | str) -> dict[str, Any] | None:
        for row in self.status()["peers"]:
            if row["tun_ip"] == str(tun_ip):
                return dict(row)
        return None


class VpnNetwork:
    """Server on segment `wan` (10.10.0.1), clients attached to the same segment."""

    def __init__(
        self, bed: TestBed, tmp: Path, *, password: str = PASSWORD, wan: str = "10.10.0.0/24"
    ) -> None:
        self.bed = bed
        self.tmp = tmp
        self.password = password
        self.server_ns = bed.namespace("srv")
        self.wan: Segment = bed.segment("wan", wan, [self.server_ns])
        self.server_process: Process | None = None
        self.server_argv: list[str] = []
        self.clients: dict[str, Client] = {}
        self.tls_files: tuple[Path, Path] | None = None  # (certificate, key): wss://

    def serve_tls(self, cert_file: Path, key_file: Path) -> None:
        """Serve wss:// with these PEM files; clients trust the certificate (``--tls-ca``).

        Call before starting the server and the clients. The certificate must
        name `server_ip`; p2pvpn.server.tls makes one.
        """
        self.tls_files = (cert_file, key_file)

    @property
    def scheme(self) -> str:
        return "ws" if self.tls_files is None else "wss"

    @property
    def server_ip(self) -> IPv4Address:
        return self.wan.ip(self.server_ns)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.server_ip}:{WS_PORT}/"

    @property
    def stun_url(self) -> str:
        return f"stun://{self.server_ip}:{STUN_PORT}"

    def start_server(self, *extra: str, dhcp: str | None = DHCP) -> Process:
        argv = ["server", "-w", f"{self.scheme}://0.0.0.0:{WS_PORT}/", "-p", self.password]
        argv += ["--stun-port", str(STUN_PORT)]
        if self.tls_files is not None:
            argv += ["--tls-cert", str(self.tls_files[0]), "--tls-key", str(self.tls_files[1])]
        if dhcp:
            argv += ["--dhcp", dhcp]
        self.server_argv = [*argv, *extra]
        return self.restart_server()

    def restart_server(self) -> Process:
        self.server_process = self.bed.start(
            self.server_ns, p2pvpn_argv(*self.server_argv), "server"
        )
        self.wait_for_server()
        return self.server_process

    def wait_for_server(self) -> None:
        self.bed.wait_until(
            lambda: self.server_ns.listening("tcp", WS_PORT),
            timeout=30,
            message="server never listened",
        )

    def client_namespace(self, name: str) -> Namespace:
        ns = self.bed.namespace(name)
        self.wan.attach(ns)
        return ns

    def add_client(
        self,
        name: str,
        *extra: str,
        tun: str | None = None,
        password: str | None = None,
        ns: Namespace | None = None,
        url: str | None = None,
        stun: bool | str = False,
        start: bool = True,
        urls: Sequence[str] = (),
    ) -> Client:
        """A client of ``url`` (default: the server), or of every one of ``urls`` in order.

        ``stun``: True for the server's STUN responder, or a ``stun://`` URL.
        """
        ns = ns if ns is not None else self.client_namespace(name)
        state_root = self.tmp / "state"
        argv = ["run"]
        for each in urls or [url or self.url]:
            argv += ["-w", each]
        argv += ["-p", self.password if password is None else password]
        argv += ["-n", name, "--state-dir", str(state_root / name)]
        if tun:
            argv += ["-t", tun]
        if stun:
            argv += ["-s", self.stun_url if stun is True else stun]
        if self.tls_files is not None and (url is None or url.startswith("wss:")):
            argv += ["--tls-ca", str(self.tls_files[0])]
        client = Client(name, ns, state_root, [*argv, *extra])
        self.clients[name] = client
        if start:
            self.start_client(client)
        return client

    def start_client(self, client: Client) -> Process:
        client.process = self.bed.start(client.ns, p2pvpn_argv(*client.argv), client.name)
        return client.process

    def wait_for_tun(self, client: Client, timeout: float = 30) -> IPv4Interface:
        address = self.bed.wait_until(
            client.tun_address, timeout=timeout, message=f"{client.name}: TUN never came up"
        )
        assert address is not None
        return address

    def wait_ping(self, client: Client, address: IPv4Address | str, timeout: float = 30) -> None:
        self.bed.wait_until(
            lambda: client.ns.ping(address, count=1, timeout=1.0),
            timeout=timeout,
            message=f"{client.name} cannot ping {address}",
        )


def nat_client(
    vpn: VpnNetwork,
    name: str,
    tun_ip: str,
    mode: NatMode = "port-preserving",
    *extra: str,
    site: NatSite | None = None,
) -> tuple[Client, NatSite]:
    """A client behind its own NAT router (or behind ``site`` when given)."""
    if site is None:
        index = len(vpn.clients) + 1
        site = vpn.bed.nat_site(name, vpn.wan, f"192.168.{index}.0/24", mode)
    client = vpn.add_client(name, *extra, tun=f"{tun_ip}/24", ns=site.host, stun=True)
    return client, site


def peer_state(client: Client, tun_ip: str) -> str | None:
    row = client.peer(tun_ip)
    return str(row["state"]) if row else None


def wait_state(
    vpn: VpnNetwork, client: Client, tun_ip: str, states: set[str], timeout: float
) -> dict[str, Any]:
    """``client``'s status row of peer ``tun_ip`` once its state is one of ``states``."""

    def reached() -> dict[str, Any] | None:
        row = client.peer(tun_ip)
        return row if row is not None and row["state"] in states else None

    return vpn.bed.wait_until(
        reached,
        timeout=timeout,
        interval=0.2,
        message=f"{client.name}: peer {tun_ip} never reached {sorted(states)}",
    )


def wait_connected(vpn: VpnNetwork, a: Client, b: Client, timeout: float = 30) -> None:
    """Both sides CONNECTED to each other (a's pings provide the hints)."""
    a_ip, b_ip = a.tun_ip(), b.tun_ip()
    vpn.wait_ping(a, b_ip, timeout=timeout)
    wait_state(vpn, a, b_ip, {"CONNECTED"}, timeout=timeout)
    wait_state(vpn, b, a_ip, {"CONNECTED"}, timeout=timeout)
