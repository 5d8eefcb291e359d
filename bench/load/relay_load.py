#!/usr/bin/env python3
"""Relay load benchmark: many simulated clients against a real `p2pvpn server`.

    python bench/load/relay_load.py --clients 1000 --rate 5 --duration 20
    python bench/load/relay_load.py --compare 100,1000 --rate 5 --duration 20
    python bench/load/relay_load.py --clients 1000 --cluster 3 --duration 20 --no-garbage

The server runs as a subprocess on 127.0.0.1 so that its CPU time and memory
are read from /proc/<pid>. Simulated clients run in worker processes (asyncio
and the websockets client library, each worker holding a share of the
connections) so that the load generator is not the bottleneck. Each client
logs in like a real one (VMAC, then AUTH with a static address from
10.66.0.0/16, fresh timestamps, valid hashes), proves the login by sending a
FORWARD to itself, then sends `--rate` FORWARD frames per second to random
other clients. Every frame carries its send time (time.time_ns(): the clients
are in different processes of one machine), so receivers measure the relay
latency. Each client connects from its own loopback address (127.1.x.y,
all of 127.0.0.0/8 is local), as clients on the Internet would, so that the
server's per-source-address caps see one client per address.

Load phase (per client count): relayed frames/s, p50/p99 latency, the
server's CPU seconds (utime + stime) and CPU %, its peak RSS, and errors
(failed logins, unexpected closes; both must be 0), plus lost frames.

Garbage phase (one server, one run): `--good-clients` clients exchange as
above, first alone (baseline), then while `--garbage-clients` logged-in
clients send garbage as fast as they can (random bytes, truncated frames,
spoofed sources, oversized frames), reconnecting whenever the server closes
them. Reported: the good clients' p50/p99 in both windows, side by side.

Cluster phase (``--cluster N``), in the same run as the single-server load:
the same clients round-robin over N servers (client i on server i mod N)
joined by one nats-server on loopback (its store in the run's temp dir,
stopped at the end whatever happens). Every frame is counted as a
same-server or a cross-server pair (the sender's index is in the frame), so
the extra hop shows as the latency of the one against the other; CPU and
peak RSS per server and of nats-server. Bulk: client 0 sends FORWARD frames
to client 1 as fast as its connection takes them (TCP back-pressure), on one
server alone, on one server of the cluster and across two of them; Mbit/s
of IP packets received, as ratios to the server alone. Then relayed iperf3
between real `p2pvpn run` clients in namespaces (cluster_iperf3.py; root).

Everything stays on 127.0.0.1 (the iperf3 runs: in namespaces) and every
phase is bounded in time. Results
are printed as a table and written as JSON (--output, default
bench/load/results.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import resource
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from p2pvpn._format import format_table
from p2pvpn._stats import percentile
from p2pvpn.netns import LocalNatsServer
from p2pvpn.wire.crypto import auth_hash, vmac_hash

REPO = Path(__file__).resolve().parents[2]

PASSWORD = "relay-load-benchmark"
NETWORK = IPv4Network("10.66.0.0/16")
GARBAGE_OFFSET = 30000  # garbage clients' host numbers start here
SOURCE_BASE = IPv4Address("127.1.0.0")  # clients connect from the addresses after it
FORWARD = 1
HEADER = struct.Struct("!BBHHHBBH4s4s")  # IPv4 header, no options
STAMP = struct.Struct("!QII")  # send time (ns), sender index, sequence number
CONNECT_CONCURRENCY = 64  # per worker: keeps the listen backlog from overflowing
LOGIN_TIMEOUT = 60.0
WARMUP = 2.0  # traffic flows, nothing is measured
DRAIN = 1.5  # after the last send: frames still in flight may arrive
BULK_DRAIN = 4.0  # a bulk pair fills queues on the way (send queue, NATS): seconds deep
CLK_TCK = os.sysconf("SC_CLK_TCK")
GAUGES = ("cluster_connected", "cluster_servers")  # Server.counters() that are no counters


# -- frames -------------------------------------------------------------------------------


def address(index: int) -> IPv4Address:
    """Client ``index`` (0-based) gets host ``index + 1`` of NETWORK."""
    return NETWORK.network_address + index + 1


def ipv4_packet(source: IPv4Address, destination: IPv4Address, payload: bytes) -> bytes:
    header = HEADER.pack(
        0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, source.packed, destination.packed
    )
    return header + payload


def forward(source: IPv4Address, destination: IPv4Address, payload: bytes) -> bytes:
    return bytes((FORWARD,)) + ipv4_packet(source, destination, payload)


_last_timestamp: dict[IPv4Address, int] = {}


def login_timestamp(tun_ip: IPv4Address) -> int:
    """Like the real client: never the same timestamp twice, or the AUTH is a replay."""
    now = max(int(time.time()), _last_timestamp.get(tun_ip, 0) + 1)
    _last_timestamp[tun_ip] = now
    return now


def login_frames(tun_ip: IPv4Address, vmac: str) -> tuple[bytes, bytes]:
    now = login_timestamp(tun_ip)
    vmac_frame = (
        bytes((4,)) + vmac.encode() + now.to_bytes(8, "big") + vmac_hash(PASSWORD, vmac, now)
    )
    auth_frame = (
        bytes((0,)) + tun_ip.packed + now.to_bytes(8, "big") + auth_hash(PASSWORD, tun_ip, now)
    )
    return vmac_frame, auth_frame


# -- worker side ----------------------------------------------------------------------------


PAIR_KINDS = ("same", "cross")  # receiver on the sender's server, or on another one


@dataclass
class Plan:
    """What one worker process does; times are Unix seconds, set once everyone is ready."""

    urls: list[str]  # client i logs in to urls[i % len(urls)] (round-robin over the servers)
    good: list[int]  # client indexes this worker runs as good clients
    garbage: list[int]  # ... and as garbage clients
    good_total: int  # good clients 0..good_total-1 exist across all workers
    rate: float
    payload: int
    bulk: bool = False  # client 0 sends to client 1 as fast as the relay takes frames
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> [start, end)
    send_start: float = 0.0
    send_end: float = 0.0
    garbage_start: float = 0.0
    flood_start: float = 0.0  # from here on, only junk that is dropped without a close
    garbage_end: float = 0.0
    stop: float = 0.0

    def url_of(self, index: int) -> str:
        return self.urls[index % len(self.urls)]

    def pair_key(self, window: str, sender: int, receiver: int) -> str:
        """``window/same`` or ``window/cross``: whether both ends share a server."""
        same = sender % len(self.urls) == receiver % len(self.urls)
        return f"{window}/{PAIR_KINDS[0] if same else PAIR_KINDS[1]}"


@dataclass
class WorkerResult:
    failed_logins: int = 0
    login_errors: list[str] = field(default_factory=list)
    unexpected_closes: int = 0
    close_reasons: list[str] = field(default_factory=list)
    # Keyed by pair_key(): the window, then whether sender and receiver share a server.
    sent: dict[str, int] = field(default_factory=dict)
    sent_bytes: dict[str, int] = field(default_factory=dict)  # IP packets, as a tunnel carries
    latencies_ns: dict[str, list[int]] = field(default_factory=dict)
    received_bytes: dict[str, int] = field(default_factory=dict)
    wrong_destination: int = 0
    max_send_lag_ms: float = 0.0
    garbage_frames: dict[str, int] = field(default_factory=dict)  # per window
    garbage_reconnects: dict[str, int] = field(default_factory=dict)
    garbage_failed_logins: int = 0
    cpu_seconds: float = 0.0
    runqueue_wait_seconds: float = 0.0
    wall_seconds: float = 0.0


def _window_of(plan: Plan, timestamp: float) -> str | None:
    for name, (start, end) in plan.windows.items():
        if start <= timestamp < end:
            return name
    return None


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def source_address(index: int) -> str:
    """The loopback address client ``index`` connects from."""
    return str(SOURCE_BASE + 1 + index)


async def _login(url: str, index: int) -> ClientConnection:
    """Connect, VMAC, AUTH; then a FORWARD to ourselves proves the server mapped us."""
    tun_ip = address(index)
    ws = await connect(
        url,
        local_addr=(source_address(index), 0),
        compression=None,
        ping_interval=None,
        max_size=2**17,
        open_timeout=LOGIN_TIMEOUT,
        close_timeout=2,
    )
    try:
        vmac = secrets.token_hex(8)
        for frame in login_frames(tun_ip, vmac):
            await ws.send(frame)
        probe = forward(tun_ip, tun_ip, b"login-probe")
        await ws.send(probe)
        async with asyncio.timeout(LOGIN_TIMEOUT):
            while (reply := await ws.recv()) != probe:
                pass  # frames from others may already arrive
        del reply
    except BaseException:
        await ws.close()
        raise
    return ws


class GoodClient:
    def __init__(self, index: int, plan: Plan, result: WorkerResult) -> None:
        self.index = index
        self.tun_ip = address(index)
        self.plan = plan
        self.result = result
        self.ws: ClientConnection | None = None
        self.closing = False

    async def login(self, limit: asyncio.Semaphore) -> None:
        async with limit:
            try:
                self.ws = await _login(self.plan.url_of(self.index), self.index)
            except (OSError, TimeoutError, WebSocketException) as error:
                self.result.failed_logins += 1
                self.result.login_errors.append(f"{self.tun_ip}: {error!r}")

    async def receive(self) -> None:
        assert self.ws is not None
        plan, result = self.plan, self.result
        try:
            async for frame in self.ws:
                now = time.time_ns()
                if not isinstance(frame, bytes) or len(frame) < 21 + STAMP.size:
                    continue
                if frame[17:21] != self.tun_ip.packed:
                    result.wrong_destination += 1
                    continue
                sent_ns, sender, _ = STAMP.unpack_from(frame, 21)
                window = _window_of(plan, sent_ns / 1e9)
                if window is not None:
                    key = plan.pair_key(window, sender, self.index)
                    result.latencies_ns.setdefault(key, []).append(now - sent_ns)
                # Throughput counts what arrives in the window, whenever it was sent.
                arrival = _window_of(plan, now / 1e9)
                if arrival is not None:
                    key = plan.pair_key(arrival, sender, self.index)
                    result.received_bytes[key] = result.received_bytes.get(key, 0) + len(frame) - 1
        except ConnectionClosed as closed:
            if not self.closing:
                result.unexpected_closes += 1
                result.close_reasons.append(f"{self.tun_ip}: {closed!r}")

    def count_sent(self, other: int, sent_ns: int, frame: bytes) -> None:
        window = _window_of(self.plan, sent_ns / 1e9)
        if window is not None:
            key = self.plan.pair_key(window, self.index, other)
            self.result.sent[key] = self.result.sent.get(key, 0) + 1
            self.result.sent_bytes[key] = self.result.sent_bytes.get(key, 0) + len(frame) - 1

    async def send(self) -> None:
        if self.plan.bulk:
            await self.send_bulk()
        else:
            await self.send_paced()

    async def send_bulk(self) -> None:
        """Client 0 to client 1, each frame as soon as the connection takes it (back-pressure)."""
        assert self.ws is not None
        if self.index != 0:
            return
        plan, padding = self.plan, bytes(max(0, self.plan.payload - STAMP.size))
        await _sleep_until(plan.send_start)
        sequence = 0
        try:
            while time.time() < plan.send_end:
                sent_ns = time.time_ns()
                frame = forward(self.tun_ip, address(1), STAMP.pack(sent_ns, 0, sequence) + padding)
                await self.ws.send(frame)
                self.count_sent(1, sent_ns, frame)
                sequence += 1
        except ConnectionClosed:
            pass  # counted by receive()

    async def send_paced(self) -> None:
        assert self.ws is not None
        plan, result = self.plan, self.result
        rng = random.Random(self.index)
        period = 1.0 / plan.rate
        padding = bytes(max(0, plan.payload - STAMP.size))
        next_send = plan.send_start + rng.random() * period  # spread clients over a period
        sequence = 0
        try:
            while next_send < plan.send_end:
                await _sleep_until(next_send)
                lag = time.time() - next_send
                result.max_send_lag_ms = max(result.max_send_lag_ms, lag * 1000)
                other = rng.randrange(plan.good_total - 1)
                other += other >= self.index  # anyone but ourselves
                sent_ns = time.time_ns()
                stamp = STAMP.pack(sent_ns, self.index, sequence)
                frame = forward(self.tun_ip, address(other), stamp + padding)
                await self.ws.send(frame)
                self.count_sent(other, sent_ns, frame)
                sequence += 1
                next_send += period
        except ConnectionClosed:
            pass  # counted by receive()


class GarbageClient:
    """Logged in, then sends junk as fast as the connection takes it; reconnects when closed."""

    def __init__(self, index: int, plan: Plan, result: WorkerResult) -> None:
        self.index = index
        self.tun_ip = address(index)
        self.plan = plan
        self.result = result
        self.rng = random.Random(index)

    def frame(self, flood: bool) -> bytes:
        """Junk; with ``flood`` only kinds the relay drops without closing the sender."""
        rng, plan = self.rng, self.plan
        victim = address(rng.randrange(plan.good_total))
        kind = rng.random()
        if kind < 0.40:  # spoofed source: dropped and counted
            return forward(victim, address(rng.randrange(plan.good_total)), rng.randbytes(64))
        if kind < 0.55:  # truncated FORWARD: dropped
            return forward(self.tun_ip, victim, b"")[: rng.randrange(1, 21)]
        if kind < 0.70:  # unknown type: dropped
            return bytes((rng.randrange(7, 255),)) + rng.randbytes(rng.randrange(0, 200))
        if kind < 0.80:  # to nobody: dropped
            return forward(self.tun_ip, IPv4Address("10.99.99.99"), rng.randbytes(64))
        if flood:  # random bytes behind an unknown type byte: dropped
            return bytes((rng.randrange(7, 255),)) + rng.randbytes(rng.randrange(0, 300))
        if kind < 0.994:  # any bytes: mostly dropped, a malformed known type closes us
            return rng.randbytes(rng.randrange(1, 300))
        if kind < 0.999:  # spoofed DISCOVERY / UDP4CONN: closes us (4005)
            return bytes((rng.choice((3, 5)),)) + victim.packed + self.tun_ip.packed + bytes(6)
        # Oversized (the length field cannot say so): the server closes us with 1009.
        return forward(self.tun_ip, victim, b"") + bytes(70000)

    async def run(self, ws: ClientConnection | None) -> None:
        plan, result = self.plan, self.result
        await _sleep_until(plan.garbage_start)
        while (now := time.time()) < plan.garbage_end:
            flood = now >= plan.flood_start
            window = _window_of(plan, now) or "ramp"
            if ws is None:
                if _last_timestamp.get(self.tun_ip, 0) > now + 120:
                    # Reconnecting faster than once a second would run the login
                    # timestamps out of the server's 300 s window.
                    await asyncio.sleep(0.1)
                    continue
                try:
                    ws = await _login(plan.url_of(self.index), self.index)
                except (OSError, TimeoutError, WebSocketException):
                    result.garbage_failed_logins += 1
                    await asyncio.sleep(0.05)
                    continue
            try:
                for _ in range(64):
                    await ws.send(self.frame(flood))
                    result.garbage_frames[window] = result.garbage_frames.get(window, 0) + 1
            except (ConnectionClosed, OSError, AttributeError):
                # AttributeError: asyncio (3.11) can fail inside websockets' send() when
                # the server closed the connection while our write buffer was not empty.
                count = result.garbage_reconnects.get(window, 0)
                result.garbage_reconnects[window] = count + 1
                with contextlib.suppress(Exception):
                    await ws.close()
                ws = None
            # Let the connection read: the server's close frame tells us we were closed.
            await asyncio.sleep(0)
        if ws is not None:
            await ws.close()


async def _worker(plan: Plan, conn: multiprocessing.connection.Connection) -> WorkerResult:
    result = WorkerResult()
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    good = [GoodClient(index, plan, result) for index in plan.good]
    garbage = [GarbageClient(index, plan, result) for index in plan.garbage]

    async def login_garbage(client: GarbageClient) -> ClientConnection | None:
        async with limit:
            try:
                return await _login(plan.url_of(client.index), client.index)
            except (OSError, TimeoutError, WebSocketException):
                result.garbage_failed_logins += 1
                return None

    await asyncio.gather(*(client.login(limit) for client in good))
    garbage_ws = list(await asyncio.gather(*(login_garbage(client) for client in garbage)))
    conn.send(("ready", result.failed_logins))
    # The parent answers with the timeline once every worker is ready; the clients
    # hold this plan, so it is updated in place.
    timeline: dict[str, Any] = await asyncio.to_thread(conn.recv)
    for key, value in timeline.items():
        setattr(plan, key, value)
    cpu_start = time.process_time()
    wait_start = _runqueue_wait("self")
    wall_start = time.time()
    live = [client for client in good if client.ws is not None]
    receivers = [asyncio.create_task(client.receive()) for client in live]
    senders = [asyncio.create_task(client.send()) for client in live]
    spammers = [
        asyncio.create_task(client.run(ws)) for client, ws in zip(garbage, garbage_ws, strict=True)
    ]
    await asyncio.gather(*senders, *spammers)
    await _sleep_until(plan.stop)
    result.cpu_seconds = time.process_time() - cpu_start
    result.runqueue_wait_seconds = _runqueue_wait("self") - wait_start
    result.wall_seconds = time.time() - wall_start
    for client in live:
        client.closing = True
    await asyncio.gather(*(client.ws.close() for client in live if client.ws is not None))
    await asyncio.gather(*receivers, return_exceptions=True)
    return result


def worker_main(plan: Plan, conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    try:
        result = asyncio.run(_worker(plan, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("result", result))
    conn.close()


# -- parent side ----------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, needed)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _runqueue_wait(pid: int | str) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (schedstat).

    A busy machine shows up here rather than as CPU time: a process that waits
    for a CPU uses little of it while its latency grows.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


class Measured:
    """A process measured from /proc/<pid>: CPU time, run-queue wait, memory."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
        return (utime + stime) / CLK_TCK

    def cpu_wait_seconds(self) -> float:
        """Time the process was runnable but waiting for a CPU (run queue), all threads."""
        return _runqueue_wait(self.pid)

    def memory_kib(self) -> dict[str, int]:
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
        return values

    def memory_summary(self) -> dict[str, float]:
        memory = self.memory_kib()
        return {
            "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
            "rss_mib": round(memory.get("VmRSS", 0) / 1024, 1),
        }

    def counters(self) -> dict[str, float] | None:
        return None


