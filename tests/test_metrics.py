"""Prometheus metrics: collectors on fake stats, the HTTP endpoint, and a real server."""

import asyncio
import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from p2pvpn.client.peer import PeerState
from p2pvpn.config import ServerConfig
from p2pvpn.metrics import (
    PEER_STATES,
    ClientCollector,
    LoopSnapshot,
    MetricsServer,
    ServerCollector,
    SnapshotUnavailableError,
    serve_client_metrics,
    start_metrics_server,
)
from p2pvpn.server.runtime import ListenError, ServerRuntime
from p2pvpn.wire.stun import encode_binding_request
from tests.server import PASSWORD, auth_frame, forward, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CLIENT_SNAPSHOT: dict[str, Any] = {
    "name": "lab",
    "interface": "p2pvpn-lab",
    "address": "10.0.0.1/24",
    "version": "0.1.0",
    "dataplane": "pure",
    "pid": 1234,
    "started": 1700000000.5,
    "server": {
        "url": "ws://secret-host",
        "state": "connected",
        "connected_since": 1700000001.0,
        "reconnects": 3,
    },
    "relay": {"packets_out": 5, "bytes_out": 500, "packets_in": 6, "bytes_in": 600, "dropped": 2},
    "direct": {"packets_out": 7, "bytes_out": 700, "packets_in": 8, "bytes_in": 800},
    "peers": [
        {"tun_ip": "10.0.0.2", "state": "CONNECTED", "path": "direct 1.2.3.4:5", "rtt_ms": 12.5},
        {"tun_ip": "10.0.0.3", "state": "CONNECTED", "path": "direct 1.2.3.5:5", "rtt_ms": None},
        {"tun_ip": "10.0.0.4", "state": "WAITING", "path": "relay server", "rtt_ms": None},
    ],
    "routes": [{"destination": "10.0.0.9", "next_hop": "10.0.0.2", "delay_ms": 5}],
    "sysroutes": [],
    "drops": {"auth_failed": 4, "no_route": 1},
    "stun_failures": 9,
}

