"""The ``p2pvpn server`` process: listening sockets, metrics, signals and shutdown.

:class:`ServerRuntime` binds the WebSocket relay (ws:// or, with a
certificate, wss://), the optional STUN responder and the optional
Prometheus endpoint; :func:`run_server` runs it until SIGINT or SIGTERM and
reloads the TLS certificate on SIGHUP.
"""

import asyncio
import logging
import os
import resource
import secrets
import signal
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from p2pvpn.config import ServerConfig, display_url
from p2pvpn.logs import install_secret_filter
from p2pvpn.metrics import MetricsServer, serve_server_metrics
from p2pvpn.server.cluster import ClusterError, ClusterLink, require_nats
from p2pvpn.server.cluster_state import ClusterView
from p2pvpn.server.limits import ServerLimits
from p2pvpn.server.relay import Relay
from p2pvpn.server.stun import StunResponder, start_stun_responder
from p2pvpn.server.tls import ServerTls, TlsError
from p2pvpn.server.ws import RelayServer

__all__ = [
    "ListenError",
    "ServerRuntime",
    "listen_address",
    "raise_file_limit",
    "run_server",
    "serve",
    "server_limits",
]

logger = logging.getLogger(__name__)


class ListenError(Exception):
    """A listening socket could not be bound; the message names the address."""


# What keeps `p2pvpn server` from starting (exit 1); each message names what to fix.
_START_ERRORS = (ListenError, TlsError, ClusterError)
_DEFAULT_PORTS = {"ws": 80, "wss": 443}


def _os_error_text(exc: OSError) -> str:
    # asyncio wraps bind errors in a long message that repeats the address.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def listen_address(url: str) -> tuple[str, int]:
    """Host and port to listen on from ``ws[s]://host:port/path`` (the path is ignored).

    The port defaults to 80 for ws:// and 443 for wss://.
    """
    parts = urlsplit(url)
    url = display_url(url)  # only for the messages: userinfo and query may hold secrets
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"cannot listen on {url}: expected a ws:// or wss://host:port URL")
    if not parts.hostname:
        raise ValueError(f"cannot listen on {url}: no host")
    port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
    return parts.hostname, port


def _server_tls(config: ServerConfig) -> ServerTls | None:
    """The certificate for a wss:// URL (None for ws://); raises TlsError."""
    if urlsplit(config.websocket).scheme != "wss":
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise TlsError(f"{config.websocket}: wss:// needs tls_cert and tls_key")
    return ServerTls(config.tls_cert, config.tls_key)


def server_limits(config: ServerConfig) -> ServerLimits:
    """The caps of ``config`` for the relay, the WebSocket server and STUN."""
    return ServerLimits(
        send_queue_bytes=config.send_queue_bytes,
        max_unauthenticated=config.max_unauthenticated,
        max_unauthenticated_per_ip=config.max_unauthenticated_per_ip,
        login_timeout=config.login_timeout,
        max_replay_entries=config.max_replay_entries,
        broadcast_rate=config.broadcast_rate,
        max_broadcast_size=config.max_broadcast_size,
        max_leases_per_ip=config.max_leases_per_ip,
        stun_rate=config.stun_rate,
        junk_rate=config.junk_rate,
    )


# Descriptors besides the client connections: listening sockets, STUN, metrics, logs.
_SPARE_FILES = 64
# Logged-in clients the descriptor budget allows for besides the pending ones,
# when no dhcp pool says how many there can be.
_SESSIONS_WITHOUT_POOL = 4096


def raise_file_limit(config: ServerConfig) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; warn if it is below the need.

    Every connection is a descriptor: the pending logins (max_unauthenticated)
    plus every logged-in client. Returns the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # the kernel's default nr_open: higher fails
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError) as exc:
        logger.debug("cannot raise the open files limit to %d: %s", hard, exc)
    sessions = config.dhcp.num_addresses if config.dhcp is not None else _SESSIONS_WITHOUT_POOL
    needed = config.max_unauthenticated + sessions + _SPARE_FILES
    if soft < needed:
        logger.warning(
            "open files limit %d is below the %d the connection caps need "
            "(max_unauthenticated + clients); raise LimitNOFILE / ulimit -n",
            soft,
            needed,
        )
    return soft