class Server(Measured):
    """`p2pvpn server` as a subprocess on 127.0.0.1; ``cluster``: the NATS URL to join."""

    def __init__(
        self,
        workdir: Path,
        *,
        metrics: bool = True,
        src: Path = REPO / "src",
        cluster: str | None = None,
        name: str = "server",
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        config = workdir / f"server-{self.port}.cfg"
        # Its own control socket: several servers (and other runs) on one machine must
        # not share the default path. A server without the key warns and goes on.
        text = (
            f"mode = server\nwebsocket = ws://127.0.0.1:{self.port}/\n"
            f"password = {PASSWORD}\nstun_port = 0\n"
            f"control_socket = {workdir / f'server-{self.port}.sock'}\n"
        )
        if self.metrics_port is not None:
            text += f"metrics = 127.0.0.1:{self.metrics_port}\n"
        config.touch(mode=0o600)  # it holds the password
        config.write_text(text)
        argv = [sys.executable, "-m", "p2pvpn", "server", "-c", str(config)]
        if cluster is not None:
            argv += ["--cluster", cluster]
        self.log_path = workdir / f"server-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(src)},
        )
        super().__init__(name, self.process.pid)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start listening within 15 s")

    def counters(self) -> dict[str, float] | None:
        """The relay's own counters from its metrics endpoint; None if there is none."""
        if self.metrics_port is None:
            return None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        wanted = {
            "p2pvpn_server_frames_received_total": "frames_received",
            "p2pvpn_server_frames_relayed_total": "frames_relayed",
            "p2pvpn_server_drops_total": "drops",
            "p2pvpn_server_rejections_total": "rejections",
            "p2pvpn_server_logins_total": "logins",
            "p2pvpn_server_cluster_connected": "cluster_connected",
            "p2pvpn_server_cluster_servers": "cluster_servers",
            "p2pvpn_server_cluster_frames_published_total": "cluster_published",
            "p2pvpn_server_cluster_publish_dropped_total": "cluster_publish_dropped",
            "p2pvpn_server_cluster_frames_received_total": "cluster_received",
        }
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            key = wanted.get(name.split("{", 1)[0])
            if key is not None:
                values[key] = values.get(key, 0.0) + float(value)
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _machine_idle_seconds() -> float:
    """Machine-wide idle CPU seconds so far, all CPUs (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / CLK_TCK


def _ms(nanoseconds: float | None) -> float:
    return math.nan if nanoseconds is None else round(nanoseconds / 1e6, 3)


def latency_summary(values: list[int]) -> dict[str, float]:
    return {
        "p50_ms": _ms(percentile(values, 50)),
        "p90_ms": _ms(percentile(values, 90)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(max(values, default=None)),
        "samples": len(values),
    }


def split(indexes: list[int], parts: int) -> list[list[int]]:
    return [indexes[part::parts] for part in range(parts)]


def _measure_window(measured: Sequence[Measured], start: float, end: float) -> list[dict[str, Any]]:
    """Sleep through [start, end) and return what each process used in it, in order."""
    _sleep_until_wall(start)
    before = [(m.cpu_seconds(), m.cpu_wait_seconds(), m.counters()) for m in measured]
    idle_before = _machine_idle_seconds()
    _sleep_until_wall(end)
    idle = _machine_idle_seconds() - idle_before
    windows = []
    for process, (cpu_before, wait_before, counters_before) in zip(measured, before, strict=True):
        cpu = process.cpu_seconds() - cpu_before
        wait = process.cpu_wait_seconds() - wait_before
        counters_after = process.counters()
        window: dict[str, Any] = {
            "cpu_seconds": round(cpu, 3),
            "cpu_percent": round(100 * cpu / (end - start), 1),
            "runqueue_wait_percent": round(100 * wait / (end - start), 1),
            "machine_idle_percent": round(100 * idle / (end - start) / (os.cpu_count() or 1), 1),
        }
        if counters_before is not None and counters_after is not None:
            # The relay's own view: what it read, relayed, dropped and closed per second.
            window["relay_counters_per_s"] = {
                key: round((counters_after.get(key, 0) - value) / (end - start), 1)
                for key, value in counters_before.items()
                if key not in GAUGES
            }
        windows.append(window)
    return windows


def run_workers(
    measured: Sequence[Measured], plans: list[Plan], timeline: Callable[[float], dict[str, Any]]
) -> tuple[list[WorkerResult], dict[str, list[dict[str, Any]]], float]:
    """Start workers, wait for their logins, run the timeline; measure the servers (and
    any other ``measured`` process, e.g. nats-server) per window, in the order given."""
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for plan in plans:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=worker_main, args=(plan, child_end), daemon=True)
        process.start()
        pipes.append(parent_end)
        processes.append(process)
    login_started = time.time()
    for pipe, process in zip(pipes, processes, strict=True):
        _expect(pipe, process, "ready", LOGIN_TIMEOUT + 30)
    login_seconds = time.time() - login_started
    schedule = timeline(time.time() + 1.0)
    for pipe in pipes:
        pipe.send(schedule)
    server_windows = {
        name: _measure_window(measured, start, end)
        for name, (start, end) in sorted(schedule["windows"].items(), key=lambda item: item[1])
    }
    results = []
    for pipe, process in zip(pipes, processes, strict=True):
        results.append(_expect(pipe, process, "result", 60))
        process.join(10)
    return results, server_windows, login_seconds


def _expect(
    pipe: multiprocessing.connection.Connection,
    process: multiprocessing.process.BaseProcess,
    kind: str,
    timeout: float,
) -> Any:
    """The next message of a worker, which must be ``kind``; fails fast if the worker died."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not process.is_alive() and not pipe.poll(0):
            raise RuntimeError(f"worker {process.pid} died (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {process.pid} sent no {kind!r} within {timeout:g} s")
    message, payload = pipe.recv()
    if message == "error":
        raise RuntimeError(f"worker {process.pid} failed:\n{payload}")
    if message != kind:
        raise RuntimeError(f"worker {process.pid}: expected {kind!r}, got {message!r}")
    return payload


