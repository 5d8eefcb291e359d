"""The relay-cluster topology of test_cluster.py, and what its tests need beside it.

One ``nats`` namespace, three servers (``srv1`` ... ``srv3``, `ClusterNetwork`
in p2pvpn.netns) and four clients behind NAT routers of their own, each
listing its home server first:

====== ====== ===================================================================
client home   role
====== ====== ===================================================================
a      srv1   relay only: its NAT drops UDP to and from every other site
b      srv2   a's cross-server relay partner (srv1 <-> srv2)
c      srv3   direct peer of d, and a's cross-server partner after srv1 dies
d      srv1   a's same-server relay partner; direct peer of c across servers
====== ====== ===================================================================

`candy` runs tests/integration/candy_client.py (a scripted Candy client)
in a namespace of its own on the "internet".
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pvpn.netns import (
    Client,
    ClusterNetwork,
    Namespace,
    NatSite,
    PingLog,
    Process,
    TestBed,
    block_udp_between,
    python_argv,
    wait_connected,
)

WAN = "198.51.100.0/24"
A_IP, B_IP, C_IP, D_IP = "10.77.0.11", "10.77.0.12", "10.77.0.13", "10.77.0.14"
HOMES = {"a": 0, "b": 1, "c": 2, "d": 0}
CANDY_CLIENT = Path(__file__).with_name("candy_client.py")
MEASUREMENTS = "cluster-measurements.json"
"""Written to the test bed's log directory: failover and outage times for RESULTS.md."""


@dataclass
class Cluster:
    net: ClusterNetwork
    a: Client
    b: Client
    c: Client
    d: Client
    sites: dict[str, NatSite]
    scripted: Namespace  # for scripted WebSocket clients, straight on the "internet"

    @property
    def bed(self) -> TestBed:
        return self.net.bed

    def clients(self) -> list[Client]:
        return [self.a, self.b, self.c, self.d]

    def check_alive(self, servers: Iterable[int] | None = None) -> None:
        """The four clients and the ``servers`` named (all by default) still run (an earlier
        test may have broken the topology; then this one cannot say anything)."""
        indexes = range(len(self.net.servers)) if servers is None else servers
        dead = [self.net.servers[i].name for i in indexes if not self.net.servers[i].alive()]
        dead += [c.name for c in self.clients() if c.process is None or not c.process.alive()]
        assert not dead, f"the cluster topology is broken: {dead} not running"


def relay_only(site: NatSite, others: list[NatSite]) -> None:
    """Drop UDP between ``site`` and each of ``others`` (STUN to the servers stays open)."""
    for other in others:
        block_udp_between(site.router, str(other.public_ip))


def build_cluster(bed: TestBed, tmp: Path) -> Cluster:
    """NATS, three joined servers, four logged-in clients; c and d CONNECTED directly."""
    net = ClusterNetwork(bed, tmp, servers=3, wan=WAN)
    net.start_nats()
    net.start_servers()
    net.wait_joined()
    clients: dict[str, Client] = {}
    sites: dict[str, NatSite] = {}
    for name, address in zip("abcd", (A_IP, B_IP, C_IP, D_IP), strict=True):
        clients[name], sites[name] = net.add_nat_client(name, address, HOMES[name], start=False)
    # Before any client starts: their login DISCOVERY would start punching at once.
    relay_only(sites["a"], [sites[name] for name in "bcd"])
    for client in clients.values():
        net.start_client(client)
    for client in clients.values():
        net.wait_for_tun(client)
    scripted = bed.namespace("candy")
    net.wan.attach(scripted)
    cluster = Cluster(net, clients["a"], clients["b"], clients["c"], clients["d"], sites, scripted)
    wait_connected(net, cluster.c, cluster.d, timeout=45)
    return cluster


def candy(cluster: Cluster, job: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Run one job of candy_client.py in the scripted namespace; its JSON result."""
    job = {"password": cluster.net.password, **job}
    argv = python_argv(str(CANDY_CLIENT), json.dumps(job))
    result = cluster.scripted.run(argv, check=True, timeout=timeout)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


_PING_REPLY = re.compile(r"^\[(?P<when>\d+\.\d+)\] \d+ bytes from .* time=(?P<rtt>[\d.]+) ms", re.M)


def first_answer_sent_after(ping: PingLog, moment: float) -> float | None:
    """When the first echo request sent after ``moment`` got its reply (wall clock).

    A reply's send time is its receive time minus its round trip, so a reply
    that was already on its way at ``moment`` does not count.
    """
    for match in _PING_REPLY.finditer(ping.process.log_text()):
        received = float(match["when"])
        if received - float(match["rtt"]) / 1000 >= moment:
            return received
    return None


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$", re.M)


def first_log_line(process: Process | None, text: str, *, after: float) -> float | None:
    """When ``process`` first logged a line containing ``text`` at or after ``after``."""
    if process is None:
        return None
    for match in _LOG_TIME.finditer(process.log_text()):
        # p2pvpn logs local time, as this process sees it (like p2pvpn.netns.state_changes)
        when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if when >= after and text in match[2]:
            return when
    return None


def record_measurements(log_dir: Path, **values: object) -> Path:
    """Merge ``values`` into the JSON file `MEASUREMENTS` in ``log_dir``; returns its path."""
    path = log_dir / MEASUREMENTS
    data: dict[str, object] = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()})
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
