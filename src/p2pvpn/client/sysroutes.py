"""The sdwan routes (PROTOCOL 2.6) a client installs: policy, diff, and netlink off the loop.

The set of one login is every ROUTE message received after it. Routes new
in the set are added at once; routes missing from it are removed only once
the set has settled (no ROUTE for `SETTLE_SECONDS`), so that a re-sent set
arriving in several messages after a reconnect changes nothing and an
unchanged route never blinks. Installed routes survive a lost connection
(sdwan traffic over direct peer paths keeps flowing); they go with the TUN
device when the client stops.

Every netlink call runs on a worker thread, one at a time and in order, from
a single task; the data plane's sysroute table is set to what is installed
after each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from p2pvpn.client.route_policy import (
    MAX_ACCEPTED_ROUTES,
    Decision,
    RefusalLog,
    RouteEntry,
    Underlay,
    decide,
)
from p2pvpn.client.tun import TunError, read_lan_facts
from p2pvpn.config import AcceptRoutes, ClientConfig

if TYPE_CHECKING:
    from p2pvpn.client.peer_manager import PeerManager
    from p2pvpn.dataplane.base import DataPlane

__all__ = ["SETTLE_SECONDS", "SystemRouteManager", "UnderlayProbe", "data_plane_routes"]

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 3.0  # a p2pvpn server sends its ROUTE messages right after AUTH
MAX_OFFERED = 4096  # distinct entries kept per login; a flood beyond is ignored
MAX_SHOWN_REFUSED = MAX_ACCEPTED_ROUTES  # refusals listed in `p2pvpn status`
RESOLVE_TIMEOUT = 5.0


class _Netlink(Protocol):
    def add_route(self, network: IPv4Network) -> None: ...
    def remove_route(self, network: IPv4Network) -> None: ...


@dataclass(slots=True)
class _Target:
    """Where accepted routes go: the TUN device and the data plane of one address."""

    tun: _Netlink
    data_plane: DataPlane
    address: IPv4Interface
    peers: PeerManager | None


def data_plane_routes(
    sdwan: dict[IPv4Network, IPv4Address], exit_routes: list[tuple[IPv4Network, IPv4Address]]
) -> list[tuple[IPv4Network, IPv4Address]]:
    """The data plane's IPIP table: sdwan routes, then exit entries, each longest prefix first.

    The data plane takes the first match: an sdwan route beats the exit node for
    its network, and a longer prefix beats a shorter one within each kind.
    """

    def longest_first(entry: tuple[IPv4Network, IPv4Address]) -> int:
        return -entry[0].prefixlen

    return sorted(sdwan.items(), key=longest_first) + sorted(exit_routes, key=longest_first)


class UnderlayProbe:
    """Gathers the `Underlay` facts without blocking the loop."""

    def __init__(
        self,
        config: ClientConfig,
        server_address: Callable[[], str | None],
        peer_endpoints: Callable[[], Iterable[IPv4Address]],
    ) -> None:
        # Every server, not only the current one: a route must not cut off a failover.
        self._server_hosts = tuple(
            dict.fromkeys(urlsplit(url).hostname or "" for url in config.websockets)
        )
        self._stun_host = config.stun.host if config.stun is not None else None
        self._interface = config.interface_name
        self._server_address = server_address
        self._peer_endpoints = peer_endpoints
        self._resolved: dict[str, tuple[IPv4Address, ...]] = {}

    async def gather(self, address: IPv4Interface) -> Underlay:
        endpoints: list[tuple[IPv4Address, str]] = []
        connected = self._server_address()
        server: set[IPv4Address] = set()
        for host in self._server_hosts:
            server.update(await self._resolve(host))
        if connected:
            with contextlib.suppress(ValueError):
                server.add(IPv4Address(connected))
        endpoints.extend((ip, "the server's address") for ip in sorted(server))
        if self._stun_host is not None:
            stun = await self._resolve(self._stun_host)
            endpoints.extend((ip, "the STUN server's address") for ip in stun)
        try:
            gateways, subnets = await asyncio.to_thread(read_lan_facts, self._interface)
        except TunError as error:
            # Without these facts no route can be judged safe: accept none this round.
            logger.warning("%s; treating every address as part of the LAN", error)
            gateways, subnets = (), (IPv4Network("0.0.0.0/0"),)
        endpoints.extend((ip, "the default gateway") for ip in gateways)
        # Read last, after every await: the caller decides before the loop runs
        # another message, so an endpoint from a UDP4CONN before a ROUTE is seen.
        endpoints.extend((ip, "the peer endpoint") for ip in sorted(set(self._peer_endpoints())))
        return Underlay(address.network, address.ip, tuple(endpoints), subnets)

    async def _resolve(self, host: str) -> tuple[IPv4Address, ...]:
        """The host's IPv4 addresses; the last known ones when resolution fails now."""
        try:
            return (IPv4Address(host),)
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await loop.getaddrinfo(host, None, family=socket.AF_INET)
            self._resolved[host] = tuple(dict.fromkeys(IPv4Address(i[4][0]) for i in infos))
        except (OSError, TimeoutError) as error:
            logger.debug("cannot resolve %s: %s", host, error)
        return self._resolved.get(host, ())