def _sleep_until_wall(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)


def _in_window(keyed: dict[str, Any], window: str, kind: str | None) -> list[Any]:
    """The values of ``keyed`` (by Plan.pair_key) in ``window``: one kind of pair, or all."""
    return [
        value
        for key, value in keyed.items()
        if key.partition("/")[0] == window and kind in (None, key.partition("/")[2])
    ]


def merge(results: list[WorkerResult], window: str, kind: str | None = None) -> dict[str, Any]:
    latencies = [
        value
        for result in results
        for values in _in_window(result.latencies_ns, window, kind)
        for value in values
    ]
    return {
        "sent": sum(sum(_in_window(result.sent, window, kind)) for result in results),
        "received": len(latencies),
        "sent_bytes": sum(sum(_in_window(r.sent_bytes, window, kind)) for r in results),
        "received_bytes": sum(sum(_in_window(r.received_bytes, window, kind)) for r in results),
        "latency": latency_summary(latencies),
    }


def errors_of(results: list[WorkerResult]) -> dict[str, Any]:
    return {
        "failed_logins": sum(r.failed_logins for r in results),
        "unexpected_closes": sum(r.unexpected_closes for r in results),
        "wrong_destination": sum(r.wrong_destination for r in results),
        "examples": [e for r in results for e in r.login_errors + r.close_reasons][:5],
    }


