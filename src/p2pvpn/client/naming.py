"""The node's names (issue 16): the name table, announcements, DNS and systemd-resolved.

One `NameService` per client node. The node hands it the login, the NAMES
and NameAnnouncement messages, every tick and the shutdown; it keeps the
`NameTable`, tells the other members our name (announcements through the
server, which Candy servers relay too; our ping payload, which every server
reads), answers DNS on the TUN address and registers that with
systemd-resolved. Everything here runs on the node's loop; resolvectl runs
off it.
"""

import asyncio
import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, Protocol

from p2pvpn import __version__
from p2pvpn.client.dns import DNS_PORT, DnsResponder, DnsServer
from p2pvpn.client.names import ANNOUNCE_INTERVAL, NameTable
from p2pvpn.client.resolved import ResolvedLink
from p2pvpn.config import ClientConfig
from p2pvpn.wire.names import clean_label, encode_ping_payload
from p2pvpn.wire.ws import BROADCAST, NameAnnouncement, Names, WsMessage

__all__ = [
    "FALLBACK_HOSTNAME",
    "REPLY_INTERVAL",
    "NameService",
    "effective_hostname",
    "ping_payload",
]

logger = logging.getLogger(__name__)

FALLBACK_HOSTNAME = "host"
REPLY_INTERVAL = 10.0  # at most one unicast reply per asking member in this many seconds
LEAVE_FLUSH_TIMEOUT = 1.0  # how long shutdown waits for the leaving announcement to go out


def effective_hostname(
    config: ClientConfig, machine_name: Callable[[], str] = socket.gethostname
) -> str:
    """``hostname``, else the machine's host name, as a DNS label; "host" if nothing is left."""
    return clean_label(config.hostname or machine_name()) or FALLBACK_HOSTNAME


def ping_payload(name: str) -> bytes:
    """What our pings carry, as a Candy client's do: ``candy::linux::<version>::<name>``."""
    return encode_ping_payload(name, __version__)


class _Signaling(Protocol):
    """What the service needs of the SignalingSession."""

    def send(self, message: WsMessage) -> bool: ...

    def set_ping_payload(self, payload: bytes | None) -> None: ...

    async def flush(self, timeout: float) -> None: ...


