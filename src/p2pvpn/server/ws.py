"""The relay over WebSocket: each connection is a session of the sans-I/O :class:`Relay`.

:class:`RelayServer` reads frames, stamps them with the clock and hands them to
the relay, then performs the :class:`Send` and :class:`Close` actions it
returns. A session's send only queues and a writer task drains the queue, so
one slow or hostile client can never stall the event loop or another client.
"""

import asyncio
import contextlib
import ssl
import time
from typing import Any, cast

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from p2pvpn.server.relay import MAX_FRAME_SIZE, Action, Relay, RelaySession, Send

__all__ = [
    "DEFAULT_LOGIN_TIMEOUT",
    "RelayServer",
]

# A client that cannot answer the closing handshake must not hold up a
# shutdown or restart for websockets' default 10 s.
CLOSE_TIMEOUT = 2.0
# WebSocket close code websockets sends when a message exceeds max_size.
MESSAGE_TOO_BIG = 1009

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
# A connection that has not logged in by then only holds resources.
DEFAULT_LOGIN_TIMEOUT = 30.0
# A rejected client is no longer read; if its answer to the close frame does not
# arrive within this (it may sit behind unread frames), the connection is dropped.
REJECTED_CLOSE_TIMEOUT = 2.0
# Frames one connection may have handled before its reader lets other tasks run.
READ_BATCH = 16
# A TLS handshake that has not finished by then only holds a socket (asyncio's default: 60 s).
TLS_HANDSHAKE_TIMEOUT = 10.0


class _WsSession(RelaySession):
    """A WebSocket connection: send() queues, a writer task drains the queue."""

    def __init__(self, connection: ServerConnection, relay: Relay, queue_size: int) -> None:
        super().__init__(_format_remote(connection.remote_address))
        self._connection = connection
        self._relay = relay
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._close_task: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            # A client that does not read must not hold up anyone else.
            self._relay.count_drop("send_queue_full")

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
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self._queue.get()
                await self._connection.send(frame)


def _perform(actions: list[Action]) -> None:
    for action in actions:
        # The relay only names sessions it was given, and a RelayServer gives
        # it nothing but the _WsSessions it made.
        session = cast(_WsSession, action.session)
        if isinstance(action, Send):
            session.send(action.frame)
        else:
            session.close(action.code, action.reason)


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
        queue_size: int = DEFAULT_QUEUE_SIZE,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.relay = relay
        self._ssl = ssl_context  # wss:// when given
        self._host = host
        self._port = port
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._queue_size = queue_size
        self._login_timeout = login_timeout
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
            max_size=MAX_FRAME_SIZE,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            close_timeout=CLOSE_TIMEOUT,
            server_header=None,
            ssl=self._ssl,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._ssl is not None else None,
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

    async def _handle(self, connection: ServerConnection) -> None:
        session = _WsSession(connection, self.relay, self._queue_size)
        self.relay.on_connect(session)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(session.write_loop())
        timer = loop.call_later(self._login_timeout, self._login_timed_out, session)
        try:
            await self._read_loop(connection, session)
        finally:
            timer.cancel()
            writer.cancel()
            self.relay.on_disconnect(session, _describe_close(connection))

    def _login_timed_out(self, session: _WsSession) -> None:
        _perform(self.relay.login_timed_out(session, self._login_timeout))

    async def _read_loop(self, connection: ServerConnection, session: _WsSession) -> None:
        try:
            budget = READ_BATCH
            async for message in connection:
                # Candy's server treats text and binary frames alike.
                frame = message.encode() if isinstance(message, str) else message
                _perform(self.relay.handle_frame(session, frame, time.time()))
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