class SystemRouteManager:
    """Keeps the kernel's sdwan routes equal to the accepted part of the server's set."""

    def __init__(
        self,
        policy: AcceptRoutes,
        gather: Callable[[IPv4Interface], Awaitable[Underlay]],
        *,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self._policy = policy
        self._gather = gather
        self._settle_seconds = settle_seconds
        self._offered: dict[RouteEntry, None] = {}
        self._offer_overflow = False
        self._settled = False
        self._settle_timer: asyncio.TimerHandle | None = None
        self._target: _Target | None = None
        self._installed: dict[IPv4Network, IPv4Address] = {}
        self._exit_routes: list[tuple[IPv4Network, IPv4Address]] = []  # toward an exit node
        self._failed: dict[IPv4Network, str] = {}
        self._decision = Decision()
        self._refusals = RefusalLog()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._closed = False

    # -- events from the node ---------------------------------------------------

    def start_set(self) -> None:
        """A login: the entries of the ROUTE messages that follow make the new set."""
        self._offered.clear()
        self._offer_overflow = False
        self._settled = False
        self._restart_settle_timer()

    def offer(self, entries: Iterable[RouteEntry]) -> None:
        """One ROUTE message of the current set."""
        before = len(self._offered)
        for entry in entries:
            if entry in self._offered:
                continue
            if len(self._offered) >= MAX_OFFERED:
                if not self._offer_overflow:
                    logger.warning("over %d sdwan routes offered; ignoring the rest", MAX_OFFERED)
                self._offer_overflow = True
                break
            self._offered[entry] = None
        self._restart_settle_timer()
        if len(self._offered) != before:
            self._wake.set()  # a re-sent entry changes nothing: no need to judge again

    def recheck(self) -> None:
        """The facts may have changed (a peer's endpoint): judge the set again."""
        if self._target is not None:
            self._wake.set()

    def set_exit_routes(self, entries: list[tuple[IPv4Network, IPv4Address]]) -> None:
        """The data plane's entries toward the exit node in use (`[]`: none).

        Kept apart from the sdwan routes: no kernel route (the exit routing's own
        table sends the traffic into the TUN device), and after them in the table.
        """
        self._exit_routes = list(entries)
        if self._target is not None:
            self._sync(self._target)

    async def attach(
        self,
        tun: _Netlink,
        data_plane: DataPlane,
        address: IPv4Interface,
        peers: PeerManager | None,
    ) -> None:
        """A (new) packet path: routes of an earlier TUN device went away with it."""
        await self._quiesce()
        self._target = _Target(tun, data_plane, address, peers)
        self._installed.clear()
        self._failed.clear()
        self._start_worker()
        self._wake.set()

    async def detach(self) -> None:
        """The packet path is going away: no netlink call in flight once this returns."""
        await self._quiesce()
        self._target = None

    async def close(self) -> None:
        """Stop changing routes for good (the TUN device takes its routes with it)."""
        self._closed = True
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        await self.detach()

    # -- status -------------------------------------------------------------------

    @property
    def installed(self) -> dict[IPv4Network, IPv4Address]:
        return dict(self._installed)

    def snapshot(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(accepted, refused) for `p2pvpn status`; refused entries carry their reason."""
        accepted = [
            {"network": str(network), "nexthop": str(nexthop)}
            for network, nexthop in self._decision.accepted
            if network not in self._failed
        ]
        refused = [
            {"network": str(network), "nexthop": str(nexthop), "reason": reason}
            for (network, nexthop), reason in self._decision.refused
        ]
        refused.extend(
            {"network": str(network), "nexthop": str(nexthop), "reason": self._failed[network]}
            for network, nexthop in self._decision.accepted
            if network in self._failed
        )
        return accepted, refused[:MAX_SHOWN_REFUSED]

    # -- the worker -----------------------------------------------------------------

    def _restart_settle_timer(self) -> None:
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._settle_timer = loop.call_later(self._settle_seconds, self._on_settled)

    def _on_settled(self) -> None:
        self._settle_timer = None
        self._settled = True
        self._wake.set()

    def _start_worker(self) -> None:
        if not self._closed:
            self._worker = asyncio.create_task(self._work(), name="sysroutes")

    async def _quiesce(self) -> None:
        """Stop the worker; a netlink call in flight finishes (a thread cannot be cancelled)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            await asyncio.wait({inflight})

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            target = self._target
            if target is None:
                continue
            try:
                underlay = await self._gather(target.address)
                if self._wake.is_set():
                    continue  # more arrived while gathering: gather again for all of it
                self._decision = decide(self._policy, underlay, self._offered)
                self._report(self._decision)
                await self._reconcile(target, self._wanted(target))
            except Exception:
                # A bug here must not leave the routes unmanaged for the rest of the run.
                logger.exception("applying the sdwan routes failed")

    def _wanted(self, target: _Target) -> dict[IPv4Network, IPv4Address]:
        wanted: dict[IPv4Network, IPv4Address] = {}
        for network, nexthop in self._decision.accepted:
            if nexthop != target.address.ip:  # we are the gateway: the kernel routes it
                wanted.setdefault(network, nexthop)
        return wanted

    async def _reconcile(self, target: _Target, wanted: dict[IPv4Network, IPv4Address]) -> None:
        for network in list(self._installed):
            if network in wanted:
                self._installed[network] = wanted[network]  # a new next hop: table only
            elif self._settled:
                try:
                    await self._netlink(target.tun.remove_route, network)
                except TunError as error:
                    logger.warning("cannot remove sdwan route %s: %s", network, error)
                del self._installed[network]
                self._sync(target)
        for network, nexthop in wanted.items():
            if network in self._installed or network in self._failed:
                continue
            try:
                await self._netlink(target.tun.add_route, network)
            except TunError as error:
                logger.warning("sdwan route %s via %s not installed: %s", network, nexthop, error)
                self._failed[network] = f"the kernel refused it: {error}"
                continue
            self._installed[network] = nexthop
            self._sync(target)
        self._sync(target)

    async def _netlink(self, call: Callable[[IPv4Network], None], network: IPv4Network) -> None:
        # Shielded: cancelling the worker must not forget a change the kernel is making.
        self._inflight = asyncio.ensure_future(asyncio.to_thread(call, network))
        try:
            await asyncio.shield(self._inflight)
        finally:
            if self._inflight is not None and self._inflight.done():
                self._inflight = None

    def _sync(self, target: _Target) -> None:
        target.data_plane.set_sysroutes(data_plane_routes(self._installed, self._exit_routes))
        if self._installed and target.peers is not None:
            target.peers.disable_lan()

    def _report(self, decision: Decision) -> None:
        for (network, nexthop), reason in self._refusals.new_refusals(decision):
            logger.warning("sdwan route %s via %s refused: %s", network, nexthop, reason)
        if self._refusals.cap_warning_due(decision):
            logger.warning(
                "the server offered more than %d acceptable sdwan routes; %d ignored",
                MAX_ACCEPTED_ROUTES,
                decision.over_cap,
            )
