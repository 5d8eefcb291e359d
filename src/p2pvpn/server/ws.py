"""The relay over WebSocket: each connection is a session of the sans-I/O :class:`Relay`.

:class:`RelayServer` reads frames, stamps them with the clock and hands them to
the relay, then performs the :class:`Send` and :class:`Close` actions it
returns. A session's send only queues and a writer task drains the queue, so
one slow or hostile client can never stall the event loop or another client.

The payload of a client's WebSocket ping carries its host name (issue 16):
the connection class hands every ping's payload to :meth:`Relay.on_ping`.
"""

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from typing import Any, Protocol, cast

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from p2pvpn.server.limits import DEFAULT_LIMITS, ServerLimits, TokenBucket
from p2pvpn.server.relay import (
    MAX_FRAME_SIZE,
    Action,
    Claim,
    Close,
    Publish,
    RecordLease,
    Relay,
    RelaySession,
    Release,
    Send,
)
from p2pvpn.wire.ws import WsType

__all__ = [
    "DEFAULT_LOGIN_TIMEOUT",
    "ClusterActions",
    "RelayServer",
]

logger = logging.getLogger(__name__)

# A client that cannot answer the closing handshake must not hold up a
# shutdown or restart for websockets' default 10 s.
CLOSE_TIMEOUT = 2.0
# WebSocket close code websockets sends when a message exceeds max_size.
MESSAGE_TOO_BIG = 1009

DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
# A connection that has not logged in by then only holds resources.
DEFAULT_LOGIN_TIMEOUT = DEFAULT_LIMITS.login_timeout
# A client whose send queue stays full this long is not reading: it is closed.
SEND_QUEUE_STALL = 5.0
# A rejected client is no longer read; if its answer to the close frame does not
# arrive within this (it may sit behind unread frames), the connection is dropped.
REJECTED_CLOSE_TIMEOUT = 2.0
# Frames one connection may have handled before its reader lets other tasks run.
READ_BATCH = 16
# How long a session over its junk_rate is not read; the bucket refills meanwhile.
JUNK_PAUSE = 0.5
# A TLS handshake that has not finished by then only holds a socket (asyncio's default: 60 s).
TLS_HANDSHAKE_TIMEOUT = 10.0


# The signed login messages: with a cluster, each is claimed cluster-wide before the relay sees it.
_LOGIN_TYPES = frozenset({int(WsType.AUTH), int(WsType.EXPTTUN), int(WsType.VMAC)})


class ClusterActions(Protocol):
    """What the WebSocket layer needs of :class:`p2pvpn.server.cluster.ClusterLink`."""

    def perform(self, action: Publish | Claim | Release | RecordLease) -> None: ...

    async def claim_replay(self, key: str) -> bool: ...


