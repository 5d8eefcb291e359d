"""The client's WebSocket session with the server (PROTOCOL 2.3): login, keepalive, reconnect.

One SignalingSession owns at most one connection at a time and keeps
reconnecting, with capped exponential back-off, until close() is called or a
condition occurs that retrying cannot fix (wrong password, refused address,
kicked): that ends run() with SignalingError, whose message is meant for the
user as is.

With several server URLs (a cluster) it tries them in order: an attempt that
fails moves on to the next URL at once, and the back-off waits only after a
whole round of them failed, so losing a working server costs one connection
set-up, not a back-off delay. A login keeps the session on its URL until that
connection ends.

The data plane hands packets to send_frames() synchronously from its
callbacks, so outgoing frames go through a bounded queue drained by a writer
task; when the queue is full or the session is not logged in they are
dropped and counted rather than buffered, because a stale IP packet is worth
less than memory and latency.
"""

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConcurrencyError,
    ConnectionClosed,
    InvalidURI,
    WebSocketException,
)
from websockets.frames import CloseCode as WsCloseCode
from websockets.uri import parse_uri

from p2pvpn import __version__
from p2pvpn.client.store import StateStore
from p2pvpn.config import display_url
from p2pvpn.wire.close_codes import (
    CLOSE_REASONS,
    FATAL_CLOSE_CODES,
    REPEATED_CLOSE_CODES,
    REPEATED_CLOSE_LIMIT,
    CloseCode,
)
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ws import Auth, ExptTun, Hello, Vmac, WsMessage, WsType, decode_ws_message

__all__ = [
    "SessionState",
    "SignalingError",
    "SignalingHandler",
    "SignalingSession",
    "SignalingStats",
]

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = 15.0  # ping when nothing arrived for this long (PROTOCOL 2.3 step 6)
SILENCE_TIMEOUT = 30.0  # give the connection up after this much silence
LOGIN_TIMEOUT = 10.0  # how long to wait for the EXPTTUN grant
SO_MARK = 36  # Linux; not exported by every Python's socket module
OPEN_TIMEOUT = 10.0  # TCP + TLS + WebSocket handshake
CLOSE_TIMEOUT = 2.0  # closing handshake; a healthy server answers in one round trip
RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 30.0
STABLE_LOGIN = 60.0  # a login that lasted this long resets the back-off and the kick count
# Losing a login that lasted this long starts a fresh round of the other servers at once;
# a shorter one counts as a failed attempt, so servers that drop us right away cannot
# make the session switch between them without a back-off.
WORKING_LOGIN = 5.0
EARLY_CLOSE_WINDOW = 5.0
EARLY_CLOSE_LIMIT = 3
SEND_QUEUE_SIZE = 2048
# A FORWARD carries at most a 65535-byte packet; the slack covers trailing bytes.
MAX_FRAME_SIZE = 65536 + 1024
FORWARD_TYPE = bytes((WsType.FORWARD,))
UNSPECIFIED = IPv4Interface("0.0.0.0/0")
MIN_GRANT_PREFIX = 8  # a wider grant would put most of the internet on the TUN device
_P2PVPN_CLOSE_CODES = frozenset(int(code) for code in CloseCode)

SessionState = Literal["connecting", "connected", "disconnected"]


class SignalingError(Exception):
    """Retrying cannot help: the client must stop. The message is for the user."""


class _UnusableGrantError(Exception):
    """The server's grant cannot be used; this attempt failed, the next may not."""


class SignalingHandler(Protocol):
    """What the session tells the node."""

    async def on_login(self, address: IPv4Interface) -> None:
        """AUTH was sent with ``address`` (first login and every re-login)."""

    def on_message(self, message: WsMessage) -> None:
        """A decoded frame from the server after login, of any type."""

    def on_disconnected(self) -> None:
        """The connection that on_login() announced is gone."""