class NameService:
    """Names for one client node; `table` is None until the first login."""

    def __init__(
        self,
        config: ClientConfig,
        signaling: _Signaling,
        machine_name: Callable[[], str] = socket.gethostname,
    ) -> None:
        self.config = config
        self.signaling = signaling
        self.machine_name = machine_name
        self.name = effective_hostname(config, machine_name)
        self.exit_node = bool(getattr(config, "exit_node", False))  # exitnode's key, if merged
        self.table: NameTable | None = None
        self.address: IPv4Interface | None = None
        # Where DNS listens: (tun ip, 53); the in-process tests move it to loopback.
        self.dns_port = DNS_PORT
        self.dns_host: Callable[[IPv4Address], str] = str
        self.dns: DnsServer | None = None
        self.resolved = ResolvedLink(config.interface_name, config.domain)
        self._resolved_state: str | None = None
        self._announced_at: float | None = None
        self._replied_at: dict[IPv4Address, float] = {}

    # -- the node's events ------------------------------------------------------------

    async def on_login(self, address: IPv4Interface, now: float) -> None:
        """Every login: a table for a new address, our announcement, DNS where we are."""
        moved = address != self.address
        self.address = address
        if self.table is None or moved:
            self.table = NameTable(address.ip, self.name, self.exit_node)
            self._replied_at.clear()
        self._announce(now, reply_wanted=True)  # and the others answer with theirs
        if self.config.dns and (moved or self.dns is None or self.dns.endpoint is None):
            await self._serve_dns(address)

    def on_names(self, message: Names, now: float) -> None:
        if self.table is not None:
            self.table.on_server_names(message, now)

    def on_announcement(self, message: NameAnnouncement, now: float) -> None:
        table, address = self.table, self.address
        if table is None or address is None:
            return
        source = message.src
        if source not in address.network or message.dst not in (BROADCAST, address.ip):
            return  # not a member of our network, or not meant for us
        if not table.on_announcement(message, now):
            return
        replied = self._replied_at.get(source)
        if replied is not None and now - replied < REPLY_INTERVAL:
            return
        self._replied_at[source] = now
        self.signaling.send(self._announcement(source, reply_wanted=False))

    def tick(self, now: float) -> None:
        """Once a second: expiry, a changed machine name, the periodic announcement."""
        if not self.config.hostname:
            self._follow_machine_name(now)
        if self.table is None:
            return
        self.table.expire(now)
        if self._announced_at is None or now - self._announced_at >= ANNOUNCE_INTERVAL:
            self._announce(now, reply_wanted=False)
        for source, replied in list(self._replied_at.items()):
            if now - replied >= REPLY_INTERVAL:
                del self._replied_at[source]

    async def leave(self) -> None:
        """Shutdown, while the server is still there: tell the others we are gone."""
        if self.table is None:
            return
        self.signaling.send(NameAnnouncement(self.table.own_address, BROADCAST, ""))
        await self.signaling.flush(LEAVE_FLUSH_TIMEOUT)

    async def close(self) -> None:
        if self.dns is not None:
            await self.dns.close()
        # resolvectl blocks: off the loop.
        await asyncio.to_thread(self.resolved.revert)

    # -- what status shows -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        table = self.table
        hostname = self.name
        if table is not None:
            hostname = table.name_of(table.own_address) or hostname
        return {
            "hostname": hostname,
            "domain": self.config.domain,
            "names": [
                {
                    "address": str(record.address),
                    "name": record.name,
                    "exit_node": record.exit_node,
                    "p2pvpn": record.p2pvpn,
                    "source": record.source,
                }
                for record in (table.records() if table is not None else [])
            ],
            "dns": self._dns_snapshot(),
        }

    def name_of(self, address: str) -> str | None:
        """The name of a peer row's ``tun_ip``, for the peers table."""
        if self.table is None:
            return None
        try:
            return self.table.name_of(IPv4Address(address))
        except ValueError:
            return None

    def _dns_snapshot(self) -> dict[str, Any]:
        counters = self.dns.responder.counters if self.dns is not None else None
        return {
            "listening": self.dns.listening if self.dns is not None else None,
            "resolved": self._resolved_state,
            "queries": counters.queries if counters else 0,
            "answered": counters.answered if counters else 0,
            "nxdomain": counters.nxdomain if counters else 0,
            "refused": counters.refused if counters else 0,
            "malformed": counters.malformed if counters else 0,
        }

    # -- internals -------------------------------------------------------------------

    def _announcement(self, destination: IPv4Address, reply_wanted: bool) -> NameAnnouncement:
        assert self.table is not None
        return NameAnnouncement(
            self.table.own_address, destination, self.name, self.exit_node, reply_wanted
        )

    def _announce(self, now: float, reply_wanted: bool) -> None:
        self._announced_at = now
        self.signaling.send(self._announcement(BROADCAST, reply_wanted))

    def _follow_machine_name(self, now: float) -> None:
        name = effective_hostname(self.config, self.machine_name)
        if name == self.name:
            return
        logger.info("the machine's host name changed: this member is now %s", name)
        self.name = name
        self.signaling.set_ping_payload(ping_payload(name))
        if self.table is not None:
            self.table.set_own(name, self.exit_node)
            self._announce(now, reply_wanted=False)

    async def _serve_dns(self, address: IPv4Interface) -> None:
        assert self.table is not None
        responder = DnsResponder(self.table, self.config.domain, address.network)
        if self.dns is not None:
            responder.counters = self.dns.responder.counters  # counted over the whole run
            await self.dns.close()
        self.dns = DnsServer(responder)
        host = self.dns_host(address.ip)
        try:
            await self.dns.start(host, self.dns_port)
        except OSError as error:
            logger.warning(
                "DNS for *.%s not answered: cannot listen on %s port %d: %s",
                self.config.domain,
                host,
                self.dns_port,
                error.strerror or error,
            )
            return
        logger.info("answering DNS for *.%s on %s", self.config.domain, self.dns.listening)
        self._resolved_state = await asyncio.to_thread(self.resolved.register, address.ip)
