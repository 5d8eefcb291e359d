"""A p2pvpn relay cluster on a test bed: one NATS namespace, several server namespaces.

`ClusterNetwork` is a `VpnNetwork` whose first server is ``srv1`` (the
inherited single-server members - ``server_ns``, ``url``, ``stun_url`` - name
that one) plus ``srv2`` ... and a ``nats`` namespace running ``nats-server``
with its JetStream store in the caller's directory. Every server runs
``p2pvpn server --cluster nats://...`` with a control socket of its own, so
its state is read the way an admin would: ``p2pvpn server status --json``.
Clients list their home server first and the others after it (``-w``
repeated), so a client whose server dies moves to the next one.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from p2pvpn.netns._namespace import Namespace
from p2pvpn.netns._nat import NatMode, NatSite
from p2pvpn.netns._nats import NATS_PORT, nats_server_argv
from p2pvpn.netns._process import Process, p2pvpn_argv
from p2pvpn.netns._testbed import TestBed
from p2pvpn.netns._vpn import DHCP, PASSWORD, STUN_PORT, WS_PORT, Client, VpnNetwork

__all__ = ["CLUSTER_TTL", "ClusterNetwork", "ClusterServer"]

CLUSTER_TTL = 6.0
"""Seconds an address or server record lives without a refresh; short, so a dead
server's records go quickly (the product's default is 15 s)."""
_START_TIMEOUT = 30.0


@dataclass
class ClusterServer:
    """One ``p2pvpn server --cluster`` in namespace ``ns``; ``process`` once started."""

    index: int  # 0-based; the namespace is srv<index + 1>
    ns: Namespace
    ip: IPv4Address
    control_socket: Path
    argv: list[str] = field(default_factory=list)
    process: Process | None = None

    @property
    def name(self) -> str:
        return f"srv{self.index + 1}"

    @property
    def url(self) -> str:
        return f"ws://{self.ip}:{WS_PORT}/"

    @property
    def stun_url(self) -> str:
        return f"stun://{self.ip}:{STUN_PORT}"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


class ClusterNetwork(VpnNetwork):
    """NATS plus ``servers`` p2pvpn servers on segment ``wan``; clients attach around them."""

    def __init__(
        self,
        bed: TestBed,
        tmp: Path,
        *,
        servers: int = 3,
        password: str = PASSWORD,
        wan: str = "10.10.0.0/24",
        ttl: float = CLUSTER_TTL,
    ) -> None:
        if servers < 1:
            raise ValueError("a cluster needs at least one server")
        super().__init__(bed, tmp, password=password, wan=wan)
        self.ttl = ttl
        namespaces = [self.server_ns] + [bed.namespace(f"srv{n}") for n in range(2, servers + 1)]
        for ns in namespaces[1:]:
            self.wan.attach(ns)
        self.servers = [
            ClusterServer(i, ns, self.wan.ip(ns), tmp / f"srv{i + 1}.sock")
            for i, ns in enumerate(namespaces)
        ]
        self.nats_ns = bed.namespace("nats")
        self.wan.attach(self.nats_ns)
        self.nats_store = tmp / "nats-store"
        self.nats_process: Process | None = None

    # NATS

    @property
    def nats_ip(self) -> IPv4Address:
        return self.wan.ip(self.nats_ns)

    @property
    def nats_url(self) -> str:
        return f"nats://{self.nats_ip}:{NATS_PORT}"

    def start_nats(self) -> Process:
        """Start nats-server (again: same address, same store) and wait until it listens."""
        argv = nats_server_argv(self.nats_store, host=str(self.nats_ip), port=NATS_PORT)
        self.nats_process = self.bed.start(self.nats_ns, argv, "nats")
        self.bed.wait_until(
            lambda: self.nats_ns.listening("tcp", NATS_PORT),
            timeout=_START_TIMEOUT,
            message="nats-server never listened",
        )
        return self.nats_process

    def stop_nats(self) -> None:
        """SIGTERM nats-server and wait until it is gone."""
        if self.nats_process is not None:
            self.nats_process.terminate()

    # servers

    def start_servers(self, *extra: str, dhcp: str | None = DHCP) -> list[Process]:
        """Start every server (NATS first, see `start_nats`) and wait until each listens."""
        processes = []
        for server in self.servers:
            server.argv = self._server_argv(server, extra, dhcp)
            processes.append(self.restart(server.index))
        return processes

    def start_server(self, *extra: str, dhcp: str | None = DHCP) -> Process:
        """All servers of the cluster; returns the first one's process."""
        return self.start_servers(*extra, dhcp=dhcp)[0]

    def _server_argv(
        self, server: ClusterServer, extra: Sequence[str], dhcp: str | None
    ) -> list[str]:
        argv = ["server", "-w", f"ws://0.0.0.0:{WS_PORT}/", "-p", self.password]
        argv += ["--stun-port", str(STUN_PORT), "--cluster", self.nats_url]
        argv += ["--cluster-ttl", f"{self.ttl:g}", "--control-socket", str(server.control_socket)]
        if dhcp:
            argv += ["--dhcp", dhcp]
        return [*argv, *extra]

    def restart(self, index: int) -> Process:
        """Start server ``index`` with the arguments of `start_servers`; wait until it listens."""
        server = self.servers[index]
        server.process = self.bed.start(server.ns, p2pvpn_argv(*server.argv), server.name)
        if index == 0:
            self.server_process = server.process
            self.server_argv = server.argv
        self.bed.wait_until(
            lambda: server.ns.listening("tcp", WS_PORT),
            timeout=_START_TIMEOUT,
            message=f"{server.name} never listened",
        )
        return server.process

    def restart_server(self) -> Process:
        return self.restart(0)

    def kill(self, index: int) -> float:
        """SIGKILL server ``index`` and reap it; returns when the signal went (wall clock)."""
        process = self.servers[index].process
        assert process is not None, f"srv{index + 1} was never started"
        killed_at = time.time()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return killed_at

    def cut_off(self, index: int) -> float:
        """Server ``index``'s host drops off the network without a word (its link goes down:
        no FIN or RST reaches anybody); returns when (wall clock)."""
        server = self.servers[index]
        cut_at = time.time()
        server.ns.ip("link", "set", "dev", self.wan.ifname(server.ns), "down")
        return cut_at

    def server_status(self, index: int) -> dict[str, Any]:
        """``p2pvpn server status --json`` of server ``index``, through its control socket."""
        server = self.servers[index]
        argv = ["server", "status", "--json", "--control-socket", str(server.control_socket)]
        result = server.ns.run(p2pvpn_argv(*argv), check=True)
        return dict(json.loads(result.stdout))

    def cluster_state(self, index: int) -> str | None:
        """The NATS state server ``index`` reports ("joined", "unreachable", ...)."""
        cluster = self.server_status(index).get("cluster")
        return str(cluster["state"]) if isinstance(cluster, dict) else None

    def wait_joined(self, timeout: float = 60) -> None:
        """Every running server has joined NATS and sees all the other running servers."""
        running = [server for server in self.servers if server.alive()]

        def joined() -> bool:
            for server in running:
                cluster = self.server_status(server.index).get("cluster") or {}
                if cluster.get("state") != "joined" or len(cluster.get("servers", [])) < len(
                    running
                ):
                    return False
            return True

        self.bed.wait_until(
            joined, timeout=timeout, interval=0.3, message="the servers never joined the cluster"
        )

    def sessions(self, index: int) -> dict[str, dict[str, Any]]:
        """Server ``index``'s logged-in sessions by address."""
        rows = self.server_status(index).get("sessions", [])
        return {str(row["address"]): dict(row) for row in rows}

    def server_of(self, address: IPv4Address | str) -> int | None:
        """Which running server holds a session of ``address`` (None: none does)."""
        for server in self.servers:
            if server.alive() and str(address) in self.sessions(server.index):
                return server.index
        return None

    # clients

    def urls_from(self, home: int) -> list[str]:
        """Every server URL, ``home`` first and the others after it in order."""
        count = len(self.servers)
        return [self.servers[(home + step) % count].url for step in range(count)]

    def add_client(
        self,
        name: str,
        *extra: str,
        home: int = 0,
        url: str | None = None,
        urls: Sequence[str] | None = None,
        stun: bool | str = False,
        **options: Any,
    ) -> Client:
        """A client of server ``home`` that knows every server (``urls`` or ``url``: only those).

        With ``stun`` it asks its home server's STUN responder.
        """
        chosen = list(urls) if urls is not None else [url] if url else self.urls_from(home)
        stun_url = self.servers[home].stun_url if stun is True else stun
        client = super().add_client(name, *extra, urls=chosen, stun=stun_url, **options)
        client.extra["home"] = home
        return client

    def add_nat_client(
        self,
        name: str,
        tun_ip: str,
        home: int,
        mode: NatMode = "port-preserving",
        *,
        start: bool = True,
    ) -> tuple[Client, NatSite]:
        """A client of server ``home`` behind a NAT router of its own, with STUN."""
        site = self.bed.nat_site(name, self.wan, f"192.168.{len(self.clients) + 1}.0/24", mode)
        client = self.add_client(
            name, tun=f"{tun_ip}/24", ns=site.host, stun=True, home=home, start=start
        )
        client.extra["site"] = site
        return client, site