@dataclass(slots=True)
class SignalingStats:
    """Counters for `p2pvpn status`; relay_* count FORWARD payloads (IP packets)."""

    frames_out: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    frames_dropped: int = 0  # outgoing frames dropped: not logged in or queue full
    frames_malformed: int = 0  # incoming frames that did not decode
    relay_packets_out: int = 0
    relay_bytes_out: int = 0
    relay_packets_in: int = 0
    relay_bytes_in: int = 0
    pings_sent: int = 0


class _TrackedConnection(ClientConnection):
    """A connection that remembers when bytes last arrived from the server.

    Keepalive needs "any frame or pong counts as traffic"; watching the
    transport sees pongs and control frames that recv() never returns.
    """

    last_traffic: float = 0.0

    def data_received(self, data: bytes) -> None:
        self.last_traffic = self.loop.time()
        super().data_received(data)


@dataclass(slots=True)
class _Attempt:
    """What happened to one connection attempt; judged once it is over."""

    connected: bool = False  # the WebSocket handshake succeeded
    address: IPv4Interface | None = None  # requested, granted or static
    auth_sent_at: float | None = None  # loop time
    logged_in_at: float | None = None
    ended_at: float = 0.0
    frames_after_auth: int = 0
    cause: str | None = None
    close_code: int | None = None
    close_reason: str = ""
    peer_closed: bool = False  # the server (or the network) ended it, not us


@dataclass(frozen=True, slots=True)
class _Server:
    """One server URL, parsed once."""

    url: str
    display: str  # display_url(url): no credentials
    host: str
    secure: bool  # wss://


