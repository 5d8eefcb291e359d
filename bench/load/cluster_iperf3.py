"""Relayed iperf3 between two real `p2pvpn run` clients, on one server and across a cluster.

Part of ``relay_load.py --cluster N`` (which imports it): in network namespaces
(root), a plain ``p2pvpn server``, N ``p2pvpn server --cluster`` joined by a
nats-server in a namespace of its own, and two clients a and b. UDP between
the clients is dropped in both of their namespaces and they have no STUN
server, so every packet between them goes through the relay. iperf3 (TCP,
a to b) runs three times: both clients on the plain server (the baseline),
both on one server of the cluster, and a on one cluster server with b on
another; ``--iperf3-rounds`` times. The clients are restarted with the next
server's URL between runs and keep their static addresses.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from p2pvpn.demo.measure import ThroughputMeter
from p2pvpn.demo.output import DemoError
from p2pvpn.netns import (
    NATS_PORT,
    Client,
    Namespace,
    TestBed,
    VpnNetwork,
    missing_requirements,
    nats_server_argv,
    p2pvpn_argv,
)

__all__ = ["relayed_iperf3", "why_not"]

PASSWORD = "relay-iperf3-benchmark"
WS_PORT = 8080
TUN = {"a": "10.78.0.11", "b": "10.78.0.12"}
CUT_TABLE = "relay_only"
BASELINE = "1 server"  # both clients on the plain server
RELAY_PATH = "relay server"  # the path of a peer in `p2pvpn status --json`


def why_not() -> str | None:
    """Why the iperf3 runs cannot happen on this machine (None: they can)."""
    problems = missing_requirements()
    tools = ("iperf3", "nats-server", "nft")
    problems += [f"{tool} is not installed" for tool in tools if shutil.which(tool) is None]
    return "; ".join(problems) or None


def _control_socket_flag(tmp: Path, name: str) -> list[str]:
    """Each server its own control socket, where this p2pvpn has them (else none)."""
    help_text = subprocess.run(
        p2pvpn_argv("server", "--help"), capture_output=True, text=True, check=False
    ).stdout
    if "--control-socket" not in help_text:
        return []
    return ["--control-socket", str(tmp / f"{name}.sock")]


def _cut_udp(ns: Namespace, other: str) -> None:
    """Drop UDP to and from ``other`` here: the clients can only meet through the relay."""
    ns.nft(f"""
table ip {CUT_TABLE} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr {other} meta l4proto udp drop
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr {other} meta l4proto udp drop
    }}
}}
""")


@dataclass
class ClusterBed:
    """The plain server (``vpn``), the cluster's servers and the clients' namespaces."""

    vpn: VpnNetwork
    cluster_urls: list[str]
    client_ns: dict[str, Namespace]

    @property
    def plain_url(self) -> str:
        return self.vpn.url


def build(bed: TestBed, tmp: Path, servers: int) -> ClusterBed:
    vpn = VpnNetwork(bed, tmp, password=PASSWORD)
    vpn.start_server(*_control_socket_flag(tmp, "plain"), dhcp=None)
    nats_ns = vpn.client_namespace("nats")
    bed.start(nats_ns, nats_server_argv(tmp / "jetstream", host="0.0.0.0"), "nats-server")
    bed.wait_until(lambda: nats_ns.listening("tcp", NATS_PORT), 30, message="no nats-server")
    nats_url = f"nats://{vpn.wan.ip(nats_ns)}:{NATS_PORT}"
    urls = []
    for number in range(1, servers + 1):
        ns = vpn.client_namespace(f"srv{number}")
        argv = ["server", "-w", f"ws://0.0.0.0:{WS_PORT}/", "-p", PASSWORD, "--stun-port", "0"]
        argv += ["--cluster", nats_url, *_control_socket_flag(tmp, f"srv{number}")]
        bed.start(ns, p2pvpn_argv(*argv), f"server{number}")
        bed.wait_until(partial(ns.listening, "tcp", WS_PORT), 30, message="server down")
        urls.append(f"ws://{vpn.wan.ip(ns)}:{WS_PORT}/")
    client_ns = {name: vpn.client_namespace(name) for name in TUN}
    a_ip, b_ip = (str(vpn.wan.ip(client_ns[name])) for name in TUN)
    _cut_udp(client_ns["a"], b_ip)
    _cut_udp(client_ns["b"], a_ip)
    return ClusterBed(vpn, urls, client_ns)


def _clients_on(cluster: ClusterBed, url_a: str, url_b: str) -> tuple[Client, Client]:
    """(Re)start a and b on these servers; return once a pings b through the relay."""
    vpn = cluster.vpn
    for client in vpn.clients.values():
        if client.process is not None:
            client.process.terminate()
    a, b = (
        vpn.add_client(name, tun=f"{TUN[name]}/24", ns=cluster.client_ns[name], url=url)
        for name, url in (("a", url_a), ("b", url_b))
    )
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    vpn.wait_ping(a, TUN["b"], timeout=60)
    return a, b


def _no_tick() -> None:
    pass


def _one_run(
    cluster: ClusterBed, label: str, urls: tuple[str, str], seconds: int, log_dir: Path
) -> dict[str, Any]:
    run: dict[str, Any] = {"scenario": label}
    try:
        a, b = _clients_on(cluster, *urls)
        run["path"] = (a.peer(TUN["b"]) or {}).get("path")
        meter = ThroughputMeter(iperf3=True, log_dir=log_dir)
        result = meter.measure(
            b.ns, a.ns, IPv4Address(TUN["b"]), seconds, label=label.replace(" ", "-"), tick=_no_tick
        )
        run["mbit_s"] = round(result.bits_per_second / 1e6, 1)
        if run["path"] != RELAY_PATH:
            run["error"] = f"a reached b by {run['path']!r}, not through the relay"
    except (DemoError, AssertionError, RuntimeError, OSError) as error:
        run["error"] = str(error).splitlines()[0] if str(error) else repr(error)
    return run


def _with_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each run's ratio to the plain server's of its round; the median ratio per scenario."""
    by_scenario: dict[str, list[float]] = {}
    base: float | None = None
    for run in runs:
        if run["scenario"] == BASELINE:
            base = run.get("mbit_s")
        if base and "mbit_s" in run:
            run["ratio"] = round(run["mbit_s"] / base, 3)
            by_scenario.setdefault(run["scenario"], []).append(run["ratio"])
    return {name: round(statistics.median(values), 3) for name, values in by_scenario.items()}


def relayed_iperf3(servers: int, seconds: int, rounds: int, log_dir: Path) -> dict[str, Any]:
    """``rounds`` times the three iperf3 runs of the module's docstring; ratios against the
    plain server of the same round, and their median."""
    print(f"-- iperf3 through p2pvpn run clients in namespaces, {seconds} s each", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with TestBed(log_dir) as bed:
        cluster = build(bed, log_dir, servers)
        first, second = cluster.cluster_urls[:2]
        plan = (
            (BASELINE, (cluster.plain_url, cluster.plain_url)),
            (f"{servers} servers, same server", (first, first)),
            (f"{servers} servers, cross-server", (first, second)),
        )
        runs = []
        for number in range(1, rounds + 1):
            for label, urls in plan:
                runs.append({"round": number, **_one_run(cluster, label, urls, seconds, log_dir)})
    medians = _with_ratios(runs)
    return {"seconds": seconds, "tool": "iperf3 (TCP, a to b)", "runs": runs, "ratios": medians}