class _WsSession(RelaySession):
    """A WebSocket connection: send() queues, a writer task drains the queue.

    The queue is bounded in bytes: a frame that does not fit is dropped, so a
    client that does not read costs at most ``queue_bytes`` of memory, and one
    whose queue stays full for SEND_QUEUE_STALL seconds is closed.
    """

    def __init__(
        self,
        connection: ServerConnection,
        relay: Relay,
        queue_bytes: int,
        cluster: ClusterActions | None = None,
    ) -> None:
        super().__init__(_format_remote(connection.remote_address))
        self._connection = connection
        self._relay = relay
        self._cluster = cluster
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._queue_bytes = queue_bytes
        self._not_empty = asyncio.Event()
        self._full_since: float | None = None  # loop time of the first drop in a row
        self._close_task: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        size = len(frame)
        if self._queued_bytes + size > self._queue_bytes:
            self._queue_full()
            return
        self._full_since = None
        self._queue.append(frame)
        self._queued_bytes += size
        self._not_empty.set()

    def _queue_full(self) -> None:
        # A client that does not read must not hold up anyone else.
        self._relay.count_drop("send_queue_full")
        now = asyncio.get_running_loop().time()
        if self._full_since is None:
            self._full_since = now
            self._relay.cap_hit("send_queue_full", time.time(), "dropping frames to %s", self)
        elif now - self._full_since >= SEND_QUEUE_STALL:
            _perform(
                self._relay.send_queue_stalled(self, time.time(), SEND_QUEUE_STALL), self._cluster
            )

    def __str__(self) -> str:
        return self.describe()

    def close(self, code: int, reason: str) -> None:
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._connection.close(code, reason)
            )

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the close started by close(); after ``timeout``, drop the connection.

        Called once the relay stopped reading: a client whose answer to the close
        sits behind frames nobody reads any more cannot complete the handshake.
        """
        if self._close_task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._close_task)
        except TimeoutError:
            self._connection.transport.abort()
        except Exception:  # the close task logs nothing; its failure ends the connection too
            self._connection.transport.abort()

    async def write_loop(self) -> None:
        queue = self._queue
        with contextlib.suppress(ConnectionClosed):
            while True:
                if not queue:
                    self._not_empty.clear()
                    await self._not_empty.wait()
                    continue
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                await self._connection.send(frame)


def _perform(actions: list[Action], cluster: ClusterActions | None) -> None:
    for action in actions:
        # The relay only names sessions it was given, and a RelayServer gives
        # it nothing but the _WsSessions it made.
        if isinstance(action, Send):
            cast(_WsSession, action.session).send(action.frame)
        elif isinstance(action, Close):
            cast(_WsSession, action.session).close(action.code, action.reason)
        elif cluster is not None:
            # Only a relay with a cluster returns these, and only with a link to perform them.
            cluster.perform(action)


def _host_of(address: Any) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


class _PendingLogins:
    """Connections that have not logged in yet, in all and by source address.

    The table only holds addresses with a pending connection, so it is bounded
    by the global cap.
    """

    def __init__(self, total: int, per_host: int) -> None:
        self._total_cap = total
        self._host_cap = per_host
        self.total = 0
        self._by_host: dict[str, int] = {}

    def refusal(self, host: str) -> str | None:
        """Which cap admitting a connection from ``host`` would pass, if any."""
        if self.total >= self._total_cap:
            return "unauthenticated"
        if self._by_host.get(host, 0) >= self._host_cap:
            return "unauthenticated_per_ip"
        return None

    def add(self, host: str) -> None:
        self.total += 1
        self._by_host[host] = self._by_host.get(host, 0) + 1

    def remove(self, host: str) -> None:
        self.total -= 1
        left = self._by_host[host] - 1
        if left:
            self._by_host[host] = left
        else:
            del self._by_host[host]


def _format_remote(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _describe_close(connection: ServerConnection) -> str:
    code = connection.close_code
    reason = connection.close_reason
    if code is None:
        return "connection lost"
    return f"close code {code}" + (f" ({reason})" if reason else "")


class RelayServer:
    """Serves a :class:`Relay` over WebSocket on ``host:port`` (port 0: any).

    With ``ssl_context`` it speaks wss:// (TLS); the context may swap
    certificates per connection (see :class:`p2pvpn.server.tls.ServerTls`).
    """

    def __init__(
        self,
        relay: Relay,
        host: str,
        port: int,
        *,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        limits: ServerLimits = DEFAULT_LIMITS,
        ssl_context: ssl.SSLContext | None = None,
        cluster: ClusterActions | None = None,
    ) -> None:
        self.relay = relay
        self.cluster = cluster
        self._ssl = ssl_context  # wss:// when given
        self._host = host
        self._port = port
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._queue_bytes = limits.send_queue_bytes
        self._login_timeout = limits.login_timeout
        self._junk_rate = limits.junk_rate
        self._pending = _PendingLogins(
            limits.max_unauthenticated, limits.max_unauthenticated_per_ip
        )
        # Accepted connections counted in _pending, with their source address.
        self._admitted: dict[ServerConnection, str] = {}
        # The session of each connection whose handler runs, for its pings.
        self._session_of: dict[ServerConnection, _WsSession] = {}
        self._server: Server | None = None

    @property
    def requested_port(self) -> int:
        return self._port

    @property
    def port(self) -> int:
        """The bound TCP port (useful after binding port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the relay server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting; raises OSError when the address is unusable."""
        self._server = await ws_serve(
            self._handle,
            self._host,
            self._port,
            compression=None,
            create_connection=self._connection_class(),
            # A connection that has not finished its handshake by the login
            # deadline could not have logged in either.
            open_timeout=self._login_timeout,
            max_size=MAX_FRAME_SIZE,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            close_timeout=CLOSE_TIMEOUT,
            server_header=None,
            ssl=self._ssl,
            # The TLS handshake is part of the login: the same deadline bounds it.
            ssl_handshake_timeout=(
                min(TLS_HANDSHAKE_TIMEOUT, self._login_timeout) if self._ssl is not None else None
            ),
        )

    async def close(self) -> None:
        """Close every connection (1001 going away) and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> "RelayServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def perform(self, actions: list[Action]) -> None:
        """Carry out the relay's actions (also those for frames from the cluster)."""
        _perform(actions, self.cluster)

    @property
    def pending_logins(self) -> int:
        """Connections counted against the unauthenticated caps right now."""
        return self._pending.total

    def _connection_class(self) -> type[ServerConnection]:
        """websockets' connection, counted against the caps as soon as it is accepted.

        It also shows the relay every ping: websockets answers pings itself and
        hands them to no one, so process_event (which websockets calls for each
        event parsed off the wire, the handshake request first) is the one place
        to see their payloads.
        """
        admit = self._admit
        pinged = self._pinged

        class _CountedConnection(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                admit(self)

            def process_event(self, event: Event) -> None:
                if isinstance(event, Frame) and event.opcode is Opcode.PING:
                    pinged(self, bytes(event.data))
                super().process_event(event)

        return _CountedConnection

    def _pinged(self, connection: ServerConnection, payload: bytes) -> None:
        """A ping arrived on ``connection``: its payload to the relay (never raises)."""
        session = self._session_of.get(connection)
        if session is None:
            return  # its handler has not started (or has ended): the client pings again
        try:
            self.perform(self.relay.on_ping(session, payload, time.time()))
        except Exception:  # called from websockets' data_received: must not raise
            logger.exception("internal error handling a ping from %s", session.remote)

    def _admit(self, connection: ServerConnection) -> None:
        """Right after accept: over the unauthenticated caps, drop the connection.

        Counting from the accept (not the HTTP request) also covers clients that
        connect and send nothing; dropping costs no read and no response.
        """
        host = _host_of(connection.remote_address)
        cap = self._pending.refusal(host)
        if cap is not None:
            self.relay.cap_hit(cap, time.time(), "refused a connection from %s", host)
            connection.transport.abort()
            return
        self._pending.add(host)
        self._admitted[connection] = host
        # Released at login or, whatever happens to the handshake, when the TCP
        # connection ends (websockets runs no handler for a failed handshake).
        connection.connection_lost_waiter.add_done_callback(lambda _: self._release(connection))

    def _release(self, connection: ServerConnection) -> None:
        host = self._admitted.pop(connection, None)
        if host is not None:
            self._pending.remove(host)

    async def _handle(self, connection: ServerConnection) -> None:
        session = _WsSession(connection, self.relay, self._queue_bytes, self.cluster)
        session.tls = self._ssl is not None
        self.relay.on_connect(session)
        self._session_of[connection] = session
        loop = asyncio.get_running_loop()
        writer = loop.create_task(session.write_loop())
        timer = loop.call_later(self._login_timeout, self._login_timed_out, session)
        try:
            await self._read_loop(connection, session)
        finally:
            timer.cancel()
            writer.cancel()
            self._release(connection)
            self._session_of.pop(connection, None)
            self.perform(self.relay.on_disconnect(session, _describe_close(connection)))

    def _login_timed_out(self, session: _WsSession) -> None:
        self.perform(self.relay.login_timed_out(session, self._login_timeout, time.time()))

    async def _login_frame(
        self, session: _WsSession, frame: bytes, cluster: ClusterActions
    ) -> list[Action]:
        """A signed login message, first claimed on the cluster: a replay to any server fails."""
        key = self.relay.login_replay_key(session, frame, time.time())
        if key is not None and not await cluster.claim_replay(key):
            return self.relay.refuse_replay(session, WsType(frame[0]).name, time.time())
        # The claim may have waited on NATS: the relay gets the time it ends.
        return self.relay.handle_frame(session, frame, time.time())

    def _junk_allowed(self, session: _WsSession, now: float) -> bool:
        """Whether ``session`` is within its junk_rate of dropped frames; counts it if not."""
        bucket = session.junk_bucket
        if bucket is None:
            bucket = session.junk_bucket = TokenBucket(self._junk_rate, 2 * self._junk_rate, now)
        if bucket.take(now):
            return True
        self.relay.cap_hit(
            "junk_rate", now, "reading %s more slowly: its frames are dropped", session.describe()
        )
        return False

    async def _read_loop(self, connection: ServerConnection, session: _WsSession) -> None:
        # Counted among the connections waiting to log in until it logs in or ends.
        pending_login = True
        try:
            budget = READ_BATCH
            async for message in connection:
                # Candy's server treats text and binary frames alike.
                frame = message.encode() if isinstance(message, str) else message
                now = time.time()
                dropped = session.dropped_frames
                if self.cluster is not None and frame and frame[0] in _LOGIN_TYPES:
                    self.perform(await self._login_frame(session, frame, self.cluster))
                else:
                    self.perform(self.relay.handle_frame(session, frame, now))
                if session.dropped_frames != dropped and not self._junk_allowed(session, now):
                    # Over its junk rate: stop reading this session for a while. Its
                    # unread frames fill the receive buffers and TCP stops the sender,
                    # so the flood costs neither our CPU nor the sender's; every other
                    # session is read as before. One long pause, not one per frame:
                    # a timer per junk frame would cost more than the frame.
                    await asyncio.sleep(JUNK_PAUSE)
                if pending_login and session.authenticated:
                    pending_login = False
                    self._release(connection)
                budget -= 1
                if budget == 0:
                    # recv() does not yield while frames are queued: without this, one
                    # client flooding the relay would hold the loop for whole batches.
                    budget = READ_BATCH
                    await asyncio.sleep(0)
                if session.closed:
                    # Rejected (or kicked): read nothing more. A client that keeps
                    # sending instead of answering the close would otherwise have
                    # every frame read and dispatched until the close times out;
                    # unread, they stop at the connection's bounded receive queue.
                    await session.wait_closed(REJECTED_CLOSE_TIMEOUT)
                    return
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == MESSAGE_TOO_BIG:
                self.relay.record_rejection(
                    session, "MESSAGE_TOO_BIG", f"frame larger than {MAX_FRAME_SIZE} bytes"
                )
