"""Prometheus metrics for the client and the server (``metrics = host:port``).

Nothing is counted twice: the collectors read the counters the client and
the server keep anyway (``ClientNode.snapshot()``, ``ServerRuntime.stats()``)
at scrape time. prometheus_client serves ``/metrics`` from a daemon thread;
the counters live on the event loop, so the stats function is wrapped in a
:class:`LoopSnapshot`, which runs it *on* the loop and waits for the answer
(with a timeout): a scrape never reads loop state from another thread.

Client side, from a coroutine on the node's loop::

    server = serve_client_metrics(config.metrics, node.snapshot)   # OSError if it cannot bind
    ...
    server.close()

Server side, :class:`ServerRuntime` does the same with :class:`ServerCollector`.
"""

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "PEER_STATES",
    "ClientCollector",
    "LoopSnapshot",
    "MetricsServer",
    "ServerCollector",
    "SnapshotUnavailableError",
    "serve_client_metrics",
    "serve_server_metrics",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# client/peer.py PeerState, in order; every state is exported, 0 when no peer is in it.
PEER_STATES = (
    "INIT",
    "PREPARING",
    "SYNCHRONIZING",
    "CONNECTING",
    "CONNECTED",
    "WAITING",
    "FAILED",
)
DEFAULT_SNAPSHOT_TIMEOUT = 5.0
_PATHS = ("relay", "direct")
_DIRECTIONS = ("in", "out")


class SnapshotUnavailableError(RuntimeError):
    """The event loop did not run the stats function (closed, stopped or too busy)."""


