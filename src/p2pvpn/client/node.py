"""The client process: wires TUN, signaling, the data plane and the peers together.

One asyncio loop runs the whole control plane (ARCHITECTURE.md). The node is
the SignalingHandler (what the server sends) and the DataPlaneEvents sink
(what the data plane cannot handle alone), and owns every resource it
creates so that a stop, a signal or a fatal error leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any

from p2pvpn import __version__
from p2pvpn.client.control import client_control_server, control_socket_path
from p2pvpn.client.exit_node import ExitNodeError, ExitNodeOffer
from p2pvpn.client.exit_routing import (
    EXIT_MARK,
    SO_MARK,
    ExitChooser,
    ExitRouting,
)
from p2pvpn.client.exit_routing import remove_stale as remove_stale_exit_routing
from p2pvpn.client.names import NameTable
from p2pvpn.client.naming import NameService, effective_hostname, ping_payload
from p2pvpn.client.peer_manager import PeerManager
from p2pvpn.client.signaling import SignalingError, SignalingSession
from p2pvpn.client.store import StateStore
from p2pvpn.client.sysroutes import SystemRouteManager, UnderlayProbe
from p2pvpn.client.tun import TunDevice, TunError
from p2pvpn.config import ClientConfig
from p2pvpn.dataplane import DataPlaneUnavailableError, create_data_plane, resolve_data_plane
from p2pvpn.dataplane.base import DataPlane, DataPlaneStats, UdpAddress
from p2pvpn.wire.crypto import peer_key
from p2pvpn.wire.ws import (
    Discovery,
    Forward,
    LanAddress,
    NameAnnouncement,
    Names,
    SystemRoutes,
    Udp4Conn,
    WsMessage,
)

if TYPE_CHECKING:
    from p2pvpn.bench.peer_server import FollowingBenchServer
    from p2pvpn.metrics import MetricsServer

logger = logging.getLogger(__name__)

# Large socket buffers absorb bursts while the event loop is busy; the
# kernel caps them at net.core.[rw]mem_max unless we are root (the FORCE
# variants), which a VPN client is.
UDP_BUFFER_BYTES = 4 * 1024 * 1024
# Linux's values; Python's socket module does not export these two.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
TICK_SECONDS = 1.0
BENCH_PORT = 5301  # p2pvpn.bench.traffic.DEFAULT_PORT, without importing it unasked


class ClientNode:
    """One running `p2pvpn run`: the SignalingHandler and DataPlaneEvents sink.

    The I/O edge of the sans-clock peer manager: every event from the
    server, the data plane or the ticker reads the clock once, here, and
    hands that ``now`` down.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.started = time.time()
        self.store = StateStore(config.state_dir)
        self.tun: TunDevice | None = None
        self.address: IPv4Interface | None = None
        self.data_plane: DataPlane | None = None
        self.peers: PeerManager | None = None
        self.routes = SystemRouteManager(
            config.accept_routes,
            UnderlayProbe(config, lambda: self.signaling.server_ip, self._peer_endpoints).gather,
        )
        self._peer_endpoints_seen: frozenset[IPv4Address] = frozenset()
        # With an exit node the underlay sockets carry the mark that keeps them out of it.
        underlay_mark = EXIT_MARK if config.exit else None
        self.udp = _open_udp_socket(config.port, underlay_mark)
        self.signaling = SignalingSession(
            config.websockets,
            config.password,
            config.tun,
            self.store,
            self,
            tls_verify=config.tls_verify,
            tls_ca=config.tls_ca,
            socket_mark=underlay_mark,
            ping_payload=ping_payload(effective_hostname(config)),
            exit_node=config.exit_node,
        )
        self._init_exit(config)
        self.naming = NameService(config, self.signaling)
        self.control = client_control_server(control_socket_path(config.state_dir), self.snapshot)
        self.metrics: MetricsServer | None = None  # set when metrics are served
        self.bench_server: FollowingBenchServer | None = None  # bench_server = true
        self.exit_node = (
            ExitNodeOffer(config.interface_name, config.state_dir) if config.exit_node else None
        )
        self._stopping = asyncio.Event()
        # What the node does with each message from the server; a type not
        # here is ignored (the login messages, GENERAL subtypes we do not use,
        # types from the future).
        self._message_handlers: dict[type, Callable[[Any], None]] = {
            Forward: self._on_forward,
            SystemRoutes: self._on_system_routes,
            Udp4Conn: self._on_udp4conn,
            LanAddress: self._on_lan_address,
            Discovery: self._on_discovery,
            Names: self._on_names,
            NameAnnouncement: self._on_name_announcement,
        }

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal or a fatal error; always clean up. Returns the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            # The control socket is the instance lock: take it before touching
            # the interface, so a second client with our name changes nothing.
            await self.control.start()
            await self._prepare_exit_node()
            TunDevice.remove_stale(self.config.interface_name)
            await self._remove_stale_exit_routing()
            self.tun = open_tun(self.config)
            if self.config.metrics is not None:
                # Imported only when asked for: prometheus_client costs RSS.
                from p2pvpn.metrics import serve_client_metrics

                self.metrics = serve_client_metrics(self.config.metrics, self.snapshot)
            return await self._serve()
        except (
            TunError,
            SignalingError,
            OSError,
            DataPlaneUnavailableError,
            ExitNodeError,
        ) as error:
            logger.error("%s", error)
            return 1
        finally:
            await self._cleanup()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def _serve(self) -> int:
        signaling = asyncio.create_task(self.signaling.run(), name="signaling")
        ticker = asyncio.create_task(self._tick_forever(), name="ticker")
        stopping = asyncio.create_task(self._stopping.wait(), name="stop")
        try:
            await asyncio.wait({signaling, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticker.cancel()
            stopping.cancel()
        if signaling.done():
            signaling.result()  # re-raises SignalingError: the caller reports it
            return 0
        await self.naming.leave()
        await self.signaling.close()
        with contextlib.suppress(asyncio.CancelledError, SignalingError):
            await signaling
        return 0

    def _on_signal(self, signum: int) -> None:
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        self._stopping.set()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if self.peers is not None:
                self.peers.tick(time.monotonic())
            self.naming.tick(time.monotonic())
            endpoints = frozenset(self._peer_endpoints())
            if endpoints != self._peer_endpoints_seen:
                self._peer_endpoints_seen = endpoints
                self.routes.recheck()
            self.check_exit_soon()

    def _peer_endpoints(self) -> set[IPv4Address]:
        return self.peers.endpoint_addresses() if self.peers is not None else set()

    async def _cleanup(self) -> None:
        await self._close_exit_routing()
        await self.naming.close()
        await self._withdraw_exit_node()
        await self.routes.close()
        if self.peers is not None:
            self.peers.close()
        if self.data_plane is not None:
            self.data_plane.close()
        if self.tun is not None:
            # Removing the sdwan routes is one netlink call each: keep the loop free.
            await asyncio.to_thread(self.tun.close)
        await self.control.close()
        if self.bench_server is not None:
            # Joining the server's threads blocks (briefly): keep the loop free.
            await asyncio.to_thread(self.bench_server.stop)
        if self.metrics is not None:
            # Stopping the HTTP thread can block briefly; keep the loop free.
            await asyncio.to_thread(self.metrics.close)
        self.udp.close()
        logger.info("stopped; %s removed", self.config.interface_name)

    # -- SignalingHandler ---------------------------------------------------

    async def on_login(self, address: IPv4Interface) -> None:
        self.routes.start_set()
        if address == self.address:
            await self._names_on_login(address)
            return
        assert self.tun is not None
        if self.address is not None:
            # The server moved us (dynamic range changed): start the packet path afresh.
            logger.warning("address changed from %s to %s", self.address, address)
            await self.routes.detach()
            self._stop_packet_path()
            self.tun.close()
            self.tun = open_tun(self.config)
        self.address = address
        self.tun.configure(address, self.config.mtu)
        self._start_packet_path(address)
        assert self.data_plane is not None
        await self.routes.attach(self.tun, self.data_plane, address, self.peers)
        await self._follow_bench_server(address)
        await self._names_on_login(address)
        await self._offer_exit_node(address)
        await self._start_exit_routing()

    async def _names_on_login(self, address: IPv4Interface) -> None:
        """Every login (also one that kept the address): our name out, DNS where we are."""
        await self.naming.on_login(address, time.monotonic())

    @property
    def names(self) -> NameTable | None:
        """Every member's name (None before the first login); exit routing reads it."""
        return self.naming.table

    def on_message(self, message: WsMessage) -> None:
        handler = self._message_handlers.get(type(message))
        if handler is None:
            logger.debug("ignoring %s from the server", type(message).__name__)
            return
        handler(message)

    def on_disconnected(self) -> None:
        if self.peers is not None:
            self.peers.on_server_lost()

    # -- DataPlaneEvents ----------------------------------------------------

    def on_relay_packets(self, packets: list[bytes]) -> None:
        self.signaling.send_forward_packets(packets)
        if self.peers is not None:
            self.peers.on_relay_out(packets)

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        if self.peers is not None:
            self.peers.on_control_datagrams(datagrams, time.monotonic())

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        if self.peers is not None:
            self.peers.on_stun_datagrams(datagrams, time.monotonic())

    # -- internals ----------------------------------------------------------

    def _start_packet_path(self, address: IPv4Interface) -> None:
        assert self.tun is not None
        key = peer_key(self.config.password, address.ip)
        self.data_plane = create_data_plane(
            self.config.dataplane,
            tun_fd=self.tun.fileno(),
            udp_socket=self.udp,
            tun_ip=address.ip,
            key=key,
            events=self,
            # Only a client that advertises routes (route > 0) forwards for others.
            relaying=self.config.route > 0,
            tun_offloads=self.tun.offloads,
        )
        self.peers = PeerManager(
            self.config,
            address,
            self.data_plane,
            self.signaling,
            local_port=self.udp.getsockname()[1],
        )
        self.data_plane.start()
        self.peers.start()
        logger.info(
            "packet path up on %s (%s data plane)",
            self.config.interface_name,
            self.data_plane.implementation,
        )

    def _stop_packet_path(self) -> None:
        if self.peers is not None:
            self.peers.close()
            self.peers = None
        if self.data_plane is not None:
            self.data_plane.close()
            self.data_plane = None

    async def _follow_bench_server(self, address: IPv4Interface) -> None:
        """``bench_server = true``: answer `p2pvpn bench peer` on the new address alone."""
        if not self.config.bench_server:
            return
        # Imported only when asked for, like the metrics: most clients never serve.
        from p2pvpn.bench.peer_server import FollowingBenchServer
        from p2pvpn.bench.report import BenchError

        if self.bench_server is None:
            self.bench_server = FollowingBenchServer(BENCH_PORT)
        try:
            # Binding and stopping the old server's threads block: off the loop.
            await asyncio.to_thread(self.bench_server.follow, str(address.ip))
        except (BenchError, OSError) as error:
            logger.warning("bench server not started: %s", error)
            return
        logger.info("answering p2pvpn bench peer on %s", self.bench_server.endpoint)

    # -- exit node (exit_node = true) ------------------------------------------------

    async def _prepare_exit_node(self) -> None:
        """Before the TUN opens: undo what a killed exit-node run left (whatever
        the config says now), and fail early when this one cannot offer."""
        try:
            await asyncio.to_thread(ExitNodeOffer.remove_stale, self.config.state_dir)
        except ExitNodeError as error:
            logger.warning("could not undo an earlier run's exit node: %s", error)
        if self.exit_node is not None:
            await asyncio.to_thread(self.exit_node.check_tools)

    async def _offer_exit_node(self, address: IPv4Interface) -> None:
        """After every login with a new address: forward and masquerade its network."""
        if self.exit_node is None or self.data_plane is None:
            return
        try:
            await self.exit_node.start(address.network, self.data_plane)
        except (ExitNodeError, OSError) as error:
            logger.error("not offering this machine as an exit node: %s", error)

    async def _withdraw_exit_node(self) -> None:
        if self.exit_node is None:
            return
        try:
            await self.exit_node.close()
        except (ExitNodeError, OSError) as error:
            logger.error("exit node not fully withdrawn (the next start retries): %s", error)

    # -- messages from the server ------------------------------------------------

    def _on_forward(self, message: Forward) -> None:
        if self.data_plane is None:
            return
        self.data_plane.write_tun(message.packet)
        if self.peers is not None:
            self.peers.on_relay_in(message.packet, time.monotonic())

    def _on_system_routes(self, message: SystemRoutes) -> None:
        self.routes.offer((route.network, route.nexthop) for route in message.routes)

    def _on_udp4conn(self, message: Udp4Conn) -> None:
        if self.peers is not None:
            self.peers.on_udp4conn(message, time.monotonic())

    def _on_lan_address(self, message: LanAddress) -> None:
        if self.peers is not None:
            self.peers.on_lan_address(message, time.monotonic())

    def _on_discovery(self, message: Discovery) -> None:
        if self.peers is not None:
            self.peers.on_discovery(message, time.monotonic())

    # -- exit node in use (`exit` key) -----------------------------------------

    def _init_exit(self, config: ClientConfig) -> None:
        self.exit_chooser = ExitChooser(config.exit)
        self.exit_routing: ExitRouting | None = None
        if config.exit:
            self.exit_routing = ExitRouting(
                config.interface_name,
                config.state_dir,
                config.exit_allow_lan,
                exit_routes=self.routes.set_exit_routes,
            )
        self._exit_generation: int | None = None  # of the name table at the last check
        self._exit_check: asyncio.Task[None] | None = None

    async def _remove_stale_exit_routing(self) -> None:
        """Whatever a SIGKILLed run left (rules, table route), with or without `exit` now."""
        try:
            await asyncio.to_thread(remove_stale_exit_routing, self.config.state_dir)
        except OSError as error:
            logger.warning("cannot remove the exit-node routing of an earlier run: %s", error)

    async def _start_exit_routing(self) -> None:
        """After a login on a (new) address: the rules, and the route if the exit is there."""
        if self.exit_routing is None:
            return
        try:
            await self.exit_routing.start()
        except OSError as error:
            logger.error("cannot set up routing through exit node %s: %s", self.config.exit, error)
            return
        # A new TUN device (and maybe network): the route and the entries are made anew.
        self.routes.set_exit_routes([])
        self.exit_chooser.forget()
        self.check_exit_soon()

    def check_exit_soon(self) -> None:
        """Judge the exit node's availability: on each tick, and at once when the name
        table changes (`_exit_on_table_change`), so a departure is seen at once."""
        if self.exit_routing is None or not self.exit_routing.started:
            return
        if self._exit_check is None or self._exit_check.done():
            self._exit_check = asyncio.create_task(self._check_exit(), name="exit-check")

    async def _check_exit(self) -> None:
        routing, names, address = self.exit_routing, self.names, self.address
        if routing is None or address is None:
            return
        available = None
        if names is not None:
            self._exit_generation = names.generation
            available = self.exit_chooser.available(names.exit_nodes(), names.lookup)
        change = self.exit_chooser.decide(available, time.time())
        if change is None:
            return
        try:
            if change.action == "activate" and change.target is not None:
                await routing.activate(*change.target, address)
            else:
                await routing.deactivate("no longer offered as an exit node")
        except OSError as error:
            logger.warning("exit node %s: %s", self.config.exit, error)
            if change.action == "activate":
                self.exit_chooser.forget()

    def _exit_on_table_change(self) -> None:
        names = self.names
        if names is not None and names.generation != self._exit_generation:
            self.check_exit_soon()

    async def _close_exit_routing(self) -> None:
        check, self._exit_check = self._exit_check, None
        if check is not None:
            # Awaited, not cancelled: a netlink call in flight must finish before the undo.
            with contextlib.suppress(Exception):
                await check
        if self.exit_routing is not None:
            try:
                await self.exit_routing.close()
            except OSError as error:
                logger.warning("cannot remove the exit-node routing: %s", error)

    def _on_names(self, message: Names) -> None:
        self.naming.on_names(message, time.monotonic())
        self._exit_on_table_change()

    def _on_name_announcement(self, message: NameAnnouncement) -> None:
        self.naming.on_announcement(message, time.monotonic())
        self._exit_on_table_change()

    # -- status ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What `p2pvpn status` shows; never contains the password."""
        stats = self.data_plane.stats() if self.data_plane is not None else None
        signaling = self.signaling.stats
        sysroutes, sysroutes_refused = self.routes.snapshot()
        peers = self.peers.snapshot(stats, time.monotonic()) if self.peers is not None else []
        for row in peers:
            row["name"] = self.naming.name_of(str(row.get("tun_ip")))
        return {
            "name": self.config.name,
            "interface": self.config.interface_name,
            "address": str(self.address) if self.address else None,
            "version": __version__,
            "dataplane": stats.implementation if stats else None,
            "udp_offloads": list(self.data_plane.udp_offloads) if self.data_plane else [],
            "tun_offloads": list(self.data_plane.tun_offloads) if self.data_plane else [],
            "pid": os.getpid(),
            "started": self.started,
            "server": {
                "url": self.signaling.url,  # the current one, in display form
                "index": self.signaling.url_index + 1,
                "servers": self.signaling.url_count,
                "switches": self.signaling.switches,
                "state": self.signaling.state,
                "connected_since": self.signaling.connected_since,
                "reconnects": self.signaling.reconnects,
                "failed_attempts": self.signaling.failed_attempts,
                "retrying_since": self.signaling.retrying_since,
            },
            "relay": {
                "packets_out": signaling.relay_packets_out,
                "bytes_out": signaling.relay_bytes_out,
                "packets_in": signaling.relay_packets_in,
                "bytes_in": signaling.relay_bytes_in,
                "dropped": signaling.frames_dropped,
            },
            "direct": _direct_totals(stats),
            "peers": peers,
            "routes": self.peers.route_snapshot() if self.peers is not None else [],
            "sysroutes": sysroutes,
            "sysroutes_refused": sysroutes_refused,
            "drops": {
                **(dict(stats.drops) if stats else {}),
                **(self.peers.drops if self.peers is not None else {}),
            },
            "stun_failures": self.peers.stun_failures if self.peers is not None else 0,
            "bench_server": self.bench_server.endpoint if self.bench_server is not None else None,
            "exit": self.exit_chooser.snapshot(),
            **self.naming.snapshot(),
            "exit_node": (
                self.exit_node.snapshot()
                if self.exit_node is not None
                else {"offering": False, "masquerade": None}
            ),
        }


def open_tun(config: ClientConfig) -> TunDevice:
    """The client's TUN device, with offloads where the data plane reads them.

    Only the fast plane reads the virtio-net header that offloads put on every
    packet, so the plane is resolved first; `offload = off` keeps the device plain.
    """
    offload = config.offload == "auto" and resolve_data_plane(config.dataplane) == "fast"
    if config.offload == "auto" and not offload:
        logger.debug("TUN offloads off: the pure data plane does not use them")
    return TunDevice.open(config.interface_name, config.mtu, offload=offload)


def _direct_totals(stats: DataPlaneStats | None) -> dict[str, int]:
    totals = {"packets_out": 0, "bytes_out": 0, "packets_in": 0, "bytes_in": 0}
    if stats is None:
        return totals
    for counters in stats.peers.values():
        totals["packets_out"] += counters.packets_out
        totals["bytes_out"] += counters.bytes_out
        totals["packets_in"] += counters.packets_in
        totals["bytes_in"] += counters.bytes_in
    return totals


def _open_udp_socket(port: int, mark: int | None = None) -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark is not None:
        try:
            udp.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as error:
            udp.close()
            raise OSError(
                f"cannot mark the UDP socket (exit needs root): {error.strerror}"
            ) from error
    for force, plain in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            udp.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
        except OSError:
            udp.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER_BYTES)
    try:
        udp.bind(("0.0.0.0", port))
    except OSError as error:
        udp.close()
        raise OSError(f"cannot bind UDP port {port}: {error.strerror}") from error
    udp.setblocking(False)
    return udp


def run_client(config: ClientConfig) -> int:
    """Entry point of `p2pvpn run` (the CLI configures logging): the exit code."""
    try:
        return asyncio.run(ClientNode(config).run())
    except OSError as error:
        logger.error("%s", error)
        return 1