class ServerRuntime:
    """The whole server process: WebSocket relay, optional STUN responder and metrics."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        stun_host: str = "0.0.0.0",
    ) -> None:
        """Raises TlsError when the certificate of a wss:// URL cannot be used."""
        self.config = config
        self.host, port = listen_address(config.websocket)
        self.tls = _server_tls(config)
        self.scheme = "ws" if self.tls is None else "wss"
        limits = server_limits(config)
        view = None
        if config.cluster:
            require_nats(config)  # ClusterError naming the extra to install
            view = ClusterView(secrets.token_hex(4), config.cluster_ttl)
        self.relay = Relay(
            config.password, dhcp=config.dhcp, sdwan=config.sdwan, limits=limits, cluster=view
        )
        self.cluster = _cluster_link(config, self.relay)
        self.ws = RelayServer(
            self.relay,
            self.host,
            port,
            limits=limits,
            ssl_context=None if self.tls is None else self.tls.listener,
            cluster=self.cluster,
        )
        if self.cluster is not None:
            self.cluster.bind(self.ws.perform)
        self._stun_host = stun_host
        self._stun: tuple[asyncio.DatagramTransport, StunResponder] | None = None
        self._metrics: MetricsServer | None = None

    @property
    def ws_port(self) -> int:
        return self.ws.port

    @property
    def metrics(self) -> MetricsServer | None:
        """The Prometheus endpoint (``config.metrics``) once started, else None."""
        return self._metrics

    @property
    def stun(self) -> StunResponder | None:
        return self._stun[1] if self._stun is not None else None

    async def start(self) -> None:
        """Bind every socket; raises ListenError naming the address that failed."""
        try:
            await self.ws.start()
        except OSError as exc:
            address = f"{self.scheme}://{self.host}:{self.ws.requested_port}"
            raise ListenError(f"cannot listen on {address}: {_os_error_text(exc)}") from exc
        if self.cluster is not None:
            # The servers table shows the port actually bound (port 0 in tests).
            self.cluster.websocket = _public_url(self.config.websocket, self.ws_port)
            try:
                await self.cluster.start()
            except ClusterError:
                await self.ws.close()
                raise
        if self.config.stun_port:
            try:
                self._stun = await start_stun_responder(
                    self._stun_host, self.config.stun_port, rate=self.config.stun_rate
                )
            except OSError as exc:
                await self.ws.close()
                if self.cluster is not None:
                    await self.cluster.close()
                address = f"udp {self._stun_host}:{self.config.stun_port}"
                raise ListenError(
                    f"cannot start the STUN responder on {address}: {_os_error_text(exc)}"
                ) from exc
        if self.config.metrics is not None:
            try:
                # Scrapes run in prometheus_client's thread; stats() is read on this loop.
                self._metrics = serve_server_metrics(self.config.metrics, self.stats)
            except OSError as exc:
                await self.close()
                host, port = self.config.metrics
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise ListenError(
                    f"cannot serve metrics on {address}: {_os_error_text(exc)}"
                ) from exc

    def reload_tls(self) -> None:
        """SIGHUP: new connections get the certificate now in the files; sessions stay."""
        if self.tls is None:
            logger.info("SIGHUP: nothing to reload (the server speaks ws://, no certificate)")
            return
        self.tls.reload()

    async def close(self) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await asyncio.to_thread(metrics.close)  # waits for the HTTP thread
        if self._stun is not None:
            self._stun[0].close()
        await self.ws.close()
        if self.cluster is not None:
            # After the sessions: the link deletes every record they left on NATS.
            await self.cluster.close()

    def stats(self) -> dict[str, Any]:
        stats = self.relay.stats()
        stun = self.stun
        if stun is not None:
            stats["stun"] = stun.stats()
        if self.cluster is not None:
            stats["cluster"] = self.cluster.stats()
        return stats


def _cluster_link(config: ServerConfig, relay: Relay) -> ClusterLink | None:
    """The link to NATS when ``config.cluster`` names it (the relay carries its view)."""
    if not config.cluster:
        return None
    return ClusterLink(
        config,
        relay,
        server_name=socket.gethostname(),
        websocket=display_url(config.websocket),
    )


def _public_url(url: str, port: int) -> str:
    """``url`` as clients may use it: the bound port, no credentials."""
    parts = urlsplit(display_url(url))
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return parts._replace(netloc=f"{host}:{port}").geturl()


async def serve(
    config: ServerConfig,
    *,
    stop: asyncio.Event,
    ready: Callable[[ServerRuntime], object] | None = None,
) -> None:
    """Run the server until ``stop`` is set.

    ``ready`` is called with the running :class:`ServerRuntime` once both
    sockets are bound, so an in-process caller can read the bound port
    (``runtime.ws_port``) and the counters. Raises ListenError or TlsError.
    """
    runtime = ServerRuntime(config)
    await runtime.start()
    logger.info("listening on %s://%s:%d", runtime.scheme, runtime.host, runtime.ws_port)
    if runtime.tls is not None:
        logger.info(
            "TLS certificate %s: %s", runtime.tls.cert_file, runtime.tls.certificate.describe()
        )
    if config.stun_port:
        logger.info("STUN responder on udp port %d", config.stun_port)
    else:
        logger.info("STUN responder disabled (stun_port = 0)")
    try:
        if ready is not None:
            ready(runtime)
        await stop.wait()
    finally:
        logger.info("shutting down")
        await runtime.close()


def run_server(config: ServerConfig) -> int:
    """Entry point of ``p2pvpn server``: 0 after SIGINT/SIGTERM, 1 if it cannot start."""
    try:
        listen_address(config.websocket)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    if not config.debug:
        # websockets logs every connection at INFO, duplicating our own lines.
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
    else:
        logger.debug(
            "dhcp=%s, %d sdwan rule(s), stun_port=%d",
            config.dhcp,
            len(config.sdwan),
            config.stun_port,
        )
    install_secret_filter(config.password)
    raise_file_limit(config)
    return asyncio.run(_main(config))


async def _main(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running: list[ServerRuntime] = []

    def reload() -> None:
        # Before the runtime is up there is nothing to reload, but SIGHUP must not kill.
        for runtime in running:
            runtime.reload_tls()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await serve(config, stop=stop, ready=running.append)
    except _START_ERRORS as exc:
        logger.error("%s", exc)
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0