class LoopSnapshot(Generic[T]):
    """Calls ``fn`` on ``loop``'s thread and returns its result, from any thread.

    Called on the loop's own thread it simply calls ``fn``. From another
    thread it schedules ``fn`` with ``call_soon_threadsafe`` and waits at most
    ``timeout`` seconds; raises :class:`SnapshotUnavailableError` if the loop is
    closed or does not answer in time, and re-raises what ``fn`` raised.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[], T],
        *,
        timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._fn = fn
        self._timeout = timeout

    def __call__(self) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return self._fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the scrape gave up already
            try:
                future.set_result(self._fn())
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError as exc:  # the loop is closed
            raise SnapshotUnavailableError(f"event loop unavailable: {exc}") from None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SnapshotUnavailableError(
                f"event loop did not answer within {self._timeout:g} s"
            ) from None


# -- collectors -------------------------------------------------------------------


def _number(value: object) -> float:
    """A counter value from a snapshot: numbers as they are, anything else 0."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return 0.0


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _labelled_counter(
    name: str, documentation: str, label: str, values: object
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(_mapping(values).items()):
        family.add_metric([str(key)], _number(value))
    return family


def _read(stats_fn: Callable[[], Mapping[str, Any]], what: str) -> Mapping[str, Any]:
    try:
        return stats_fn()
    except Exception as exc:
        # Surfaces as an HTTP 500, which Prometheus records as a failed scrape (up = 0).
        logger.warning("metrics: cannot read the %s counters: %s", what, exc)
        raise


# The relay server's scalar counters in exposition order: (kind, name,
# documentation, key in the stats). "by_reason" is a mapping of reason -> count.
_SERVER_METRICS: tuple[tuple[Literal["gauge", "counter", "by_reason"], str, str, str], ...] = (
    ("gauge", "p2pvpn_server_connections", "Open WebSocket connections.", "connections_open"),
    (
        "counter",
        "p2pvpn_server_connections_accepted_total",
        "WebSocket connections accepted.",
        "connections_total",
    ),
    (
        "gauge",
        "p2pvpn_server_authenticated_sessions",
        "Logged-in clients (sessions mapped to a tun address).",
        "sessions_authenticated",
    ),
    ("counter", "p2pvpn_server_logins_total", "Accepted AUTH logins.", "logins"),
    (
        "counter",
        "p2pvpn_server_frames_received_total",
        "WebSocket frames received from clients.",
        "frames_received",
    ),
    (
        "counter",
        "p2pvpn_server_bytes_received_total",
        "Bytes of WebSocket frames received from clients.",
        "bytes_received",
    ),
    (
        "counter",
        "p2pvpn_server_frames_relayed_total",
        "Frames relayed to clients (a broadcast counts once per receiver).",
        "frames_relayed",
    ),
    (
        "counter",
        "p2pvpn_server_bytes_relayed_total",
        "Bytes of frames relayed to clients.",
        "bytes_relayed",
    ),
    (
        "by_reason",
        "p2pvpn_server_drops_total",
        "Frames dropped without closing their sender, by reason.",
        "drops",
    ),
    (
        "by_reason",
        "p2pvpn_server_rejections_total",
        "Connections closed for a protocol or security violation, by reason.",
        "rejections",
    ),
    (
        "by_reason",
        "p2pvpn_server_limits_total",
        "Times a resource cap refused or dropped something, by cap.",
        "limits",
    ),
    ("gauge", "p2pvpn_server_dhcp_leases", "Addresses leased from the pool.", "dhcp_leases"),
    (
        "gauge",
        "p2pvpn_server_named_sessions",
        "Logged-in clients with a name (from their ping payload).",
        "named_sessions",
    ),
    (
        "gauge",
        "p2pvpn_server_replay_cache_entries",
        "Login hashes remembered against replays.",
        "replay_cache_entries",
    ),
    (
        "counter",
        "p2pvpn_server_internal_errors_total",
        "Frames that hit a bug in the server (the sender was closed).",
        "internal_errors",
    ),
)
# The STUN responder's counters, present only when it runs: (name, documentation, key).
_SERVER_STUN_COUNTERS = (
    ("p2pvpn_server_stun_requests_total", "STUN binding requests received.", "requests"),
    ("p2pvpn_server_stun_responses_total", "STUN binding responses sent.", "responses"),
    (
        "p2pvpn_server_stun_ignored_total",
        "Datagrams on the STUN port that were not binding requests (or not IPv4).",
        "ignored",
    ),
    (
        "p2pvpn_server_stun_rate_limited_total",
        "STUN binding requests not answered: over the per-address rate.",
        "rate_limited",
    ),
)

# The relay cluster's link to NATS, present only with `cluster`: (kind, name, documentation, key).
_SERVER_CLUSTER_METRICS: tuple[tuple[Literal["gauge", "counter"], str, str, str], ...] = (
    (
        "gauge",
        "p2pvpn_server_cluster_connected",
        "1 while this server is joined to the relay cluster on NATS, else 0.",
        "connected",
    ),
    (
        "counter",
        "p2pvpn_server_cluster_outages_total",
        "Times the connection to NATS was lost after joining.",
        "outages",
    ),
    (
        "counter",
        "p2pvpn_server_cluster_frames_published_total",
        "Frames published to NATS for clients on other servers (a broadcast counts once).",
        "published",
    ),
    (
        "counter",
        "p2pvpn_server_cluster_publish_dropped_total",
        "Frames for other servers dropped: NATS not reachable or refusing them.",
        "publish_dropped",
    ),
    (
        "counter",
        "p2pvpn_server_cluster_frames_received_total",
        "Frames received from other servers through NATS.",
        "received",
    ),
    (
        "gauge",
        "p2pvpn_server_cluster_servers",
        "Servers of the cluster this server knows of, itself included.",
        "servers",
    ),
)


class ServerCollector(Collector):
    """The relay server's counters (``ServerRuntime.stats()`` / ``Relay.stats()``)."""

    def __init__(self, stats_fn: Callable[[], Mapping[str, Any]]) -> None:
        self._stats_fn = stats_fn

    def collect(self) -> Iterable[Metric]:
        stats = _read(self._stats_fn, "server")
        return list(self._families(stats))

    def _families(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        for kind, name, documentation, key in _SERVER_METRICS:
            if kind == "by_reason":
                yield _labelled_counter(name, documentation, "reason", stats.get(key))
            elif kind == "gauge":
                yield GaugeMetricFamily(name, documentation, value=_number(stats.get(key)))
            else:
                yield CounterMetricFamily(name, documentation, value=_number(stats.get(key)))
        stun = stats.get("stun")
        if isinstance(stun, Mapping):
            for name, documentation, key in _SERVER_STUN_COUNTERS:
                yield CounterMetricFamily(name, documentation, value=_number(stun.get(key)))
        cluster = stats.get("cluster")
        if isinstance(cluster, Mapping):
            for kind, name, documentation, key in _SERVER_CLUSTER_METRICS:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(name, documentation, value=_number(cluster.get(key)))


class ClientCollector(Collector):
    """A client's counters, from the status snapshot (``ClientNode.snapshot()``)."""

    def __init__(self, snapshot_fn: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot_fn = snapshot_fn

    def collect(self) -> Iterable[Metric]:
        snapshot = _read(self._snapshot_fn, "client")
        return list(self._families(snapshot))

    def _families(self, snapshot: Mapping[str, Any]) -> Iterator[Metric]:
        yield from _client_identity(snapshot)
        peers = [row for row in snapshot.get("peers") or () if isinstance(row, Mapping)]
        yield _peer_states(peers)
        yield _peer_rtts(peers)
        relay = _mapping(snapshot.get("relay"))
        yield from _traffic({"relay": relay, "direct": _mapping(snapshot.get("direct"))})
        yield _drops(_mapping(snapshot.get("drops")), _number(relay.get("dropped")))
        yield from _client_links(snapshot)
        yield from _exit_use(_mapping(snapshot.get("exit")))
        yield from _client_names(snapshot)
        yield _exit_node_offering(_mapping(snapshot.get("exit_node")))


def _client_names(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    """Issue 16: the names this client resolves and the DNS queries it answered."""
    yield GaugeMetricFamily(
        "p2pvpn_names",
        "Names this client resolves (members of the VPN, itself included).",
        value=float(len(snapshot.get("names") or ())),
    )
    dns = _mapping(snapshot.get("dns"))
    family = CounterMetricFamily(
        "p2pvpn_dns_queries", "DNS queries on the VPN address, by result.", labels=["result"]
    )
    for result in ("answered", "nxdomain", "refused", "malformed"):
        family.add_metric([result], _number(dns.get(result)))
    yield family


def _client_identity(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    info = InfoMetricFamily("p2pvpn_client", "This client.")
    info.add_metric(
        [],
        {
            "version": str(snapshot.get("version") or ""),
            "name": str(snapshot.get("name") or ""),
            "interface": str(snapshot.get("interface") or ""),
            "address": str(snapshot.get("address") or ""),
            "dataplane": str(snapshot.get("dataplane") or ""),
            "udp_offloads": _offloads(snapshot.get("udp_offloads")),
            "tun_offloads": _offloads(snapshot.get("tun_offloads")),
        },
    )
    yield info
    if isinstance(snapshot.get("started"), int | float):
        yield GaugeMetricFamily(
            "p2pvpn_start_time_seconds",
            "When the client started, in seconds since the Unix epoch.",
            value=_number(snapshot["started"]),
        )


def _offloads(names: object) -> str:
    """``gso+gro``, as `p2pvpn status` shows them; empty when none (or not a list)."""
    return "+".join(str(name) for name in names) if isinstance(names, list) else ""


def _peer_states(peers: list[Mapping[str, Any]]) -> GaugeMetricFamily:
    states = dict.fromkeys(PEER_STATES, 0)
    for row in peers:
        state = str(row.get("state") or "INIT")
        states[state] = states.get(state, 0) + 1
    family = GaugeMetricFamily("p2pvpn_peers", "Known peers, by state.", labels=["state"])
    for state, count in states.items():
        family.add_metric([state], count)
    return family


def _peer_rtts(peers: list[Mapping[str, Any]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "p2pvpn_peer_rtt_seconds",
        "Round-trip time to a directly connected peer.",
        labels=["peer"],
    )
    for row in peers:
        if isinstance(row.get("rtt_ms"), int | float):
            family.add_metric([str(row.get("tun_ip"))], _number(row["rtt_ms"]) / 1000)
    return family


def _traffic(traffic: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for unit, documentation in (
        ("bytes", "Bytes of tunnelled packets, by path (relay server or direct UDP)."),
        ("packets", "Tunnelled packets, by path (relay server or direct UDP)."),
    ):
        family = CounterMetricFamily(f"p2pvpn_{unit}", documentation, labels=["path", "direction"])
        for path in _PATHS:
            for direction in _DIRECTIONS:
                family.add_metric(
                    [path, direction], _number(traffic[path].get(f"{unit}_{direction}"))
                )
        yield family


def _drops(reported: Mapping[str, Any], relay_dropped: float) -> CounterMetricFamily:
    drops: dict[str, float] = {str(reason): _number(count) for reason, count in reported.items()}
    drops["relay_not_sent"] = drops.get("relay_not_sent", 0.0) + relay_dropped
    family = CounterMetricFamily(
        "p2pvpn_drops", "Packets and datagrams dropped, by reason.", labels=["reason"]
    )
    for reason, dropped in sorted(drops.items()):
        family.add_metric([reason], dropped)
    return family


def _client_links(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    """The client's link to the server, its STUN record and its client-relay routes."""
    server = _mapping(snapshot.get("server"))
    yield GaugeMetricFamily(
        "p2pvpn_server_connected",
        "1 while logged in to the signaling/relay server, else 0.",
        value=1.0 if server.get("state") == "connected" else 0.0,
    )
    yield CounterMetricFamily(
        "p2pvpn_reconnects",
        "Reconnections to the signaling/relay server.",
        value=_number(server.get("reconnects")),
    )
    yield CounterMetricFamily(
        "p2pvpn_server_switches",
        "Moves to another of the configured server URLs (failover).",
        value=_number(server.get("switches")),
    )
    yield CounterMetricFamily(
        "p2pvpn_stun_failures",
        "STUN requests that got no usable answer.",
        value=_number(snapshot.get("stun_failures")),
    )
    yield GaugeMetricFamily(
        "p2pvpn_routes",
        "Client-relay routes in use.",
        value=float(len(snapshot.get("routes") or ())),
    )


def _exit_use(exit_use: Mapping[str, Any]) -> Iterator[Metric]:
    """Whether all traffic goes through an exit node now (`exit` key), and fallbacks."""
    yield GaugeMetricFamily(
        "p2pvpn_exit_active",
        "1 while all traffic goes through the exit node (`exit`), else 0.",
        value=1.0 if exit_use.get("state") == "active" else 0.0,
    )
    yield CounterMetricFamily(
        "p2pvpn_exit_fallbacks",
        "Times the exit node went away and the machine's default route took over again.",
        value=_number(exit_use.get("fallbacks")),
    )


def _exit_node_offering(exit_node: Mapping[str, Any]) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "p2pvpn_exit_node_offering",
        "1 while this client offers itself as an exit node (forwarding and masquerade), else 0.",
        value=1.0 if exit_node.get("offering") is True else 0.0,
    )


# -- HTTP endpoint -----------------------------------------------------------------


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` (or calling it) stops it."""

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port: int = self._httpd.server_port
        self._closed = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; idempotent. Blocks up to about 0.5 s."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __call__(self) -> None:
        self.close()


def start_metrics_server(host: str, port: int, collector: Collector) -> MetricsServer:
    """Serve ``collector`` (alone, in its own registry) on ``http://host:port/metrics``.

    Port 0 binds any free port (see ``.port``). Raises OSError (errno kept, the
    message names the address) if it cannot bind. Returns the closer:
    ``server.close()`` (or ``server()``) stops it.
    """
    try:
        server = MetricsServer(host, port, collector)
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot serve metrics on {address}: {reason}") from exc
    logger.info("metrics on %s", server.url)
    return server


def serve_client_metrics(
    endpoint: tuple[str, int], snapshot_fn: Callable[[], Mapping[str, Any]]
) -> MetricsServer:
    """The client's endpoint; call from the event loop that owns ``snapshot_fn``'s data."""
    loop = asyncio.get_running_loop()
    host, port = endpoint
    return start_metrics_server(host, port, ClientCollector(LoopSnapshot(loop, snapshot_fn)))


def serve_server_metrics(
    endpoint: tuple[str, int], stats_fn: Callable[[], Mapping[str, Any]]
) -> MetricsServer:
    """The server's endpoint; call from the event loop that owns ``stats_fn``'s data."""
    loop = asyncio.get_running_loop()
    host, port = endpoint
    return start_metrics_server(host, port, ServerCollector(LoopSnapshot(loop, stats_fn)))