SERVER_STATS: dict[str, Any] = {
    "connections_total": 10,
    "connections_open": 4,
    "sessions_authenticated": 3,
    "logins": 7,
    "frames_received": 100,
    "bytes_received": 10000,
    "frames_relayed": 90,
    "bytes_relayed": 9000,
    "dhcp_leases": 2,
    "replay_cache_entries": 5,
    "internal_errors": 0,
    "drops": {"unknown_destination": 6},
    "rejections": {"AUTH_FAILED": 2, "MESSAGE_TOO_BIG": 1},
    "stun": {"requests": 11, "responses": 10, "ignored": 1},
}


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(url: str) -> tuple[Samples, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return parse(text), text


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@contextlib.contextmanager
def serving(collector: Any) -> Iterator[MetricsServer]:
    server = start_metrics_server("127.0.0.1", 0, collector)
    try:
        yield server
    finally:
        server.close()


# -- collectors over HTTP, fake stats ----------------------------------------------


def test_client_metrics_from_a_snapshot() -> None:
    with serving(ClientCollector(lambda: CLIENT_SNAPSHOT)) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        samples, text = scrape(server.url)
    for state in PEER_STATES:
        expected = {"CONNECTED": 2, "WAITING": 1}.get(state, 0)
        assert value(samples, "p2pvpn_peers", state=state) == expected
    assert value(samples, "p2pvpn_bytes_total", path="relay", direction="out") == 500
    assert value(samples, "p2pvpn_bytes_total", path="relay", direction="in") == 600
    assert value(samples, "p2pvpn_bytes_total", path="direct", direction="out") == 700
    assert value(samples, "p2pvpn_bytes_total", path="direct", direction="in") == 800
    assert value(samples, "p2pvpn_packets_total", path="relay", direction="out") == 5
    assert value(samples, "p2pvpn_packets_total", path="direct", direction="in") == 8
    assert value(samples, "p2pvpn_drops_total", reason="auth_failed") == 4
    assert value(samples, "p2pvpn_drops_total", reason="no_route") == 1
    assert value(samples, "p2pvpn_drops_total", reason="relay_not_sent") == 2
    assert value(samples, "p2pvpn_server_connected") == 1
    assert value(samples, "p2pvpn_reconnects_total") == 3
    assert value(samples, "p2pvpn_stun_failures_total") == 9
    assert value(samples, "p2pvpn_peer_rtt_seconds", peer="10.0.0.2") == 0.0125
    assert value(samples, "p2pvpn_routes") == 1
    assert value(samples, "p2pvpn_start_time_seconds") == 1700000000.5
    info = {
        "version": "0.1.0",
        "name": "lab",
        "interface": "p2pvpn-lab",
        "address": "10.0.0.1/24",
        "dataplane": "pure",
        "udp_offloads": "",
        "tun_offloads": "",
    }
    assert value(samples, "p2pvpn_client_info", **info) == 1
    assert "# TYPE p2pvpn_bytes_total counter" in text
    assert "# TYPE p2pvpn_peers gauge" in text
    assert "secret-host" not in text


def test_client_info_names_the_offloads_in_use() -> None:
    snapshot = {
        **CLIENT_SNAPSHOT,
        "dataplane": "fast",
        "udp_offloads": ["gso", "gro"],
        "tun_offloads": ["csum", "tso4", "uso4"],
    }
    [info] = [f for f in ClientCollector(lambda: snapshot).collect() if f.name == "p2pvpn_client"]
    [sample] = info.samples
    assert sample.labels["dataplane"] == "fast"
    assert sample.labels["udp_offloads"] == "gso+gro"
    assert sample.labels["tun_offloads"] == "csum+tso4+uso4"


def test_client_metrics_before_login_and_with_missing_keys() -> None:
    snapshot = {
        "server": {"state": "connecting", "reconnects": 0},
        "relay": {},
        "peers": [],
        "drops": {},
    }
    with serving(ClientCollector(lambda: snapshot)) as server:
        samples, _ = scrape(server.url)
    assert [value(samples, "p2pvpn_peers", state=state) for state in PEER_STATES] == [0] * 7
    assert value(samples, "p2pvpn_server_connected") == 0
    assert value(samples, "p2pvpn_stun_failures_total") == 0  # key absent
    assert value(samples, "p2pvpn_bytes_total", path="direct", direction="in") == 0
    assert ("p2pvpn_start_time_seconds", frozenset()) not in samples


def test_peer_states_match_the_state_machine() -> None:
    assert tuple(state.name for state in PeerState) == PEER_STATES


def test_server_metrics_from_stats() -> None:
    with serving(ServerCollector(lambda: SERVER_STATS)) as server:
        samples, text = scrape(server.url)
    assert value(samples, "p2pvpn_server_connections") == 4
    assert value(samples, "p2pvpn_server_connections_accepted_total") == 10
    assert value(samples, "p2pvpn_server_authenticated_sessions") == 3
    assert value(samples, "p2pvpn_server_logins_total") == 7
    assert value(samples, "p2pvpn_server_frames_received_total") == 100
    assert value(samples, "p2pvpn_server_bytes_received_total") == 10000
    assert value(samples, "p2pvpn_server_frames_relayed_total") == 90
    assert value(samples, "p2pvpn_server_bytes_relayed_total") == 9000
    assert value(samples, "p2pvpn_server_drops_total", reason="unknown_destination") == 6
    assert value(samples, "p2pvpn_server_rejections_total", reason="AUTH_FAILED") == 2
    assert value(samples, "p2pvpn_server_rejections_total", reason="MESSAGE_TOO_BIG") == 1
    assert value(samples, "p2pvpn_server_dhcp_leases") == 2
    assert value(samples, "p2pvpn_server_replay_cache_entries") == 5
    assert value(samples, "p2pvpn_server_internal_errors_total") == 0
    assert value(samples, "p2pvpn_server_stun_requests_total") == 11
    assert value(samples, "p2pvpn_server_stun_responses_total") == 10
    assert value(samples, "p2pvpn_server_stun_ignored_total") == 1
    assert "# TYPE p2pvpn_server_frames_relayed_total counter" in text
    assert "# TYPE p2pvpn_server_connections gauge" in text
    without_stun = {key: item for key, item in SERVER_STATS.items() if key != "stun"}
    with serving(ServerCollector(lambda: without_stun)) as server:
        samples, _ = scrape(server.url)
    assert not any(name.startswith("p2pvpn_server_stun_") for name, _ in samples)


def test_scrapes_read_fresh_values_and_a_failing_stats_function_fails_the_scrape() -> None:
    counter = {"n": 0}
    failing = {"on": False}

    def stats() -> Mapping[str, Any]:
        if failing["on"]:
            raise RuntimeError("stats are gone")
        counter["n"] += 1
        return {"frames_relayed": counter["n"]}

    with serving(ServerCollector(stats)) as server:
        first, _ = scrape(server.url)
        second, _ = scrape(server.url)
        assert value(second, "p2pvpn_server_frames_relayed_total") == (
            value(first, "p2pvpn_server_frames_relayed_total") + 1
        )
        failing["on"] = True
        with pytest.raises(urllib.error.HTTPError) as error:
            scrape(server.url)
        assert error.value.code == 500


def test_close_releases_the_port_and_is_idempotent() -> None:
    server = start_metrics_server("127.0.0.1", 0, ServerCollector(lambda: SERVER_STATS))
    port = server.port
    server.close()
    server()  # the closer may be called again
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free again


def test_bind_failure_raises_oserror() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}: ") as info:
            start_metrics_server("127.0.0.1", port, ClientCollector(dict))
        assert info.value.errno is not None