def generator_load(results: list[WorkerResult]) -> dict[str, Any]:
    return {
        "worker_cpu_percent": [
            round(100 * r.cpu_seconds / r.wall_seconds, 1) if r.wall_seconds else 0.0
            for r in results
        ],
        "worker_runqueue_wait_percent": [
            round(100 * r.runqueue_wait_seconds / r.wall_seconds, 1) if r.wall_seconds else 0.0
            for r in results
        ],
        "max_send_lag_ms": round(max(r.max_send_lag_ms for r in results), 1),
    }


def _worker_count(args: argparse.Namespace, clients: int) -> int:
    """About one worker per 50 clients, at least one, at most ``--workers``."""
    most: int = args.workers
    return max(1, min(most, clients // 50 or 1))


def _good_plans(urls: list[str], good: int, args: argparse.Namespace) -> list[Plan]:
    return [
        Plan(urls, part, [], good, args.rate, args.payload)
        for part in split(list(range(good)), _worker_count(args, good))
    ]


def _traffic_summary(
    results: list[WorkerResult], window: str, duration: float, kind: str | None = None
) -> dict[str, Any]:
    """What the good clients offered and got relayed in ``window``, per second; ``kind``:
    only the pairs on one server ("same") or on two ("cross")."""
    traffic = merge(results, window, kind)
    return {
        "offered_fps": round(traffic["sent"] / duration, 1),
        "relayed_fps": round(traffic["received"] / duration, 1),
        "lost_frames": traffic["sent"] - traffic["received"],
        "offered_mbit_s": round(8 * traffic["sent_bytes"] / duration / 1e6, 2),
        "relayed_mbit_s": round(8 * traffic["received_bytes"] / duration / 1e6, 2),
        "latency": traffic["latency"],
    }


@contextlib.contextmanager
def running_servers(
    workdir: Path, args: argparse.Namespace, count: int, cluster: str | None = None
) -> Iterator[list[Server]]:
    """``count`` servers (joined on NATS ``cluster`` when given), all stopped on the way out."""
    servers: list[Server] = []
    try:
        for number in range(1, count + 1):
            name = f"server{number}" if cluster is not None else "server"
            servers.append(
                Server(
                    workdir,
                    metrics=not args.no_server_metrics,
                    src=args.server_src,
                    cluster=cluster,
                    name=name,
                )
            )
        yield servers
    finally:
        for server in servers:
            server.stop()


def _load_timeline(
    duration: float, window: str = "load", drain: float = DRAIN
) -> Callable[[float], dict[str, Any]]:
    def timeline(t0: float) -> dict[str, Any]:
        start, end = t0 + WARMUP, t0 + WARMUP + duration
        return {
            "windows": {window: (start, end)},
            "send_start": t0,
            "send_end": end,
            "stop": end + drain,
        }

    return timeline


def _process_rows(
    measured: Sequence[Measured], windows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per process: its name, what it used in the window, its memory (read now)."""
    return [
        {"name": process.name, **window, **process.memory_summary()}
        for process, window in zip(measured, windows, strict=True)
    ]


def _servers_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The servers of a cluster as one: CPU and memory summed, the machine's idle as is."""
    total: dict[str, Any] = {"name": f"{len(rows)} servers"}
    for key in ("cpu_seconds", "cpu_percent", "runqueue_wait_percent", "peak_rss_mib", "rss_mib"):
        total[key] = round(sum(row[key] for row in rows), 3)
    total["machine_idle_percent"] = rows[0]["machine_idle_percent"]
    counters: dict[str, float] = {}
    for row in rows:
        for key, value in row.get("relay_counters_per_s", {}).items():
            counters[key] = round(counters.get(key, 0.0) + value, 1)
    if counters:
        total["relay_counters_per_s"] = counters
    return total


def run_load(
    label: str,
    clients: int,
    args: argparse.Namespace,
    servers: list[Server],
    others: Sequence[Measured] = (),
) -> dict[str, Any]:
    """``clients`` round-robin over ``servers``; ``others`` (nats-server) are measured too."""
    loadavg = os.getloadavg()
    plans = _good_plans([server.url for server in servers], clients, args)
    measured = [*servers, *others]
    results, windows, login_seconds = run_workers(measured, plans, _load_timeline(args.duration))
    rows = _process_rows(measured, windows["load"])
    scenario = {
        "scenario": label,
        "clients": clients,
        "servers": len(servers),
        "rate_per_client": args.rate,
        "duration_s": args.duration,
        "payload_bytes": args.payload,
        "workers": len(plans),
        "login_seconds": round(login_seconds, 2),
        "loadavg_at_start": [round(value, 2) for value in loadavg],
        **_traffic_summary(results, "load", args.duration),
        "server": rows[0] if len(servers) == 1 else _servers_total(rows[: len(servers)]),
        "errors": errors_of(results),
        "generator": generator_load(results),
    }
    if len(measured) > 1:
        scenario["processes"] = rows
    if len(servers) > 1:
        scenario["pairs"] = {
            kind: _traffic_summary(results, "load", args.duration, kind) for kind in PAIR_KINDS
        }
    return scenario


def load_scenario(clients: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"-- load: {clients} clients x {args.rate} frames/s for {args.duration:g} s", flush=True)
    with running_servers(workdir, args, 1) as servers:
        return run_load(f"load-{clients}", clients, args, servers)


# -- cluster: N servers joined by one nats-server ------------------------------------------


def nats_process(nats: LocalNatsServer) -> Measured:
    pid = nats.pid
    if pid is None:
        raise RuntimeError("nats-server is not running")
    return Measured("nats-server", pid)


def wait_joined(servers: list[Server], timeout: float = 30.0) -> bool:
    """Until every server is on NATS and knows all the others (metrics); False if not."""
    if any(server.metrics_port is None for server in servers):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [server.counters() or {} for server in servers]
        if all(
            state.get("cluster_connected") == 1 and state.get("cluster_servers") == len(servers)
            for state in states
        ):
            return True
        time.sleep(0.2)
    return False


def run_bulk(
    label: str, args: argparse.Namespace, servers: list[Server], measured: Sequence[Measured]
) -> dict[str, Any]:
    """Client 0 floods client 1 with FORWARD frames; client i is on ``servers[i % len]``."""
    print(f"-- bulk: {label}, {args.bulk_duration:g} s", flush=True)
    loadavg = os.getloadavg()
    urls = [server.url for server in servers]
    plans = [
        Plan(urls, [index], [], 2, args.rate, args.bulk_payload, bulk=True) for index in (0, 1)
    ]
    timeline = _load_timeline(args.bulk_duration, "bulk", drain=BULK_DRAIN)
    results, windows, _ = run_workers(measured, plans, timeline)
    return {
        "scenario": label,
        "pair": PAIR_KINDS[0] if len(servers) == 1 else PAIR_KINDS[1],
        "payload_bytes": args.bulk_payload,
        "duration_s": args.bulk_duration,
        "loadavg_at_start": [round(value, 2) for value in loadavg],
        **_traffic_summary(results, "bulk", args.bulk_duration),
        "processes": _process_rows(measured, windows["bulk"]),
        "errors": errors_of(results),
    }


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base and not math.isnan(base) else None


def cluster_ratios(baseline: dict[str, Any] | None, cluster: dict[str, Any]) -> dict[str, Any]:
    """The cluster's figures over the single server's of the same run, and cross over same."""
    ratios: dict[str, Any] = {}
    load = cluster.get("load")
    if load is not None and baseline is not None:
        ratios["load_vs_1_server"] = {
            "relayed_fps": _ratio(load["relayed_fps"], baseline["relayed_fps"]),
            "p50": _ratio(load["latency"]["p50_ms"], baseline["latency"]["p50_ms"]),
            "p99": _ratio(load["latency"]["p99_ms"], baseline["latency"]["p99_ms"]),
            "server_cpu_seconds": _ratio(
                load["server"]["cpu_seconds"], baseline["server"]["cpu_seconds"]
            ),
            "server_peak_rss_mib": _ratio(
                load["server"]["peak_rss_mib"], baseline["server"]["peak_rss_mib"]
            ),
        }
    if load is not None:
        same, cross = (load["pairs"][kind]["latency"] for kind in PAIR_KINDS)
        ratios["cross_vs_same_server"] = {
            key: _ratio(cross[f"{key}_ms"], same[f"{key}_ms"]) for key in ("p50", "p90", "p99")
        }
    by_scenario: dict[str, list[float]] = {}
    for run in cluster.get("bulk", []):
        if run["ratio_to_1_server"] is not None:
            by_scenario.setdefault(run["scenario"], []).append(run["ratio_to_1_server"])
    if by_scenario:
        # The median over the rounds: each round's runs are back to back, the rounds
        # may meet another load on a shared machine.
        ratios["bulk_vs_1_server"] = {
            scenario: round(statistics.median(values), 3)
            for scenario, values in by_scenario.items()
        }
    return ratios


def bulk_rounds(
    args: argparse.Namespace, plain: Server, servers: list[Server], measured: list[Measured]
) -> list[dict[str, Any]]:
    """``--bulk-rounds`` times: the pair on the plain server, on one cluster server, across two."""
    runs = []
    count = len(servers)
    for number in range(1, args.bulk_rounds + 1):
        base = run_bulk("1 server", args, [plain], [plain])
        same = run_bulk(f"{count} servers, same server", args, servers[:1], measured)
        cross = run_bulk(f"{count} servers, cross-server", args, servers[:2], measured)
        for run in (base, same, cross):
            run["round"] = number
            run["ratio_to_1_server"] = _ratio(run["relayed_mbit_s"], base["relayed_mbit_s"])
            runs.append(run)
    return runs


def cluster_scenarios(
    args: argparse.Namespace, workdir: Path, baseline: dict[str, Any] | None
) -> dict[str, Any]:
    """Load and bulk against ``--cluster`` servers on one loopback nats-server (the load's
    single-server baseline is ``baseline``), the bulk also against one server alone."""
    count, clients = args.cluster, max(args.counts)
    cluster: dict[str, Any] = {"servers": count, "clients": clients}
    with (
        LocalNatsServer(workdir / "nats") as nats,
        running_servers(workdir, args, 1) as (plain,),
        running_servers(workdir, args, count, nats.url) as servers,
    ):
        measured = [*servers, nats_process(nats)]
        if not wait_joined(servers):
            print("warning: not every server reports a NATS connection", flush=True)
        if not args.no_load:
            print(f"-- load: {clients} clients over {count} servers (round-robin)", flush=True)
            label = f"cluster-{count}-{clients}"
            cluster["load"] = run_load(label, clients, args, servers, measured[count:])
        if not args.no_bulk:
            cluster["bulk"] = bulk_rounds(args, plain, servers, measured)
    cluster["ratios"] = cluster_ratios(baseline, cluster)
    return cluster


def cluster_iperf3(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The relayed iperf3 runs of cluster_iperf3.py, or why they did not happen."""
    if args.no_iperf3:
        return {"skipped": "--no-iperf3"}
    # Beside this script: on sys.path when it runs as a script, as it always does.
    from cluster_iperf3 import relayed_iperf3, why_not

    reason = why_not()
    if reason is not None:
        return {"skipped": reason}
    try:
        return relayed_iperf3(
            args.cluster, args.iperf3_seconds, args.iperf3_rounds, workdir / "iperf3"
        )
    except Exception as error:  # the namespaces are gone (TestBed); the rest of the run stands
        return {"skipped": f"failed: {error}"}


GARBAGE_PHASES = ("baseline", "garbage", "flood")


def _garbage_timeline(t0: float, duration: float) -> dict[str, Any]:
    """The good clients alone, then with mixed garbage, then with a flood, a second apart."""
    baseline = (t0 + WARMUP, t0 + WARMUP + duration)
    mixed = (baseline[1] + 1.0, baseline[1] + 1.0 + duration)
    flood = (mixed[1] + 1.0, mixed[1] + 1.0 + duration)
    return {
        "windows": {"baseline": baseline, "garbage": mixed, "flood": flood},
        "send_start": t0,
        "send_end": flood[1],
        "garbage_start": baseline[1],
        "flood_start": mixed[1],
        "garbage_end": flood[1],
        "stop": flood[1] + DRAIN,
    }


def _garbage_phase(
    results: list[WorkerResult], server_window: dict[str, Any], phase: str, duration: float
) -> dict[str, Any]:
    junk = sum(r.garbage_frames.get(phase, 0) for r in results)
    return {
        **_traffic_summary(results, phase, duration),
        "server": server_window,
        "junk_sent_fps": round(junk / duration, 1),
        "garbage_reconnects": sum(r.garbage_reconnects.get(phase, 0) for r in results),
    }


def garbage_scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    good, bad = args.good_clients, args.garbage_clients
    print(
        f"-- garbage: {good} good clients x {args.rate} frames/s: alone, then with "
        f"{bad} clients sending mixed garbage, then a droppable flood, at full speed "
        f"({args.duration:g} s each)",
        flush=True,
    )
    with running_servers(workdir, args, 1) as (server,):
        garbage_indexes = list(range(GARBAGE_OFFSET, GARBAGE_OFFSET + bad))
        plans = _good_plans([server.url], good, args) + [
            Plan([server.url], [], part, good, args.rate, args.payload)
            for part in split(garbage_indexes, _worker_count(args, bad))
        ]
        results, windows, login_seconds = run_workers(
            [server], plans, lambda t0: _garbage_timeline(t0, args.duration)
        )
        memory = server.memory_kib()
    return {
        "scenario": "garbage",
        "good_clients": good,
        "garbage_clients": bad,
        "rate_per_client": args.rate,
        "duration_s": args.duration,
        "login_seconds": round(login_seconds, 2),
        "phases": {
            phase: _garbage_phase(results, windows[phase][0], phase, args.duration)
            for phase in GARBAGE_PHASES
        },
        "garbage_failed_logins": sum(r.garbage_failed_logins for r in results),
        "server_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "errors": errors_of(results),
        "generator": generator_load(results),
    }


# -- report ---------------------------------------------------------------------------------

REPORT_HEADER = (
    "scenario",
    "clients",
    "offered/s",
    "relayed/s",
    "p50 ms",
    "p99 ms",
    "srv CPU s",
    "srv CPU %",
    "srv CPU-wait %",
    "idle %",
    "peak RSS MiB",
    "errors",
    "lost",
)


def _error_count(errors: dict[str, Any]) -> int:
    return int(errors["failed_logins"] + errors["unexpected_closes"])


def _report_row(
    scenario: str, clients: str, traffic: dict[str, Any], peak_rss_mib: float, errors: int
) -> list[str]:
    """One line of the table: ``traffic`` is a load scenario or a garbage phase."""
    server = traffic["server"]
    return [
        scenario,
        clients,
        f"{traffic['offered_fps']:.0f}",
        f"{traffic['relayed_fps']:.0f}",
        f"{traffic['latency']['p50_ms']:.2f}",
        f"{traffic['latency']['p99_ms']:.2f}",
        f"{server['cpu_seconds']:.2f}",
        f"{server['cpu_percent']:.1f}",
        f"{server['runqueue_wait_percent']:.1f}",
        f"{server['machine_idle_percent']:.0f}",
        f"{peak_rss_mib:.1f}",
        str(errors),
        str(traffic["lost_frames"]),
    ]


def _garbage_rows(garbage: dict[str, Any]) -> list[list[str]]:
    errors = _error_count(garbage["errors"])
    rows = []
    for name, phase in garbage["phases"].items():
        label = f"{garbage['good_clients']} good" + (
            " alone" if name == "baseline" else f" + {garbage['garbage_clients']} {name}"
        )
        rows.append(
            _report_row(f"garbage/{name}", label, phase, garbage["server_peak_rss_mib"], errors)
        )
    return rows


def _print_growth(loads: list[dict[str, Any]]) -> None:
    """How the server's cost grew from the smallest to the largest load scenario."""
    first, last = loads[0], loads[-1]
    scale = last["clients"] / first["clients"]
    print(f"\ngrowth {first['clients']} -> {last['clients']} clients (x{scale:g}):")
    for key, label in (("cpu_seconds", "server CPU"), ("peak_rss_mib", "server peak RSS")):
        ratio = last["server"][key] / first["server"][key] if first["server"][key] else math.nan
        print(f"  {label}: x{ratio:.2f}")
    for load in loads:
        per_frame = (
            1e6 * load["server"]["cpu_seconds"] / max(1, load["relayed_fps"] * load["duration_s"])
        )
        print(f"  {load['clients']} clients: {per_frame:.1f} us server CPU per relayed frame")


def _print_attack_effects(garbage: dict[str, Any]) -> None:
    """What each attack phase cost the server and the good clients' latency."""
    base = garbage["phases"]["baseline"]
    print()
    for name, text in (("garbage", "mixed garbage"), ("flood", "droppable flood")):
        attack = garbage["phases"][name]
        relay = attack["server"].get("relay_counters_per_s", {})
        print(
            f"{text}: {attack['junk_sent_fps']:.0f} junk frames/s sent, server read "
            f"{relay.get('frames_received', math.nan):.0f}/s and dropped "
            f"{relay.get('drops', math.nan):.0f}/s, "
            f"{attack['garbage_reconnects']} garbage reconnects; good clients' p50 "
            f"{base['latency']['p50_ms']:.2f} -> {attack['latency']['p50_ms']:.2f} ms, "
            f"p99 {base['latency']['p99_ms']:.2f} -> {attack['latency']['p99_ms']:.2f} ms"
        )


def _print_generator_load(scenario: str, generator: dict[str, Any]) -> None:
    print(
        f"generator ({scenario}): worker CPU % {generator['worker_cpu_percent']}, "
        f"CPU-wait % {generator['worker_runqueue_wait_percent']}, "
        f"max send lag {generator['max_send_lag_ms']} ms"
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _print_cluster_processes(load: dict[str, Any]) -> None:
    header = ("process", "CPU s", "CPU %", "CPU-wait %", "peak RSS MiB", "relayed/s",
              "published/s", "from NATS/s", "drops/s")  # fmt: skip
    rows = []
    for row in load["processes"]:
        counters = row.get("relay_counters_per_s", {})
        rows.append(
            [
                row["name"],
                f"{row['cpu_seconds']:.2f}",
                f"{row['cpu_percent']:.1f}",
                f"{row['runqueue_wait_percent']:.1f}",
                f"{row['peak_rss_mib']:.1f}",
                _fmt(counters.get("frames_relayed"), 0),
                _fmt(counters.get("cluster_published"), 0),
                _fmt(counters.get("cluster_received"), 0),
                _fmt(counters.get("drops", 0.0) if counters else None, 0),  # none yet: none
            ]
        )
    for line in format_table(header, rows, right=range(1, len(header)), rule=True):
        print(line)


def _pair_row(label: str, traffic: dict[str, Any]) -> list[str]:
    return [
        label,
        f"{traffic['offered_fps']:.0f}",
        f"{traffic['relayed_fps']:.0f}",
        f"{traffic['latency']['p50_ms']:.2f}",
        f"{traffic['latency']['p99_ms']:.2f}",
        str(traffic["lost_frames"]),
    ]


def _cpu_per_frame(load: dict[str, Any]) -> str:
    """CPU per relayed frame: the servers together, and nats-server's share of a frame."""
    frames = max(1.0, load["relayed_fps"] * load["duration_s"])
    text = f"{1e6 * load['server']['cpu_seconds'] / frames:.0f} us server CPU per relayed frame"
    for row in load.get("processes", []):
        if row["name"] == "nats-server":
            text += f", {1e6 * row['cpu_seconds'] / frames:.0f} us of nats-server"
    return text


def _print_hop(
    baseline: dict[str, Any] | None, load: dict[str, Any], ratios: dict[str, Any]
) -> None:
    """Latency of all pairs on one server, on the cluster, and same- against cross-server."""
    count = load["servers"]
    rows = [] if baseline is None else [_pair_row("1 server, all pairs", baseline)]
    rows.append(_pair_row(f"{count} servers, all pairs", load))
    rows.append(_pair_row(f"{count} servers, same-server pairs", load["pairs"]["same"]))
    rows.append(_pair_row(f"{count} servers, cross-server pairs", load["pairs"]["cross"]))
    header = ("pairs", "offered/s", "relayed/s", "p50 ms", "p99 ms", "lost")
    print()
    for line in format_table(header, rows, right=range(1, len(header)), rule=True):
        print(line)
    for scenario in [baseline, load] if baseline is not None else [load]:
        print(f"{scenario['scenario']}: {_cpu_per_frame(scenario)}")
    hop = ratios["cross_vs_same_server"]
    print(f"extra hop: cross-server / same-server p50 x{_fmt(hop['p50'])}, p99 x{_fmt(hop['p99'])}")
    versus = ratios.get("load_vs_1_server")
    if versus:
        print(
            f"{count} servers / 1 server: relayed/s x{_fmt(versus['relayed_fps'])}, "
            f"p50 x{_fmt(versus['p50'])}, p99 x{_fmt(versus['p99'])}, "
            f"server CPU s x{_fmt(versus['server_cpu_seconds'])}, "
            f"peak RSS x{_fmt(versus['server_peak_rss_mib'])}"
        )


def _bulk_row(run: dict[str, Any]) -> list[str]:
    processes = run["processes"]
    servers = [row for row in processes if row["name"] != "nats-server"]
    nats = [row["cpu_percent"] for row in processes if row["name"] == "nats-server"]
    # What the servers dropped: full send queues, frames NATS did not take.
    drops = sum(
        row.get("relay_counters_per_s", {}).get(key, 0.0)
        for row in servers
        for key in ("drops", "cluster_publish_dropped")
    )
    return [
        str(run["round"]),
        run["scenario"],
        f"{run['offered_mbit_s']:.0f}",
        f"{run['relayed_mbit_s']:.0f}",
        _fmt(run["ratio_to_1_server"]),
        f"{run['latency']['p50_ms']:.1f}",
        f"{run['latency']['p99_ms']:.1f}",
        f"{drops:.0f}",
        f"{sum(row['cpu_percent'] for row in servers):.1f}",
        _fmt(nats[0] if nats else None, 1),
    ]


def _print_bulk(bulk: list[dict[str, Any]], ratios: dict[str, Any]) -> None:
    header = ("round", "bulk pair", "offered Mbit/s", "relayed Mbit/s", "vs 1 server", "p50 ms",
              "p99 ms", "drops/s", "servers CPU %", "nats CPU %")  # fmt: skip
    rows = [_bulk_row(run) for run in bulk]
    print()
    for line in format_table(header, rows, right=range(len(header)), rule=True):
        print(line)
    medians = ", ".join(
        f"{scenario} x{_fmt(value)}" for scenario, value in ratios["bulk_vs_1_server"].items()
    )
    print(f"bulk, median over the rounds, relayed Mbit/s against 1 server: {medians}")


def _print_iperf3(iperf3: dict[str, Any]) -> None:
    print()
    if "skipped" in iperf3:
        print(f"iperf3 through p2pvpn run clients: not run ({iperf3['skipped']})")
        return
    header = ("round", "iperf3 pair (relayed)", "Mbit/s", "vs 1 server")
    rows = [
        [str(run["round"]), run["scenario"], _fmt(run.get("mbit_s"), 0), _fmt(run.get("ratio"))]
        for run in iperf3["runs"]
    ]
    for line in format_table(header, rows, right=(0, 2, 3), rule=True):
        print(line)
    for run in iperf3["runs"]:
        if "error" in run:
            print(f"  round {run['round']}, {run['scenario']}: {run['error']}")
    medians = ", ".join(f"{name} x{_fmt(value)}" for name, value in iperf3["ratios"].items())
    print(f"iperf3, median over the rounds, against 1 server: {medians}")


def print_cluster(cluster: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    print(
        f"\ncluster: {cluster['servers']} servers joined by one nats-server on loopback, "
        f"clients round-robin over the servers"
    )
    load = cluster.get("load")
    if load is not None:
        for scenario in (baseline, load):
            if scenario is not None:
                print(f"  load average at the start of {scenario['scenario']}: "
                      f"{scenario['loadavg_at_start']}")  # fmt: skip
        _print_cluster_processes(load)
        _print_hop(baseline, load, cluster["ratios"])
    if cluster.get("bulk"):
        _print_bulk(cluster["bulk"], cluster["ratios"])
    if "iperf3" in cluster:
        _print_iperf3(cluster["iperf3"])


def print_report(report: dict[str, Any]) -> None:
    loads = report["load"]
    cluster = report.get("cluster", {})
    garbage = report.get("garbage")
    rows = [
        _report_row(
            load["scenario"],
            str(load["clients"]),
            load,
            load["server"]["peak_rss_mib"],
            _error_count(load["errors"]),
        )
        for load in [*loads, *([cluster["load"]] if "load" in cluster else [])]
    ]
    if garbage:
        rows += _garbage_rows(garbage)
    if rows:
        for line in format_table(REPORT_HEADER, rows, right=range(len(REPORT_HEADER)), rule=True):
            print(line)
    if len(loads) > 1:
        _print_growth(loads)
    if garbage:
        _print_attack_effects(garbage)
    if cluster:
        largest = [load for load in loads if load["clients"] == cluster["clients"]]
        print_cluster(cluster, largest[0] if largest else None)
    for load in loads:
        _print_generator_load(load["scenario"], load["generator"])
    if garbage:
        _print_generator_load("garbage", garbage["generator"])


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="clients in the load phase")
    parser.add_argument(
        "--compare", metavar="N,M,...", help="run the load phase for each count (e.g. 100,1000)"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="frames/s per client")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--payload", type=int, default=64, help="IP payload bytes per frame")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--good-clients", type=int, default=100)
    parser.add_argument("--garbage-clients", type=int, default=100)
    parser.add_argument("--no-garbage", action="store_true", help="skip the garbage phase")
    parser.add_argument("--no-load", action="store_true", help="skip the load phase")
    parser.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="also run the load on N servers joined by a loopback nats-server (same run), "
        "and the bulk pair on one server, on one server of the N and across two",
    )
    parser.add_argument("--bulk-duration", type=float, default=8.0, help="seconds per bulk run")
    parser.add_argument("--bulk-rounds", type=int, default=2, help="rounds of the 3 bulk runs")
    parser.add_argument(
        "--bulk-payload", type=int, default=1400, help="IP payload bytes per bulk frame"
    )
    parser.add_argument("--no-bulk", action="store_true", help="with --cluster: no bulk runs")
    parser.add_argument(
        "--no-iperf3", action="store_true", help="with --cluster: no iperf3 in namespaces"
    )
    parser.add_argument(
        "--iperf3-seconds", type=int, default=6, help="with --cluster: seconds per iperf3 run"
    )
    parser.add_argument("--iperf3-rounds", type=int, default=2, help="rounds of the 3 iperf3 runs")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "load" / "results.json")
    parser.add_argument(
        "--log-dir", type=Path, help="keep the server configs and logs here (default: discard)"
    )
    parser.add_argument(
        "--server-src",
        type=Path,
        default=REPO / "src",
        help="run the server from this source tree (A/B comparisons); default: this checkout",
    )
    parser.add_argument(
        "--no-server-metrics",
        action="store_true",
        help="do not read the relay's counters from its metrics endpoint",
    )
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what the benchmark cannot do; sets ``args.counts`` (client counts to run)."""
    counts = [int(n) for n in args.compare.split(",")] if args.compare else [args.clients]
    if any(n < 2 for n in counts) or max(counts) > GARBAGE_OFFSET:
        parser.error(f"client counts must be within 2..{GARBAGE_OFFSET}")
    if not 0 < args.rate <= 1000 or not 0 < args.duration <= 600:
        parser.error("rate must be in (0, 1000] and duration in (0, 600]")
    if args.payload < STAMP.size or not STAMP.size <= args.bulk_payload <= 65000:
        parser.error(f"payloads must be at least {STAMP.size} bytes (bulk: at most 65000)")
    if args.cluster is not None and not 2 <= args.cluster <= 16:
        parser.error("--cluster takes 2..16 servers")
    args.counts = counts


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # As for ^C: the servers, nats-server and the namespaces are stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    total = max(args.counts) + (0 if args.no_garbage else args.good_clients + args.garbage_clients)
    limit = raise_fd_limit(2 * total + 1024)  # the server inherits it too
    report: dict[str, Any] = {
        "machine": machine(),
        "fd_limit": limit,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "server_src": str(args.server_src),
        "load": [],
    }
    with tempfile.TemporaryDirectory(prefix="relay-load-") as tmp:
        workdir = args.log_dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for clients in [] if args.no_load else args.counts:
            report["load"].append(load_scenario(clients, args, workdir))
        if args.cluster is not None:
            # The cluster runs the largest count; its baseline is that count on one server.
            loads = [load for load in report["load"] if load["clients"] == max(args.counts)]
            baseline = loads[0] if loads else None
            report["cluster"] = cluster_scenarios(args, workdir, baseline)
            report["cluster"]["iperf3"] = cluster_iperf3(args, workdir)
        if not args.no_garbage:
            report["garbage"] = garbage_scenario(args, workdir)
    print()
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    failures = [load["errors"] for load in report["load"]]
    cluster = report.get("cluster", {})
    failures += [run["errors"] for run in [*cluster.get("bulk", []), cluster.get("load")] if run]
    if "garbage" in report:
        failures.append(report["garbage"]["errors"])
    bad = [f for f in failures if f["failed_logins"] or f["unexpected_closes"]]
    if bad:
        print(f"ERRORS: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
