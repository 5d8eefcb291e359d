"""The network of `p2pvpn bench local`: three namespaces on one segment, the VPN processes in them.

A server and two clients on a bridge (198.51.100.0/24, a documentation
range that exists only inside the namespaces; no NAT). Every variant starts
fresh ``p2pvpn server`` / ``p2pvpn run`` processes, so the CPU time and the
peak RSS read from /proc belong to that variant alone. Before a variant is
measured both clients must show the expected path in ``p2pvpn status
--json``; the path is checked again afterwards.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from p2pvpn.bench.report import BenchError
from p2pvpn.netns import Namespace, Process, TestBed, p2pvpn_argv

__all__ = [
    "C1_ADDR",
    "C2_ADDR",
    "TUN1",
    "TUN2",
    "LocalNet",
    "Node",
    "UnavailableError",
    "cpu_ticks",
    "loadavg",
    "path_matches",
    "peak_rss_kib",
]

T = TypeVar("T")

SEGMENT = "198.51.100.0/24"
SERVER_ADDR, C1_ADDR, C2_ADDR = "198.51.100.1/24", "198.51.100.2/24", "198.51.100.3/24"
TUN1, TUN2 = "10.77.0.1", "10.77.0.2"
TUN_PREFIX = 24
POOL = "10.77.0.0/24"
WS_PORT = 8080
STUN_PORT = 3478
PASSWORD = "bench-local-password"  # only inside the namespaces of this run
STARTUP_TIMEOUT = 40.0
PATH_TIMEOUT = 40.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

_UNAVAILABLE_RE = re.compile(r"DataPlaneUnavailable|does not provide a data plane|not available")


class UnavailableError(BenchError):
    """The variant cannot run on this build (e.g. no compiled data plane)."""


# -- /proc: CPU time and peak RSS ------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            queue.extend(int(child) for child in _read(str(task)).split())
    return pids


def cpu_ticks(pid: int) -> int:
    """utime + stime (clock ticks) of ``pid`` and its descendants, all threads."""
    total = 0
    for member in _descendants(pid):
        stat = _read(f"/proc/{member}/stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the highest resident set size the process had."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", _read(f"/proc/{pid}/status"), re.MULTILINE)
    return int(match.group(1)) if match else None


def loadavg() -> list[str]:
    return _read("/proc/loadavg").split()[:3]


# -- the network -----------------------------------------------------------------------


@dataclass
class Node:
    name: str
    ns: Namespace
    segment_ip: str
    tun_ip: str | None = None
    process: Process | None = None


def path_matches(row: dict[str, Any], kind: str) -> bool:
    """Whether a peer row of ``status --json`` shows the path ``kind`` ("direct" | "relay")."""
    path = str(row.get("path") or "")
    if kind == "direct":
        return row.get("state") == "CONNECTED" and path.startswith("direct ")
    # Without STUN the peers settle in FAILED (or WAITING) and use the server.
    return path == "relay server" and row.get("state") in ("FAILED", "WAITING")


@dataclass
class LocalNet:
    """The namespaces of one run and the VPN processes of the current variant."""

    bed: TestBed
    work: Path
    server: Node
    c1: Node
    c2: Node
    runs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, bed: TestBed, work: Path) -> LocalNet:
        server_ns, c1_ns, c2_ns = (bed.namespace(n) for n in ("srv", "c1", "c2"))
        addresses = [SERVER_ADDR, C1_ADDR, C2_ADDR]
        bed.segment("wan", SEGMENT, [server_ns, c1_ns, c2_ns], addresses=addresses)
        ip = [address.split("/")[0] for address in addresses]
        return cls(
            bed,
            work,
            Node("server", server_ns, ip[0]),
            Node("c1", c1_ns, ip[1], TUN1),
            Node("c2", c2_ns, ip[2], TUN2),
        )

    def name(self, base: str) -> str:
        """A process name unique in this run: ``server-1``, ``server-2``, ..."""
        self.runs[base] = self.runs.get(base, 0) + 1
        return f"{base}-{self.runs[base]}"

    def wait_listening(self, ns: Namespace, port: int, process: Process) -> None:
        def listening() -> bool:
            if not process.alive():
                raise BenchError(f"{process.name} exited: {process.tail(10)}")
            return ns.listening("tcp", port)

        self.wait(listening, STARTUP_TIMEOUT, f"{process.name} never listened on port {port}")

    # p2pvpn processes

    def start_vpn(
        self, dataplane: str, stun: bool, source: Path | None = None, offload: str | None = None
    ) -> None:
        """Server and clients; from the ``source`` tree (a ``src`` folder with its
        extension built in place) instead of this one, for a same-run A/B.
        ``offload``: the clients' ``--offload`` (None: their default, auto)."""
        self.stop_vpn()
        env = {"PYTHONPATH": str(source)} if source else None
        server_argv = ["server", "-w", f"ws://0.0.0.0:{WS_PORT}/", "-p", PASSWORD]
        server_argv += ["--stun-port", str(STUN_PORT), "--dhcp", POOL]
        self.server.process = self.bed.start(
            self.server.ns, p2pvpn_argv(*server_argv), self.name("server"), env=env
        )
        self.wait_listening(self.server.ns, WS_PORT, self.server.process)
        for node in (self.c1, self.c2):
            argv = ["run", "-w", f"ws://{self.server.segment_ip}:{WS_PORT}/", "-p", PASSWORD]
            argv += ["-n", node.name, "--state-dir", str(self.state_dir(node))]
            argv += ["-t", f"{node.tun_ip}/{TUN_PREFIX}", "--dataplane", dataplane]
            if stun:
                argv += ["-s", f"stun://{self.server.segment_ip}:{STUN_PORT}"]
            if offload is not None:
                argv += ["--offload", offload]
            node.process = self.bed.start(
                node.ns, p2pvpn_argv(*argv), self.name(node.name), env=env
            )
        for node in (self.c1, self.c2):
            self._wait_client_up(node)

    def stop_vpn(self) -> None:
        for node in (self.c1, self.c2, self.server):
            if node.process is not None:
                node.process.terminate()
                node.process = None

    def vpn_nodes(self) -> list[Node]:
        return [n for n in (self.server, self.c1, self.c2) if n.process is not None]

    def vpn_pids(self) -> dict[str, int]:
        return {n.name: n.process.pid for n in self.vpn_nodes() if n.process is not None}

    def state_dir(self, node: Node) -> Path:
        return self.work / "state" / node.name

    def status(self, node: Node) -> dict[str, Any]:
        # `run --state-dir` names the client's own directory, `status` their parent.
        argv = p2pvpn_argv("status", "--json", "--state-dir", str(self.state_dir(node).parent))
        result = node.ns.run([*argv, "-n", node.name], check=False, timeout=15)
        if result.returncode != 0:
            raise BenchError(f"status of {node.name}: {result.stderr.strip()[:300]}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def peer_row(self, node: Node, tun_ip: str) -> dict[str, Any] | None:
        for row in self.status(node).get("peers", []):
            if row.get("tun_ip") == tun_ip:
                return dict(row)
        return None

    def _check_alive(self, node: Node) -> None:
        process = node.process
        if process is None or process.alive():
            return
        # The last line that says so (after a traceback: the exception's message).
        for line in reversed(process.log_text().splitlines()):
            if _UNAVAILABLE_RE.search(line):
                raise UnavailableError(line.strip())
        raise BenchError(f"{node.name} exited with status {process.returncode}: {process.tail(8)}")

    def _wait_client_up(self, node: Node) -> None:
        def up() -> bool:
            self._check_alive(node)
            try:
                status = self.status(node)
            except (BenchError, json.JSONDecodeError):
                return False
            return bool(status.get("address") and status.get("dataplane"))

        self.wait(up, STARTUP_TIMEOUT, f"{node.name}: VPN interface never came up")

    def wait(self, predicate: Callable[[], T | None], timeout: float, message: str) -> T:
        """Poll ``predicate`` until it gives something truthy; a VPN process that
        exits ends the wait at once (`UnavailableError` when its log says why)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.vpn_nodes():
                self._check_alive(node)
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                logs = "\n".join(n.process.tail(15) for n in self.vpn_nodes() if n.process)
                raise BenchError(f"timed out after {timeout:g} s: {message}\n{logs}")
            time.sleep(0.2)

    def wait_path(self, kind: str) -> dict[str, dict[str, Any]]:
        """Ping until both clients show the expected path to each other; returns the rows."""
        pairs = ((self.c1, TUN2), (self.c2, TUN1))

        def settled() -> dict[str, dict[str, Any]] | None:
            if not self.c1.ns.ping(TUN2, count=1, timeout=1.0):
                return None
            rows = {node.name: self.peer_row(node, peer) for node, peer in pairs}
            found = {name: row for name, row in rows.items() if row is not None}
            if len(found) == len(rows) and all(path_matches(r, kind) for r in found.values()):
                return found
            return None

        expected = "CONNECTED + direct" if kind == "direct" else "relay server"
        return self.wait(settled, PATH_TIMEOUT, f"clients never reached the {expected} path")

    def tun_mtu(self) -> int | None:
        info = self.c1.ns.link_info(f"p2pvpn-{self.c1.name}")
        return int(info["mtu"]) if info and "mtu" in info else None
