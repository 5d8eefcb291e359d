"""DNS for the VPN's names (issue 16): ``<name>.<domain>`` and reverse lookups, on the TUN address.

:class:`DnsResponder` is the sans-I/O part: query bytes in, answer bytes out
(dnspython messages). It is authoritative for the domain and for the reverse
names of the VPN network, and refuses everything else, so it is never an
open resolver. :class:`DnsServer` puts it on UDP and TCP at (tun ip, 53).
"""

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from p2pvpn.client.names import NameTable

__all__ = [
    "DNS_PORT",
    "DNS_TTL",
    "DnsCounters",
    "DnsResponder",
    "DnsResult",
    "DnsServer",
]

logger = logging.getLogger(__name__)

DNS_PORT = 53
DNS_TTL = 5  # seconds: a name that moves or goes is seen again within a few seconds
HEADER_SIZE = 12
TCP_IDLE_TIMEOUT = 10.0  # a TCP client that sends nothing for this long is dropped
MAX_TCP_CLIENTS = 32
_REVERSE_ZONE = dns.name.from_text("in-addr.arpa.")
_QR = 0x8000

DnsResult = Literal["answered", "nxdomain", "refused", "malformed"]


@dataclass(slots=True)
class DnsCounters:
    """What `p2pvpn status` and the metric ``p2pvpn_dns_queries_total`` show."""

    queries: int = 0
    answered: int = 0  # NOERROR, with or without records
    nxdomain: int = 0
    refused: int = 0
    malformed: int = 0  # FORMERR, or dropped when not even the header parses

    def count(self, result: DnsResult) -> None:
        setattr(self, result, getattr(self, result) + 1)


class DnsResponder:
    """Answers queries for ``<name>.<domain>.`` and PTR queries inside ``network``."""

    def __init__(self, table: NameTable, domain: str, network: IPv4Network) -> None:
        self.table = table
        self.domain = dns.name.from_text(domain, origin=dns.name.root)
        self.network = network
        self.counters = DnsCounters()

    def answer(self, query: bytes) -> bytes | None:
        """The response to ``query``, or None when it deserves none (junk, a response)."""
        self.counters.queries += 1
        if len(query) < HEADER_SIZE or int.from_bytes(query[2:4]) & _QR:
            self.counters.count("malformed")  # not a query at all (or a response): no answer
            return None
        try:
            message = dns.message.from_wire(query)
        except (dns.exception.DNSException, ValueError):
            self.counters.count("malformed")
            return _format_error(query)
        if len(message.question) != 1:
            self.counters.count("malformed")
            return _format_error(query)
        response = dns.message.make_response(message)
        result = self._fill(message, response)
        self.counters.count(result)
        return response.to_wire()

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> DnsResult:
        question = query.question[0]
        if query.opcode() != dns.opcode.QUERY or question.rdclass != dns.rdataclass.IN:
            return _refuse(response)
        name = question.name
        if name.is_subdomain(self.domain):
            return self._forward(name, question.rdtype, response)
        if name.is_subdomain(_REVERSE_ZONE):
            return self._reverse(name, question.rdtype, response)
        return _refuse(response)

    def _forward(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, response: dns.message.Message
    ) -> DnsResult:
        response.flags |= dns.flags.AA
        labels = name.relativize(self.domain).labels
        if not labels:
            return "answered"  # the domain itself: there, with no records of these types
        address = (
            self.table.lookup(labels[0].decode("ascii", "replace")) if len(labels) == 1 else None
        )
        if address is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return "nxdomain"
        if rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            response.answer.append(
                dns.rrset.from_text(name, DNS_TTL, dns.rdataclass.IN, dns.rdatatype.A, str(address))
            )
        return "answered"  # AAAA and the rest: NOERROR without records (NODATA)

    def _reverse(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, response: dns.message.Message
    ) -> DnsResult:
        address = _reverse_address(name)
        if address is None or address not in self.network:
            return _refuse(response)  # not our zone: someone else's reverse names
        response.flags |= dns.flags.AA
        owner = self.table.name_of(address)
        if owner is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return "nxdomain"
        if rdtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            target = dns.name.from_text(owner, origin=self.domain)
            response.answer.append(
                dns.rrset.from_text(
                    name, DNS_TTL, dns.rdataclass.IN, dns.rdatatype.PTR, target.to_text()
                )
            )
        return "answered"


def _refuse(response: dns.message.Message) -> DnsResult:
    response.set_rcode(dns.rcode.REFUSED)
    return "refused"


def _reverse_address(name: dns.name.Name) -> IPv4Address | None:
    """``d.c.b.a.in-addr.arpa.`` as a.b.c.d; None for anything else (a partial name too)."""
    labels = name.relativize(_REVERSE_ZONE).labels
    if len(labels) != 4:
        return None
    try:
        return IPv4Address(".".join(label.decode("ascii") for label in reversed(labels)))
    except (AddressValueError, UnicodeDecodeError):
        return None


def _format_error(query: bytes) -> bytes:
    """FORMERR for a query whose header parsed but whose body did not: header only."""
    (flags,) = struct.unpack_from("!H", query, 2)
    opcode_and_rd = flags & 0x7900  # opcode and RD copied, as a response does
    return query[:2] + struct.pack("!HHHHH", _QR | opcode_and_rd | dns.rcode.FORMERR, 0, 0, 0, 0)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self._responder = responder
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        reply = self._responder.answer(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("DNS over UDP: %s", exc)


class DnsServer:
    """The responder on UDP and TCP at one address; `start` again to move it."""

    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.Task[None]] = set()
        self._endpoint: tuple[str, int] | None = None

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) while listening (the real port when 0 was asked for), else None."""
        return self._endpoint

    @property
    def listening(self) -> str | None:
        """``10.0.0.1:53`` while listening, for status."""
        return None if self._endpoint is None else f"{self._endpoint[0]}:{self._endpoint[1]}"

    async def start(self, host: str, port: int = DNS_PORT) -> None:
        """Listen on (host, port), closing any earlier sockets first; OSError if it cannot."""
        await self.close()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.responder), local_addr=(host, port)
        )
        self._udp = transport
        bound_port = int(transport.get_extra_info("sockname")[1])
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, host, bound_port)
        except OSError:
            await self.close()
            raise
        self._endpoint = (host, bound_port)

    async def close(self) -> None:
        self._endpoint = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._tcp_clients):
            task.cancel()
        for task in list(self._tcp_clients):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS or task is None:
            writer.close()
            return
        self._tcp_clients.add(task)
        try:
            await self._answer_stream(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tcp_clients.discard(task)
            writer.close()

    async def _answer_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Queries with a two-byte length each (RFC 1035 4.2.2), until EOF or silence."""
        while True:
            async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                query = await reader.readexactly(length)
            reply = self.responder.answer(query)
            if reply is None:
                return
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