# -- LoopSnapshot -------------------------------------------------------------------


def test_loop_snapshot_runs_on_the_loop_thread() -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        seen: list[int] = []

        def snapshot() -> dict[str, Any]:
            seen.append(threading.get_ident())
            return {"answer": 42}

        call = LoopSnapshot(asyncio.get_running_loop(), snapshot)
        assert call() == {"answer": 42}  # on the loop itself: a plain call
        assert await asyncio.to_thread(call) == {"answer": 42}  # from a thread: via the loop
        assert seen == [loop_thread, loop_thread]

        def broken() -> dict[str, Any]:
            raise KeyError("missing")

        with pytest.raises(KeyError):
            await asyncio.to_thread(LoopSnapshot(asyncio.get_running_loop(), broken))

    asyncio.run(scenario())


def test_loop_snapshot_gives_up_on_a_stuck_or_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        stuck = LoopSnapshot(loop, dict, timeout=0.1)  # the loop is not running
        start = time.monotonic()
        with pytest.raises(SnapshotUnavailableError, match=r"did not answer within 0\.1 s"):
            stuck()
        assert time.monotonic() - start < 5
    finally:
        loop.close()
    with pytest.raises(SnapshotUnavailableError, match="unavailable"):
        LoopSnapshot(loop, dict)()


def test_serve_client_metrics_scrapes_through_the_loop() -> None:
    """The client's wiring: the snapshot is taken on the loop while the HTTP thread waits."""

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def snapshot() -> dict[str, Any]:
            threads.append(threading.get_ident())
            return CLIENT_SNAPSHOT

        server = serve_client_metrics(("127.0.0.1", 0), snapshot)
        try:
            samples, _ = await asyncio.to_thread(scrape, server.url)
        finally:
            await asyncio.to_thread(server.close)
        assert value(samples, "p2pvpn_peers", state="CONNECTED") == 2
        assert threads == [loop_thread]

    asyncio.run(scenario())


# -- a real server --------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def in_thread(function: Callable[[str], tuple[Samples, str]], url: str) -> Samples:
    samples, _ = await asyncio.to_thread(function, url)
    return samples


