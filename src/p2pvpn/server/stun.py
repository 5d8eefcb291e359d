"""Built-in STUN responder (RFC 5389 binding only), so one server process is enough.

Clients learn their public UDP mapping from it (PROTOCOL 3.3). It answers a
binding request with the source address it saw and ignores everything else;
a response is barely larger than a request, so it is no useful amplifier.
Answers are rate-limited per source address all the same, so that spoofed
requests cannot aim a stream of them at someone else.
"""

import asyncio
import logging
import time
from ipaddress import IPv4Address
from typing import Any, cast

from p2pvpn.server.limits import DEFAULT_LIMITS, BucketTable, LogThrottle, TokenBucket
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.stun import decode_binding_request, encode_binding_response

__all__ = ["StunResponder", "start_stun_responder"]

logger = logging.getLogger(__name__)

# Source addresses with a rate-limit bucket; a spoofed flood from more of them
# evicts the least recently seen, so memory stays bounded.
ADDRESS_TABLE_SIZE = 4096
# Answers per second over all addresses: what evictions can give away is bounded too.
OVERALL_RATE = 2000
LOG_INTERVAL = 10.0


class StunResponder(asyncio.DatagramProtocol):
    """Answers binding requests; counts requests, answers and ignored datagrams."""

    def __init__(self, rate: int = DEFAULT_LIMITS.stun_rate) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self.requests = 0
        self.responses = 0
        self.ignored = 0
        self.rate_limited = 0
        now = time.monotonic()
        overall = TokenBucket(OVERALL_RATE, 2 * OVERALL_RATE, now)
        self._buckets = BucketTable(rate, 2 * rate, ADDRESS_TABLE_SIZE, overall)
        self._throttle = LogThrottle(LOG_INTERVAL)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_datagram_endpoint always hands over a datagram transport, but
        # the selector implementation does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self._answer(data, addr)
        except Exception:
            # Whatever arrives, the responder must keep serving everyone else.
            logger.exception("internal error answering a datagram from %s", addr)

    def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            transaction_id = decode_binding_request(data)
        except DecodeError:
            self.ignored += 1
            return
        self.requests += 1
        try:
            address = IPv4Address(addr[0])
        except ValueError:
            self.ignored += 1  # IPv4 only, like the protocol
            return
        if self._transport is None:
            return
        now = time.monotonic()
        if not self._buckets.take(addr[0], now):
            self.rate_limited += 1
            suppressed = self._throttle.allow("rate", now)
            if suppressed is not None:
                logger.warning(
                    "limit stun_rate: not answering %s (%d similar not logged)",
                    addr[0],
                    suppressed,
                )
            return
        self._transport.sendto(encode_binding_response(transaction_id, (address, addr[1])), addr)
        self.responses += 1
        logger.debug("STUN binding request from %s:%d", address, addr[1])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (client gone): nothing to do.
        logger.debug("STUN socket error: %s", exc)

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "responses": self.responses,
            "ignored": self.ignored,
            "rate_limited": self.rate_limited,
        }


async def start_stun_responder(
    host: str, port: int, *, rate: int = DEFAULT_LIMITS.stun_rate
) -> tuple[asyncio.DatagramTransport, StunResponder]:
    """Bind ``host:port`` (port 0: any) and answer there; raises OSError if it cannot.

    ``rate``: answers per second to one source address (bursts of twice as many).
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: StunResponder(rate), local_addr=(host, port)
    )
    return transport, protocol
