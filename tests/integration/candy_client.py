"""A scripted Candy-protocol client: the WebSocket frames a Candy 6 client sends, nothing more.

Run inside a namespace (``python candy_client.py JSON``); prints one JSON
object with what happened. It knows one server URL per connection, as
Candy does, and speaks only through the Candy-compatible codecs of
``p2pvpn.wire.ws`` (their bytes are checked against real Candy captures in
tests/vectors/). Two jobs:

* ``ping``: VMAC and AUTH with the same timestamp (Candy's order for a
  static address), then FORWARD an ICMP echo to ``target`` once a second
  until the echo reply comes back through the relay.
* ``replay``: send ``auth`` (hex, made by the test) to ``first``, prove the
  login with a ping, send the very same bytes to ``second`` and report how
  that connection was closed; then ping again over the first connection,
  which must not have been kicked.
* ``hold``: VMAC and AUTH, then a WebSocket ping whose payload is Candy's
  ``candy::linux::<version>::<hostname>`` (a Candy client sends it after
  15 s of silence; here at once, so the test need not wait), again every
  ``ping_every`` s, until SIGTERM; prints a ``logged_in`` line once the
  server answered the first ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import struct
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import Ipv4Header, ipv4_checksum
from p2pvpn.wire.ws import Auth, Forward, Vmac, WsType, decode_ws_message

ICMP = 1
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
_ICMP_HEADER = struct.Struct("!BBHHH")


def icmp_echo(source: IPv4Address, destination: IPv4Address, ident: int, seq: int) -> bytes:
    """An IPv4 ICMP echo request with valid header and ICMP checksums (the kernel checks both)."""
    payload = b"candy-cluster-probe"
    unsummed = _ICMP_HEADER.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    checksum = ipv4_checksum(unsummed)
    icmp = _ICMP_HEADER.pack(ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload
    header = Ipv4Header(4, 20, 20 + len(icmp), 64, ICMP, source, destination)
    return header.encode() + icmp


def is_echo_reply(packet: bytes, source: IPv4Address, destination: IPv4Address, ident: int) -> bool:
    """``packet`` is ``source``'s echo reply to ``destination`` for echo id ``ident``."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != ICMP:
        return False
    if packet[12:16] != source.packed or packet[16:20] != destination.packed:
        return False
    offset = (packet[0] & 0x0F) * 4
    kind, _, _, reply_ident, _ = _ICMP_HEADER.unpack_from(packet, offset)
    return bool(kind == ICMP_ECHO_REPLY and reply_ident == ident)


class Session:
    """One WebSocket connection to one server, and what came over it."""

    def __init__(self, ws: ClientConnection, me: IPv4Address) -> None:
        self.ws = ws
        self.me = me
        self.received: dict[str, int] = {}  # frame type name -> count
        self.undecodable = 0

    async def ping(self, target: IPv4Address, timeout: float) -> float:
        """Echo ``target`` once a second until it answers; returns the round trip in ms."""
        ident = secrets.randbelow(0xFFFF) + 1
        deadline = time.monotonic() + timeout
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            sent = time.monotonic()
            await self.ws.send(Forward(icmp_echo(self.me, target, ident, seq)).encode())
            if await self._reply(target, ident, min(1.0, deadline - sent)):
                return (time.monotonic() - sent) * 1000
        raise TimeoutError(f"no echo reply from {target} in {timeout:g} s")

    async def _reply(self, target: IPv4Address, ident: int, wait: float) -> bool:
        end = time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                return False
            if not isinstance(frame, bytes):
                continue
            self._count(frame)
            if frame[:1] == bytes((WsType.FORWARD,)) and is_echo_reply(
                frame[1:], target, self.me, ident
            ):
                return True
        return False

    def _count(self, frame: bytes) -> None:
        try:
            name = type(decode_ws_message(frame)).__name__
        except DecodeError:
            self.undecodable += 1
            return
        self.received[name] = self.received.get(name, 0) + 1


def _connect(url: str) -> Any:
    # What a Candy client negotiates: no compression, no keepalive of its own.
    return connect(url, compression=None, ping_interval=None, open_timeout=10)


async def ping_job(job: dict[str, Any]) -> dict[str, Any]:
    me, target = IPv4Address(job["tun_ip"]), IPv4Address(job["target"])
    password, timestamp = job["password"], int(job.get("timestamp") or time.time())
    async with _connect(job["url"]) as ws:
        await ws.send(Vmac.create(password, job["vmac"], timestamp).encode())
        await ws.send(Auth.create(password, me, timestamp).encode())
        session = Session(ws, me)
        rtt = await session.ping(target, float(job.get("timeout", 20)))
        return {"rtt_ms": rtt, "received": session.received, "undecodable": session.undecodable}


async def _closed_by_server(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    """Wait for the server to close ``ws``; its close code and reason."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        rcvd = closed.rcvd
        return {"code": rcvd.code if rcvd else None, "reason": rcvd.reason if rcvd else None}
    except TimeoutError:
        return {"code": None, "reason": f"still open after {timeout:g} s"}


async def replay_job(job: dict[str, Any]) -> dict[str, Any]:
    me, target = IPv4Address(job["tun_ip"]), IPv4Address(job["target"])
    auth = bytes.fromhex(job["auth"])
    timeout = float(job.get("timeout", 20))
    result: dict[str, Any] = {}
    async with _connect(job["first"]) as first:
        await first.send(auth)
        session = Session(first, me)
        result["first_rtt_ms"] = await session.ping(target, timeout)
        async with _connect(job["second"]) as second:
            await second.send(auth)
            result["second"] = await _closed_by_server(second, timeout)
        result["first_rtt_after_ms"] = await session.ping(target, timeout)
    return result


def candy_ping_payload(hostname: str, version: str = "6.1.8") -> bytes:
    """What a Candy client on Linux puts into its WebSocket pings."""
    return f"candy::linux::{version}::{hostname}".encode()


async def _drain(session: Session) -> None:
    """Read (and count) what the server sends, as a Candy client does; pongs need a reader."""
    with contextlib.suppress(ConnectionClosed):
        async for frame in session.ws:
            if isinstance(frame, bytes):
                session._count(frame)


async def hold_job(job: dict[str, Any]) -> dict[str, Any]:
    me = IPv4Address(job["tun_ip"])
    password, timestamp = job["password"], int(time.time())
    payload = candy_ping_payload(job["hostname"], job.get("version", "6.1.8"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with _connect(job["url"]) as ws:
        await ws.send(Vmac.create(password, job["vmac"], timestamp).encode())
        await ws.send(Auth.create(password, me, timestamp).encode())
        session = Session(ws, me)
        reader = asyncio.create_task(_drain(session))
        pings = 0
        while not stop.is_set():
            pong = await ws.ping(payload)
            await asyncio.wait_for(pong, 10)
            pings += 1
            if pings == 1:
                print(json.dumps({"logged_in": str(me), "ping": payload.decode()}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), float(job.get("ping_every", 15)))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return {"pings": pings, "received": session.received, "undecodable": session.undecodable}


def main() -> None:
    job = json.loads(sys.argv[1])
    runner = {"ping": ping_job, "replay": replay_job, "hold": hold_job}[job["job"]]
    print(json.dumps(asyncio.run(runner(job))), flush=True)


if __name__ == "__main__":
    main()