def check_server_samples(samples: Samples, stats: dict[str, Any], relayed_bytes: int) -> None:
    """Two logged-in clients exchanged one FORWARD each way; one FORWARD went nowhere."""
    assert stats["frames_relayed"] == 2
    assert value(samples, "p2pvpn_server_frames_relayed_total") == 2
    assert value(samples, "p2pvpn_server_bytes_relayed_total") == relayed_bytes
    assert value(samples, "p2pvpn_server_bytes_relayed_total") == stats["bytes_relayed"]
    assert value(samples, "p2pvpn_server_frames_received_total") == 5
    assert value(samples, "p2pvpn_server_authenticated_sessions") == 2
    assert value(samples, "p2pvpn_server_connections") == 2
    assert value(samples, "p2pvpn_server_connections_accepted_total") == 2
    assert value(samples, "p2pvpn_server_logins_total") == stats["logins"]
    for reason, count in stats["drops"].items():
        assert value(samples, "p2pvpn_server_drops_total", reason=reason) == count
    assert sum(stats["drops"].values()) == 1
    assert value(samples, "p2pvpn_server_stun_requests_total") == 1
    assert value(samples, "p2pvpn_server_stun_responses_total") == 1


def test_server_runtime_serves_metrics_that_match_its_counters() -> None:
    async def scenario() -> None:
        stun_port = free_udp_port()
        config = ServerConfig(
            websocket="ws://127.0.0.1:0/",
            password=PASSWORD,
            stun_port=stun_port,
            metrics=("127.0.0.1", 0),
        )
        runtime = ServerRuntime(config, stun_host="127.0.0.1")
        await runtime.start()
        try:
            assert runtime.metrics is not None
            url = runtime.metrics.url
            before = await in_thread(scrape, url)
            assert value(before, "p2pvpn_server_frames_relayed_total") == 0
            assert value(before, "p2pvpn_server_authenticated_sessions") == 0

            now = int(time.time())
            base = f"ws://127.0.0.1:{runtime.ws_port}/"
            async with connect(base) as a, connect(base) as b:
                await a.send(auth_frame("10.9.0.1", now))
                await b.send(auth_frame("10.9.0.2", now))
                await wait_until(lambda: runtime.stats()["sessions_authenticated"] == 2)
                to_b = forward("10.9.0.1", "10.9.0.2", b"ping")
                to_a = forward("10.9.0.2", "10.9.0.1", b"pong" * 100)
                await a.send(to_b)
                assert await asyncio.wait_for(b.recv(), 5) == to_b
                await b.send(to_a)
                assert await asyncio.wait_for(a.recv(), 5) == to_a
                await a.send(forward("10.9.0.1", "10.9.0.99", b"nobody"))  # dropped

                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.setblocking(False)
                    udp.sendto(encode_binding_request(os.urandom(12)), ("127.0.0.1", stun_port))
                    assert runtime.stun is not None
                    stun = runtime.stun
                    await wait_until(lambda: stun.requests == 1)

                await wait_until(lambda: runtime.stats()["frames_received"] == 5)
                samples = await in_thread(scrape, url)
                stats = runtime.stats()

            check_server_samples(samples, stats, relayed_bytes=len(to_a) + len(to_b))
        finally:
            await runtime.close()
        assert runtime.metrics is None
        with pytest.raises(urllib.error.URLError):
            await in_thread(scrape, url)

    asyncio.run(scenario())


def test_server_runtime_refuses_a_busy_metrics_port() -> None:
    async def scenario() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            config = ServerConfig(
                websocket="ws://127.0.0.1:0/", stun_port=0, metrics=("127.0.0.1", port)
            )
            runtime = ServerRuntime(config)
            with pytest.raises(ListenError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await runtime.start()
            # The WebSocket listener it had opened is closed again.
            assert runtime.ws._server is not None
            assert not runtime.ws._server.is_serving()

    asyncio.run(scenario())