class SignalingSession:
    """A WebSocket session that logs in, keeps the connection alive and reconnects."""

    def __init__(
        self,
        urls: str | Sequence[str],
        password: str,
        static_address: IPv4Interface | None,
        store: StateStore,
        handler: SignalingHandler,
        *,
        tls_verify: bool = True,
        tls_ca: Path | None = None,
        clock: Callable[[], float] = time.time,
        idle_timeout: float = IDLE_TIMEOUT,
        silence_timeout: float = SILENCE_TIMEOUT,
        login_timeout: float = LOGIN_TIMEOUT,
        reconnect_initial: float = RECONNECT_INITIAL,
        reconnect_max: float = RECONNECT_MAX,
        socket_mark: int | None = None,
        ping_payload: bytes | None = None,
        exit_node: bool = False,
    ) -> None:
        # SO_MARK on the WebSocket's own TCP socket: with an exit node in use the
        # marked underlay keeps the main table's route instead of entering the tunnel.
        self._socket_mark = socket_mark
        self._servers = _parse_servers((urls,) if isinstance(urls, str) else tuple(urls))
        secure = any(server.secure for server in self._servers)
        # One context for every wss:// URL: the same trust settings apply to all of them.
        self._ssl = _ssl_context(tls_verify, tls_ca) if secure else None
        self._index = 0  # the server of the current (or next) attempt
        self._switches = 0
        self._password = password
        self._static_address = static_address
        self._store = store
        self._handler = handler
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._silence_timeout = silence_timeout
        self._login_timeout = login_timeout
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE_SIZE)
        self._stop = asyncio.Event()
        self._closing = False
        self._ws: _TrackedConnection | None = None
        self._inner: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[Any] | None = None
        self._last_timestamp = 0
        self._early_closes = 0
        self._repeated_closes = 0
        self._logins = 0
        self._state: SessionState = "disconnected"
        self._connected_since: float | None = None
        self._reconnects = 0
        self._failed_attempts = 0
        self._retrying_since: float | None = None
        self._address: IPv4Interface | None = None
        # Issue 16: our name rides on every ping (as a Candy client's does), and HELLO
        # after AUTH asks a p2pvpn server for NAMES.
        self._ping_payload = ping_payload
        self._exit_node = exit_node
        self._identity_due = asyncio.Event()
        self.stats = SignalingStats()

    # -- observable state ---------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connected_since(self) -> float | None:
        """clock() when the current login happened; None when not logged in."""
        return self._connected_since

    @property
    def reconnects(self) -> int:
        """How many times the session logged in again after its first login."""
        return self._reconnects

    @property
    def failed_attempts(self) -> int:
        """Connection attempts that did not log in since the last login (or the start)."""
        return self._failed_attempts

    @property
    def retrying_since(self) -> float | None:
        """clock() when the first of `failed_attempts` began; None when there are none."""
        return self._retrying_since

    @property
    def url(self) -> str:
        """The URL of the current (or next) attempt, in display form (no credentials)."""
        return self._servers[self._index].display

    @property
    def url_index(self) -> int:
        """The position of `url` among the configured URLs, from 0."""
        return self._index

    @property
    def url_count(self) -> int:
        return len(self._servers)

    @property
    def switches(self) -> int:
        """How many times the session moved on to another server URL."""
        return self._switches

    @property
    def server_ip(self) -> str | None:
        """The address of the server we are connected to (None between connections)."""
        ws = self._ws
        remote = ws.remote_address if ws is not None else None
        return str(remote[0]) if remote else None

    @property
    def address(self) -> IPv4Interface | None:
        """The address of the current (or last) login."""
        return self._address

    # -- sending (synchronous, for data plane callbacks) --------------------

    def send(self, message: WsMessage) -> bool:
        """Queue one message; False if it was dropped."""
        return self.send_frames((message.encode(),)) == 1

    def send_frames(self, frames: Iterable[bytes]) -> int:
        """Queue encoded frames; returns how many were queued (the rest are dropped)."""
        if self._state != "connected":
            self.stats.frames_dropped += sum(1 for _ in frames)
            return 0
        queued = 0
        for frame in frames:
            try:
                self._queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.stats.frames_dropped += 1
            else:
                queued += 1
        return queued

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` until every queued frame went to the connection.

        For a last word before close() (which would drop what is still queued).
        """
        if self._state != "connected":
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    def send_forward_packets(self, packets: list[bytes]) -> int:
        """Relay raw IPv4 packets through the server as FORWARD frames."""
        return self.send_frames(FORWARD_TYPE + packet for packet in packets)

    # -- identity (issue 16) -------------------------------------------------

    @property
    def ping_payload(self) -> bytes | None:
        """What every ping carries: ``candy::linux::<version>::<hostname>``."""
        return self._ping_payload

    def set_ping_payload(self, payload: bytes | None) -> None:
        """Carry ``payload`` on pings from now on; a change is sent at once."""
        if payload != self._ping_payload:
            self._ping_payload = payload
            self.send_identity_ping()

    def send_identity_ping(self) -> None:
        """Ping with the payload now (when logged in; every login does anyway)."""
        self._identity_due.set()

    def set_exit_node(self, exit_node: bool) -> None:
        """The HELLO flag; a change is told to the server at once."""
        if exit_node != self._exit_node:
            self._exit_node = exit_node
            self.send(Hello(exit_node))

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Connect, log in and serve until close() (then return normally).

        Raises SignalingError when retrying cannot help; an exception from
        handler.on_login() (say the TUN device cannot be configured) also ends it.
        """
        if self._closing:
            return
        for server in self._servers:
            _warn_insecure(server, self._ssl)
        self._run_task = asyncio.current_task()
        inner = asyncio.create_task(self._run_loop(), name="signaling-session")
        self._inner = inner
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({inner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            inner.cancel()  # no-op when it already finished
            self._state = "disconnected"
            self._connected_since = None
            # Re-raises SignalingError (or a bug); a cancellation we caused is a normal end.
            with contextlib.suppress(asyncio.CancelledError):
                await inner

    async def close(self) -> None:
        """Close the connection cleanly and make run() return."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        self._stop.set()
        current = asyncio.current_task()
        # Wait for run() to return, unless close() was called from inside it.
        if self._run_task is not None and current not in (self._run_task, self._inner):
            await asyncio.wait({self._run_task})

    async def _run_loop(self) -> None:
        failures = 0  # back-off waits since the last stable login, drives the back-off
        # Attempts that failed (or logged in only briefly) since a working server was
        # lost or the last back-off wait; a whole round of them means waiting.
        failed_in_round = 0
        while not self._closing:
            started = self._clock()
            attempt = await self._attempt()
            if self._closing:
                return
            self._judge(attempt)
            if attempt.logged_in_at is None:
                self._failed_attempts += 1
                if self._retrying_since is None:
                    self._retrying_since = started
            if _was_stable(attempt):
                failures = 0
            if _lost_working_server(attempt):
                failed_in_round = 0  # a fresh round: every other server gets its turn at once
            else:
                failed_in_round += 1
            if len(self._servers) > 1 and failed_in_round < len(self._servers):
                self._move_on(attempt)
                continue
            failed_in_round = 0
            delay = self._backoff_delay(failures)
            failures += 1
            if len(self._servers) == 1:
                logger.info("reconnecting in %.1f s", delay)
            else:
                logger.warning(
                    "none of the %d servers took us; trying again in %.1f s",
                    len(self._servers),
                    delay,
                )
            await asyncio.sleep(delay)
            if len(self._servers) > 1:
                self._move_on(None)

    def _move_on(self, attempt: _Attempt | None) -> None:
        """Switch to the next server URL (after ``attempt`` on the current one, if any)."""
        previous = self._servers[self._index].display
        self._index = (self._index + 1) % len(self._servers)
        self._switches += 1
        if attempt is not None and attempt.logged_in_at is not None:
            logger.warning("server %s lost, trying %s", previous, self.url)
        else:
            logger.info("trying %s", self.url)

    def _backoff_delay(self, failures: int) -> float:
        nominal = min(self._reconnect_max, self._reconnect_initial * 2.0 ** min(failures, 30))
        # Jitter keeps a crowd of clients from reconnecting in lockstep after a server restart.
        return nominal * random.uniform(0.75, 1.0)

    # -- one connection -----------------------------------------------------

    async def _attempt(self) -> _Attempt:
        attempt = _Attempt()
        server = self._servers[self._index]
        self._state = "connecting"
        logger.info("connecting to %s", server.display)
        sock: socket.socket | None = None
        try:
            if self._socket_mark is not None:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    sock = await _marked_connection(server.url, self._socket_mark)
            ws = await connect(
                server.url,
                sock=sock,
                ssl=self._ssl if server.secure else None,
                compression=None,
                max_size=MAX_FRAME_SIZE,
                ping_interval=None,  # keepalive is ours (PROTOCOL 2.3 step 6)
                ping_timeout=None,
                open_timeout=OPEN_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                user_agent_header=f"p2pvpn/{__version__}",
                create_connection=_TrackedConnection,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            if sock is not None:
                sock.close()
            attempt.cause = _describe_error(exc)
            self._state = "disconnected"
            return attempt
        attempt.connected = True
        await self._serve(cast(_TrackedConnection, ws), attempt)
        return attempt

    async def _serve(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        self._ws = ws
        ws.last_traffic = asyncio.get_running_loop().time()
        try:
            try:
                address = await self._login(ws, attempt)
            except ConnectionClosed as exc:
                _record_close(attempt, exc)
                return
            except TimeoutError:
                attempt.cause = f"no address grant within {self._login_timeout:g} s"
                return
            except _UnusableGrantError as exc:
                attempt.cause = str(exc)
                return
            self._logged_in(address, attempt)
            try:
                await self._handler.on_login(address)
                await self._pump(ws, attempt)
            finally:
                self._logged_out()
        finally:
            attempt.ended_at = asyncio.get_running_loop().time()
            self._ws = None
            self._state = "disconnected"
            self._flush_queue()
            await ws.close()

    def _logged_in(self, address: IPv4Interface, attempt: _Attempt) -> None:
        self._address = address
        self._state = "connected"
        self._connected_since = self._clock()
        attempt.logged_in_at = asyncio.get_running_loop().time()
        if self._logins:
            self._reconnects += 1
        self._failed_attempts = 0
        self._retrying_since = None
        self._logins += 1
        logger.info("logged in as %s", address)

    def _logged_out(self) -> None:
        self._state = "disconnected"
        self._connected_since = None
        self._flush_queue()
        try:
            self._handler.on_disconnected()
        except Exception:
            logger.exception("signaling handler failed in on_disconnected")

    def _flush_queue(self) -> None:
        # Frames queued for a dead connection are stale by the time a new one is up.
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self.stats.frames_dropped += 1

    # -- login (PROTOCOL 2.3) -------------------------------------------------

    async def _login(self, ws: _TrackedConnection, attempt: _Attempt) -> IPv4Interface:
        """Send VMAC, get an address if needed, send AUTH; returns the address."""
        timestamp = self._next_timestamp()
        vmac = Vmac.create(self._password, self._store.vmac(), timestamp)
        await self._send_now(ws, vmac.encode())
        if self._static_address is not None:
            address = self._static_address
        else:
            address = await self._request_address(ws, attempt, timestamp)
        attempt.address = address
        await self._send_now(ws, Auth.create(self._password, address.ip, timestamp).encode())
        attempt.auth_sent_at = asyncio.get_running_loop().time()
        # A Candy server ignores the type; a p2pvpn server answers with NAMES.
        await self._send_now(ws, Hello(self._exit_node).encode())
        return address

    def _next_timestamp(self) -> int:
        # Two logins within one second would otherwise carry identical hashes, which a
        # p2pvpn server refuses as a replay.
        timestamp = max(int(self._clock()), self._last_timestamp + 1)
        self._last_timestamp = timestamp
        return timestamp

    async def _request_address(
        self, ws: _TrackedConnection, attempt: _Attempt, timestamp: int
    ) -> IPv4Interface:
        requested = self._store.last_address() or UNSPECIFIED
        attempt.address = requested
        await self._send_now(ws, ExptTun.create(self._password, requested, timestamp).encode())
        async with asyncio.timeout(self._login_timeout):
            grant = await self._receive_grant(ws)
        if not grant.verify(self._password):
            raise SignalingError(
                "the server's address grant does not verify with our password: "
                "the password is wrong"
            )
        # The hash covers only the timestamp, so anyone on a ws:// path can
        # rewrite the cidr (or replay an old grant with another one). Stopping
        # for good would let one forged frame end the client; a bad grant
        # fails this attempt instead and the back-off retries it.
        problem = _unusable_address(grant.cidr)
        if problem is not None:
            message = f"the server granted the address {grant.cidr}, which {problem}"
            logger.warning("%s: refusing it and retrying", message)
            raise _UnusableGrantError(message)
        if requested != UNSPECIFIED and requested.network != grant.cidr.network:
            logger.warning(
                "the server granted %s in the network %s, but last time we had %s in %s",
                grant.cidr,
                grant.cidr.network,
                requested,
                requested.network,
            )
        self._store.save_address(grant.cidr)
        return grant.cidr

    async def _receive_grant(self, ws: _TrackedConnection) -> ExptTun:
        while True:
            message = self._decode(await ws.recv())
            if isinstance(message, ExptTun):
                return message
            if message is not None:
                logger.debug("ignoring %s received before login", type(message).__name__)

    async def _send_now(self, ws: _TrackedConnection, frame: bytes) -> None:
        await ws.send(frame)
        self._count_out(frame)

    # -- logged in: receive, keepalive, write ---------------------------------

    async def _pump(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        """Run until the connection ends for any reason, recorded in ``attempt``."""
        tasks = [
            asyncio.create_task(self._receive_loop(ws, attempt)),
            asyncio.create_task(self._keepalive(ws, attempt)),
            asyncio.create_task(self._write_loop(ws, attempt)),
            asyncio.create_task(self._identity_loop(ws, attempt)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # a bug in a loop must not pass for a connection loss

    async def _receive_loop(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        try:
            while True:
                frame = await ws.recv()
                attempt.frames_after_auth += 1
                self._receive(frame)
        except ConnectionClosed as exc:
            _record_close(attempt, exc)

    def _receive(self, frame: str | bytes) -> None:
        """Decode one frame that arrived after login and hand it to the handler."""
        message = self._decode(frame)
        if message is None:
            return
        if frame[:1] == FORWARD_TYPE:
            self.stats.relay_packets_in += 1
            self.stats.relay_bytes_in += len(frame) - 1
        try:
            self._handler.on_message(message)
        except Exception:
            # One bad message must not take the whole session down with it.
            logger.exception("signaling handler failed on %s", type(message).__name__)

    async def _keepalive(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        """Ping after idle_timeout of silence; give up after silence_timeout."""
        loop = asyncio.get_running_loop()
        pinged_at: float | None = None
        while True:
            silent_for = loop.time() - ws.last_traffic
            if silent_for >= self._silence_timeout:
                attempt.cause = f"no traffic from the server for {silent_for:.0f} s"
                # A closing handshake would only wait for a peer that stopped answering.
                ws.transport.abort()
                return
            pinged = pinged_at is not None and pinged_at >= ws.last_traffic
            if silent_for >= self._idle_timeout and not pinged:
                try:
                    # Sending waits while the write buffer is full; that must not stall
                    # the silence check, hence the bound.
                    async with asyncio.timeout(self._silence_timeout - silent_for):
                        await self._ping(ws)
                except TimeoutError:
                    continue  # the silence check gives the connection up
                except ConnectionClosed as exc:
                    _record_close(attempt, exc)
                    return
                pinged_at = loop.time()
                pinged = True
                self.stats.pings_sent += 1
            wait = self._silence_timeout if pinged else self._idle_timeout
            await asyncio.sleep(max(ws.last_traffic + wait - loop.time(), 0.001))

    async def _ping(self, ws: _TrackedConnection) -> None:
        """One ping with our payload (a random one while the same is unanswered)."""
        try:
            await ws.ping(self._ping_payload)
        except ConcurrencyError:
            await ws.ping()

    async def _identity_loop(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        """A ping with our name right after login and whenever it changes."""
        self._identity_due.set()
        try:
            while True:
                await self._identity_due.wait()
                self._identity_due.clear()
                if self._ping_payload is None:
                    continue
                await self._ping(ws)
                self.stats.pings_sent += 1
        except ConnectionClosed as exc:
            _record_close(attempt, exc)

    async def _write_loop(self, ws: _TrackedConnection, attempt: _Attempt) -> None:
        try:
            while True:
                frame = await self._queue.get()
                try:
                    await ws.send(frame)
                finally:
                    self._queue.task_done()  # what flush() waits for
                self._count_out(frame)
        except ConnectionClosed as exc:
            _record_close(attempt, exc)

    # -- counters -----------------------------------------------------------

    def _decode(self, frame: str | bytes) -> WsMessage | None:
        """Count an incoming frame and decode it; None for a frame we drop."""
        self.stats.frames_in += 1
        self.stats.bytes_in += len(frame)
        if isinstance(frame, str):
            self.stats.frames_malformed += 1
            logger.debug("dropping a text frame from the server")
            return None
        try:
            return decode_ws_message(frame)
        except DecodeError as exc:
            self.stats.frames_malformed += 1
            logger.debug("dropping a malformed frame from the server: %s", exc)
            return None

    def _count_out(self, frame: bytes) -> None:
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)
        if frame[:1] == FORWARD_TYPE:
            self.stats.relay_packets_out += 1
            self.stats.relay_bytes_out += len(frame) - 1

    # -- judging a finished attempt -------------------------------------------

    def _judge(self, attempt: _Attempt) -> None:
        """Log how the attempt ended; raise SignalingError if retrying cannot help."""
        if not attempt.connected:
            logger.warning("cannot connect to %s: %s", self.url, attempt.cause)
            return
        logger.info("connection to %s lost (%s)", self.url, attempt.cause)
        code = attempt.close_code
        if code in FATAL_CLOSE_CODES:
            raise SignalingError(_refusal_message(CloseCode(code), attempt))
        if code in REPEATED_CLOSE_CODES:
            self._judge_repeated(CloseCode(code), attempt)
            return
        # Only a stable login ends a run of kicks: two clients with the same
        # static address fight with kicks and refused (replayed) logins between
        # them, and the one kicked first must be the one that gives up.
        if _was_stable(attempt):
            self._repeated_closes = 0
        if code == CloseCode.STALE_OR_REPLAYED:
            logger.error("%s", CLOSE_REASONS[CloseCode.STALE_OR_REPLAYED])
        if not _is_early_close(attempt):
            self._early_closes = 0
            return
        self._early_closes += 1
        if self._early_closes >= EARLY_CLOSE_LIMIT:
            if attempt.auth_sent_at is None:
                raise SignalingError(
                    f"the server closed the connection during login {EARLY_CLOSE_LIMIT} times "
                    "in a row: wrong password, or no address range (dhcp) on the server?"
                )
            raise SignalingError(
                f"the server closed the connection right after login {EARLY_CLOSE_LIMIT} "
                "times in a row: wrong password or refused address?"
            )

    def _judge_repeated(self, code: CloseCode, attempt: _Attempt) -> None:
        """Kicked or refused: fatal only REPEATED_CLOSE_LIMIT times in a row."""
        self._repeated_closes = 1 if _was_stable(attempt) else self._repeated_closes + 1
        message = _refusal_message(code, attempt)
        if self._repeated_closes >= REPEATED_CLOSE_LIMIT:
            raise SignalingError(f"{message}, {self._repeated_closes} times in a row")
        logger.warning(
            "%s; retrying (the client stops after %d in a row)", message, REPEATED_CLOSE_LIMIT
        )


def _lost_working_server(attempt: _Attempt) -> bool:
    """Logged in for WORKING_LOGIN, then the connection ended without the server refusing us.

    A kick or a refusal after login (a p2pvpn close code) is a failed attempt
    like any other, so that it never skips the back-off.
    """
    return (
        attempt.logged_in_at is not None
        and attempt.ended_at - attempt.logged_in_at >= WORKING_LOGIN
        and attempt.close_code not in _P2PVPN_CLOSE_CODES
    )


def _was_stable(attempt: _Attempt) -> bool:
    """The attempt logged in and stayed logged in for STABLE_LOGIN seconds."""
    return (
        attempt.logged_in_at is not None and attempt.ended_at - attempt.logged_in_at > STABLE_LOGIN
    )


def _is_early_close(attempt: _Attempt) -> bool:
    """A plain close right at login: how a Candy server refuses a client."""
    if not attempt.peer_closed:
        return False
    if attempt.close_code in _P2PVPN_CLOSE_CODES:
        return False  # a p2pvpn server said why; that is judged on its own
    if attempt.close_code == WsCloseCode.GOING_AWAY:
        return False  # a server shutting down, not refusing us (Candy refuses with 1000)
    if attempt.auth_sent_at is None:
        return True  # closed on VMAC or EXPTTUN
    return (
        attempt.frames_after_auth == 0
        and attempt.ended_at - attempt.auth_sent_at <= EARLY_CLOSE_WINDOW
    )


def _record_close(attempt: _Attempt, exc: ConnectionClosed) -> None:
    """Note why the connection closed; the first reason recorded wins."""
    if attempt.cause is not None:
        return
    received = exc.rcvd
    closed_by_us = exc.sent is not None and not (received is not None and exc.rcvd_then_sent)
    attempt.peer_closed = not closed_by_us
    if received is not None and received.code != WsCloseCode.NO_STATUS_RCVD:
        attempt.close_code = received.code
        attempt.close_reason = received.reason
        reason = f": {received.reason}" if received.reason else ""
        attempt.cause = f"closed by the server with code {received.code}{reason}"
    elif received is not None:
        attempt.cause = "closed by the server without a code"
    elif closed_by_us:
        attempt.cause = "closed by us"
    else:
        attempt.cause = "the connection dropped without a closing handshake"


def _refusal_message(code: CloseCode, attempt: _Attempt) -> str:
    details = []
    if attempt.address is not None:
        details.append(f"address {attempt.address}")
    if attempt.close_reason:
        details.append(f"server said: {attempt.close_reason}")
    text = CLOSE_REASONS[code]
    return f"{text} ({'; '.join(details)})" if details else text


async def _marked_connection(url: str, mark: int) -> socket.socket:
    """A TCP socket to the URL's host and port, with SO_MARK set before it connects.

    Each resolved address is tried in turn, like `socket.create_connection`.
    """
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    failure: OSError = OSError(f"cannot resolve {uri.host}")
    for family, kind, protocol, _, address in infos:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


def _parse_servers(urls: tuple[str, ...]) -> tuple[_Server, ...]:
    """The URLs parsed; SignalingError names a bad one."""
    if not urls:
        raise SignalingError("no server URL given")
    servers = []
    for number, url in enumerate(urls, start=1):
        shown = display_url(url)
        try:
            parsed = parse_uri(url)
        except (InvalidURI, ValueError):  # urllib's ValueError for a broken [IPv6] host
            position = f" (URL {number} of {len(urls)})" if len(urls) > 1 else ""
            # Not chained: InvalidURI's text is the whole URL, credentials and all.
            raise SignalingError(
                f"invalid server URL {shown!r}{position}: expected ws://host[:port]/path "
                "or wss://host[:port]/path"
            ) from None
        servers.append(_Server(url, shown, parsed.host, parsed.secure))
    return tuple(servers)


def _warn_insecure(server: _Server, context: ssl.SSLContext | None) -> None:
    if server.secure and context is not None and context.verify_mode == ssl.CERT_NONE:
        logger.warning("TLS certificate verification is disabled for %s", server.display)
    if not server.secure and not _is_loopback(server.host):
        logger.warning(
            "%s is plain ws://: relayed packets, routes and address grants cross the "
            "network in clear and unauthenticated, and the login hashes let an "
            "eavesdropper guess the password offline; use wss://",
            server.display,
        )


def _unusable_address(cidr: IPv4Interface) -> str | None:
    """Why a granted address cannot go on a TUN device, or None if it can."""
    ip = cidr.ip
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        return "is not a host address"
    if cidr.network.prefixlen < MIN_GRANT_PREFIX:
        return f"has a prefix shorter than /{MIN_GRANT_PREFIX}"
    network = cidr.network
    if network.prefixlen <= 30 and ip in (network.network_address, network.broadcast_address):
        return f"is the network or broadcast address of {network}"
    return None


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {OPEN_TIMEOUT:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate is not trusted: {exc.verify_message} "
            "(tls_ca = FILE trusts a private CA or a self-signed certificate)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc} (does the server speak wss://?)"
    return str(exc) or type(exc).__name__


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and localhost: traffic that never leaves the host."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _ssl_context(verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying context (``ca_file`` alone, else the system's CAs) unless told not to."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError too; the config check normally catches it first
        raise SignalingError(f"tls_ca {ca_file}: cannot load: {exc}") from None
    if not verify:
        # Explicit opt-out for self-signed servers (the reference client never verifies).
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
