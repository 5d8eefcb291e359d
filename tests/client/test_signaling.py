"""SignalingSession against fake servers on loopback (and once against the real relay).

No pytest-asyncio: every test is a sync function running one coroutine with
asyncio.run under an overall timeout. Nothing sleeps for a fixed time to
synchronise; tests wait for conditions with a deadline.
"""

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from p2pvpn.client import signaling as signaling_module
from p2pvpn.client.signaling import SignalingError, SignalingSession
from p2pvpn.client.store import StateStore
from p2pvpn.server.tls import (
    ServerTls,
    load_server_context,
    make_self_signed_certificate,
    write_certificate,
)
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import (
    Auth,
    Discovery,
    ExptTun,
    Forward,
    Hello,
    SystemRoute,
    SystemRoutes,
    UnknownWsMessage,
    Vmac,
    WsMessage,
    decode_ws_message,
)

PASSWORD = "correct horse"
STATIC = IPv4Interface("10.0.0.5/24")
GRANT = IPv4Interface("10.0.0.9/24")
NOW = 1_700_000_000.75
TEST_TIMEOUT = 20.0


def fixed_clock() -> float:
    return NOW


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), TEST_TIMEOUT)

    asyncio.run(bounded())


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def ipv4_packet(source: str, destination: str, payload: bytes = b"hello") -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        17,
        0,
        IPv4Address(source).packed,
        IPv4Address(destination).packed,
    )
    return header + payload


# -- test doubles ---------------------------------------------------------------


@dataclass
class Recorder:
    """A SignalingHandler that remembers what it was told."""

    logins: list[IPv4Interface] = field(default_factory=list)
    messages: list[WsMessage] = field(default_factory=list)
    disconnects: int = 0

    async def on_login(self, address: IPv4Interface) -> None:
        self.logins.append(address)

    def on_message(self, message: WsMessage) -> None:
        self.messages.append(message)

    def on_disconnected(self) -> None:
        self.disconnects += 1


@dataclass
class FakeConnection:
    ws: ServerConnection
    frames: list[bytes] = field(default_factory=list)
    closed: bool = False

    @property
    def messages(self) -> list[WsMessage]:
        return [decode_ws_message(frame) for frame in self.frames]

    async def receive(self) -> WsMessage:
        frame = await self.ws.recv()
        assert isinstance(frame, bytes)
        self.frames.append(frame)
        return decode_ws_message(frame)

    async def login(self, grant: IPv4Interface = GRANT, password: str = PASSWORD) -> Auth:
        """Play the server's side of the login; answers EXPTTUN with ``grant``."""
        while True:
            message = await self.receive()
            if isinstance(message, ExptTun):
                reply = ExptTun.create(password, grant, int(time.time()))
                await self.ws.send(reply.encode())
            if isinstance(message, Auth):
                return message

    async def drain(self) -> None:
        while True:
            await self.receive()


Script = Callable[[FakeConnection], Awaitable[None]]


async def accept(connection: FakeConnection) -> None:
    await connection.login()
    await connection.drain()


class FakeServer:
    """A WebSocket server on 127.0.0.1 whose behaviour per connection is a script."""

    def __init__(
        self, script: Script = accept, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.script = script
        self.connections: list[FakeConnection] = []
        self._port = port
        self._ssl = ssl_context
        self._server: Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/path"

    async def __aenter__(self) -> "FakeServer":
        self._server = await serve(
            self._handle, "127.0.0.1", self._port, compression=None, ssl=self._ssl
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        connection = FakeConnection(ws)
        self.connections.append(connection)
        try:
            await self.script(connection)
        except ConnectionClosed:
            pass
        finally:
            connection.closed = True


@dataclass
class SilentConnection:
    opened_at: float
    frames: list[tuple[float, Frame]] = field(default_factory=list)
    closed_at: float | None = None


class SilentServer:
    """Completes the WebSocket handshake, then reads and records but never writes again.

    Unlike a websockets server it does not even answer pings, like a server
    that hung or a path that black-holes one direction.
    """

    def __init__(self) -> None:
        self.connections: list[SilentConnection] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def __aenter__(self) -> "SilentServer":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        protocol = ServerProtocol()
        connection: SilentConnection | None = None
        try:
            while data := await reader.read(65536):
                protocol.receive_data(data)
                for event in protocol.events_received():
                    if isinstance(event, Request):
                        protocol.send_response(protocol.accept(event))
                        writer.writelines(protocol.data_to_send())
                        connection = SilentConnection(opened_at=loop.time())
                        self.connections.append(connection)
                    elif isinstance(event, Frame) and connection is not None:
                        connection.frames.append((loop.time(), event))
        except ConnectionError:
            pass
        finally:
            if connection is not None:
                connection.closed_at = loop.time()
            writer.close()


def make_session(
    url: str,
    tmp_path: Path,
    handler: Recorder,
    *,
    static: IPv4Interface | None = STATIC,
    **options: Any,
) -> SignalingSession:
    options.setdefault("reconnect_initial", 0.01)
    options.setdefault("reconnect_max", 0.05)
    return SignalingSession(
        url, PASSWORD, static, StateStore(tmp_path / "state"), handler, **options
    )


@contextlib.asynccontextmanager
async def running(session: SignalingSession) -> AsyncIterator["asyncio.Task[None]"]:
    """Run the session in a task; close it (and check run() returned) on the way out."""
    task = asyncio.create_task(session.run())
    try:
        yield task
    finally:
        await asyncio.wait_for(session.close(), 5)
        assert task.done()
        if not task.cancelled() and task.exception() is None:
            assert session.state == "disconnected"


async def run_until_fatal(session: SignalingSession) -> SignalingError:
    with pytest.raises(SignalingError) as caught:
        await asyncio.wait_for(session.run(), 10)
    assert session.state == "disconnected"
    return caught.value


# -- login ------------------------------------------------------------------------


def test_static_login_sends_vmac_then_auth(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler, clock=fixed_clock)
            async with running(session):
                await wait_until(lambda: handler.logins == [STATIC], "login")
                assert session.state == "connected"
                assert session.address == STATIC
                assert session.connected_since == NOW
                assert session.reconnects == 0
            vmac, auth, hello = server.connections[0].messages

        assert isinstance(vmac, Vmac) and isinstance(auth, Auth)
        assert hello == Hello(exit_node=False)  # after AUTH: a p2pvpn server sends NAMES
        assert vmac.vmac == StateStore(tmp_path / "state").vmac()
        assert vmac.timestamp == int(NOW) and vmac.verify(PASSWORD)
        assert auth.tun_ip == STATIC.ip and auth.timestamp == int(NOW)
        assert auth.verify(PASSWORD)
        assert len(server.connections) == 1
        assert handler.disconnects == 1
        assert session.stats.frames_out == 3

    run(test)


@pytest.mark.parametrize("last", [None, IPv4Interface("10.0.0.7/24")])
def test_dynamic_login_requests_the_last_address_and_uses_the_grant(
    tmp_path: Path, last: IPv4Interface | None
) -> None:
    async def test() -> None:
        store = StateStore(tmp_path / "state")
        if last is not None:
            store.save_address(last)
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler, static=None, clock=fixed_clock)
            async with running(session):
                await wait_until(lambda: handler.logins == [GRANT], "login")
                assert session.address == GRANT
            vmac, request, auth, _ = server.connections[0].messages

        assert isinstance(vmac, Vmac) and vmac.verify(PASSWORD)
        assert isinstance(request, ExptTun) and request.verify(PASSWORD)
        assert request.cidr == (last or IPv4Interface("0.0.0.0/0"))
        assert request.timestamp == int(NOW)
        assert isinstance(auth, Auth) and auth.verify(PASSWORD)
        assert auth.tun_ip == GRANT.ip
        assert StateStore(tmp_path / "state").last_address() == GRANT

    run(test)


def test_grant_with_a_bad_hash_is_fatal(tmp_path: Path) -> None:
    async def test() -> None:
        async def wrong_password(connection: FakeConnection) -> None:
            await connection.login(password="another password")

        async with FakeServer(wrong_password) as server:
            session = make_session(server.url, tmp_path, Recorder(), static=None)
            error = await run_until_fatal(session)
            assert "password is wrong" in str(error)
            assert not any(isinstance(m, Auth) for m in server.connections[0].messages)
            assert StateStore(tmp_path / "state").last_address() is None

    run(test)


@pytest.mark.parametrize(
    ("grant", "problem"),
    [
        ("10.0.0.0/24", "network or broadcast address"),
        ("10.0.0.9/7", "prefix shorter than /8"),
        ("10.0.0.9/0", "prefix shorter than /8"),
    ],
)
def test_unusable_grant_is_refused_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, grant: str, problem: str
) -> None:
    # The cidr is not covered by the grant's hash: a forged one must not stop the client.
    async def test() -> None:
        handler = Recorder()

        async def bad_then_good(connection: FakeConnection) -> None:
            first = len(server.connections) == 1
            await connection.login(grant=IPv4Interface(grant) if first else GRANT)
            await connection.drain()

        async with FakeServer(bad_then_good) as server:
            session = make_session(server.url, tmp_path, handler, static=None)
            async with running(session):
                await wait_until(lambda: handler.logins == [GRANT], "a login with a good grant")
            assert not any(isinstance(m, Auth) for m in server.connections[0].messages)
            assert session.reconnects == 0

    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.signaling"):
        run(test)
    assert f"granted the address {grant}, which" in caplog.text
    assert problem in caplog.text and "retrying" in caplog.text
    assert StateStore(tmp_path / "state").last_address() == GRANT


def test_a_grant_in_another_network_than_last_time_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    StateStore(tmp_path / "state").save_address(IPv4Interface("10.9.0.4/24"))

    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler, static=None)
            async with running(session):
                await wait_until(lambda: handler.logins == [GRANT], "the login")

    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.signaling"):
        run(test)
    assert "granted 10.0.0.9/24 in the network 10.0.0.0/24" in caplog.text
    assert "last time we had 10.9.0.4/24 in 10.9.0.0/24" in caplog.text


def test_missing_grant_times_out_and_retries(tmp_path: Path) -> None:
    async def test() -> None:
        async def never_grant(connection: FakeConnection) -> None:
            await connection.drain()

        async with FakeServer(never_grant) as server:
            session = make_session(server.url, tmp_path, Recorder(), static=None, login_timeout=0.1)
            async with running(session):
                await wait_until(lambda: len(server.connections) >= 2, "a second attempt")

    run(test)


# -- refusals ---------------------------------------------------------------------


def close_after_login(code: int, reason: str = "") -> Script:
    async def script(connection: FakeConnection) -> None:
        await connection.login()
        await connection.ws.close(code, reason)

    return script


def test_authentication_failure_is_fatal(tmp_path: Path) -> None:
    async def test() -> None:
        async with FakeServer(close_after_login(CloseCode.AUTHENTICATION_FAILED)) as server:
            error = await run_until_fatal(make_session(server.url, tmp_path, Recorder()))
        assert "password" in str(error)

    run(test)


def test_repeated_kicks_are_fatal_and_name_the_address(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer(close_after_login(CloseCode.KICKED, "replaced")) as server:
            error = await run_until_fatal(make_session(server.url, tmp_path, handler))
        assert "same address" in str(error)
        assert str(STATIC) in str(error)
        assert "replaced" in str(error)
        assert "3 times in a row" in str(error)
        assert handler.logins == [STATIC] * 3 and handler.disconnects == 3

    run(test)


@pytest.mark.parametrize("code", [CloseCode.KICKED, CloseCode.ADDRESS_REFUSED])
def test_a_single_kick_or_refusal_is_retried_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: CloseCode
) -> None:
    async def test() -> None:
        handler = Recorder()

        async def once_then_accept(connection: FakeConnection) -> None:
            await connection.login()
            if len(server.connections) == 1:
                await connection.ws.close(code, "someone else")
            await connection.drain()

        async with FakeServer(once_then_accept) as server:
            session = make_session(server.url, tmp_path, handler)
            async with running(session) as task:
                await wait_until(lambda: len(handler.logins) == 2, "the second login")
                assert not task.done()

    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.signaling"):
        run(test)
    assert "someone else" in caplog.text and "retrying" in caplog.text


def test_two_refusals_then_a_stable_login_reset_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("p2pvpn.client.signaling.STABLE_LOGIN", 0.2)

    async def test() -> None:
        handler = Recorder()
        # Kicked at once twice, then after a stable login (which starts the count
        # afresh), then at once again: never three in a row without a stable login.
        pattern = [0.0, 0.0, 0.4, 0.0, None]

        async def script(connection: FakeConnection) -> None:
            await connection.login()
            hold = pattern[len(server.connections) - 1]
            if hold is None:
                await connection.drain()
            await asyncio.sleep(hold)
            await connection.ws.close(CloseCode.KICKED, "replaced")

        async with FakeServer(script) as server:
            session = make_session(server.url, tmp_path, handler)
            async with running(session) as task:
                await wait_until(lambda: len(handler.logins) == 5, "the fifth login", 8.0)
                assert not task.done()

    run(test)


def test_a_replayed_login_between_kicks_does_not_end_the_run(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        # Kicked, refused as a replay (the other client of the same address logged
        # in within the same second), kicked, kicked: the third kick is fatal.
        closes = [CloseCode.KICKED, CloseCode.STALE_OR_REPLAYED, CloseCode.KICKED, CloseCode.KICKED]

        async def script(connection: FakeConnection) -> None:
            await connection.login()
            await connection.ws.close(closes[len(server.connections) - 1], "replaced")

        async with FakeServer(script) as server:
            error = await run_until_fatal(make_session(server.url, tmp_path, handler))
        assert "3 times in a row" in str(error)
        assert len(server.connections) == 4

    run(test)


def test_address_refused_during_login_three_times_is_fatal(tmp_path: Path) -> None:
    async def test() -> None:
        async def refuse(connection: FakeConnection) -> None:
            await connection.receive()  # VMAC
            await connection.receive()  # EXPTTUN
            await connection.ws.close(CloseCode.ADDRESS_REFUSED, "range exhausted")

        async with FakeServer(refuse) as server:
            session = make_session(server.url, tmp_path, Recorder(), static=None)
            error = await run_until_fatal(session)
        assert "address refused" in str(error)

    run(test)


def test_stale_login_is_retried_with_an_error_about_the_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        async def stale_once(connection: FakeConnection) -> None:
            if len(server.connections) == 1:
                await connection.login()
                await connection.ws.close(CloseCode.STALE_OR_REPLAYED, "stale")
            else:
                await accept(connection)

        handler = Recorder()
        async with FakeServer(stale_once) as server:
            session = make_session(server.url, tmp_path, handler, clock=fixed_clock)
            async with running(session):
                await wait_until(lambda: len(handler.logins) == 2, "the second login")
                assert session.reconnects == 1
            first, second = (c.messages[0] for c in server.connections)

        assert any(r.levelno == logging.ERROR and "clock" in r.message for r in caplog.records)
        # Even with a frozen clock the second login must not repeat the first one's hashes.
        assert isinstance(first, Vmac) and isinstance(second, Vmac)
        assert second.timestamp > first.timestamp and second.hash != first.hash

    run(test)


@pytest.mark.parametrize("abort", [False, True], ids=["close-1000", "tcp-drop"])
def test_three_plain_closes_right_after_login_are_fatal(tmp_path: Path, abort: bool) -> None:
    async def test() -> None:
        async def candy_refusal(connection: FakeConnection) -> None:
            await connection.login()
            if abort:
                connection.ws.transport.abort()
            else:
                await connection.ws.close()

        async with FakeServer(candy_refusal) as server:
            error = await run_until_fatal(make_session(server.url, tmp_path, Recorder()))
            assert "3 times in a row" in str(error)
            assert "wrong password" in str(error)
            assert len(server.connections) == 3

    run(test)


def test_three_plain_closes_during_dynamic_login_are_fatal(tmp_path: Path) -> None:
    async def test() -> None:
        async def no_dhcp(connection: FakeConnection) -> None:
            await connection.receive()  # VMAC
            await connection.receive()  # EXPTTUN: a Candy server without dhcp closes
            await connection.ws.close()

        async with FakeServer(no_dhcp) as server:
            session = make_session(server.url, tmp_path, Recorder(), static=None)
            error = await run_until_fatal(session)
            assert "3 times in a row" in str(error)
            assert len(server.connections) == 3

    run(test)


def test_a_frame_after_login_resets_the_early_close_count(tmp_path: Path) -> None:
    async def test() -> None:
        async def talk_then_close(connection: FakeConnection) -> None:
            await connection.login()
            await connection.ws.send(Discovery(IPv4Address("10.0.0.8"), STATIC.ip).encode())
            await connection.ws.close()

        async with FakeServer(talk_then_close) as server:
            session = make_session(server.url, tmp_path, Recorder())
            async with running(session):
                await wait_until(lambda: len(server.connections) >= 5, "five connections")

    run(test)


def test_unreachable_server_is_retried_with_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls: list[str] = []

    async def test() -> None:
        async with FakeServer() as server:
            urls.append(server.url)  # the port is free again once the server is gone
        session = make_session(urls[0], tmp_path, Recorder())
        async with running(session):
            await wait_until(lambda: len(warnings()) >= 3, "three warnings")
            assert session.state in ("connecting", "disconnected")

    def records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "p2pvpn.client.signaling"]

    def warnings() -> list[str]:
        return [r.message for r in records() if r.levelno == logging.WARNING]

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    assert all(message.startswith(f"cannot connect to {urls[0]}") for message in warnings())
    assert any("reconnecting in" in r.message for r in records())


def test_password_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with FakeServer(close_after_login(CloseCode.AUTHENTICATION_FAILED)) as server:
            await run_until_fatal(make_session(server.url, tmp_path, Recorder(), static=None))

    with caplog.at_level(logging.DEBUG):
        run(test)
    assert caplog.records
    assert PASSWORD not in caplog.text


# -- reconnecting and keepalive ---------------------------------------------------


def test_reconnects_after_the_server_comes_back(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as first:
            port = first.port
            session = make_session(first.url, tmp_path, handler, static=None)
            task = asyncio.create_task(session.run())
            await wait_until(lambda: handler.logins == [GRANT], "the first login")
        # The server is gone: the session notices and keeps trying.
        await wait_until(lambda: handler.disconnects == 1, "the disconnect")
        assert session.connected_since is None
        async with FakeServer(port=port) as second:
            await wait_until(lambda: len(handler.logins) == 2, "the second login")
            assert session.state == "connected"
            assert session.reconnects == 1
            request = second.connections[0].messages[1]
            assert isinstance(request, ExptTun) and request.cidr == GRANT  # asks for it back
            await session.close()
            await asyncio.wait_for(task, 5)

    run(test)


def test_failed_attempts_are_counted_until_a_login(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as probe:
            url, port = probe.url, probe.port
        session = make_session(url, tmp_path, handler, clock=fixed_clock)
        assert (session.failed_attempts, session.retrying_since) == (0, None)
        task = asyncio.create_task(session.run())
        # Nobody listens yet: `status` must see the attempts, not "reconnects: 0" alone.
        await wait_until(lambda: session.failed_attempts >= 2, "two failed attempts")
        assert session.retrying_since == NOW
        assert session.reconnects == 0
        async with FakeServer(port=port):
            await wait_until(lambda: handler.logins == [STATIC], "the login")
            assert (session.failed_attempts, session.retrying_since) == (0, None)
            await session.close()
            await asyncio.wait_for(task, 5)

    run(test)


def test_silent_server_is_pinged_then_given_up(tmp_path: Path) -> None:
    idle, silence = 0.2, 0.6

    async def test() -> None:
        handler = Recorder()
        async with SilentServer() as server:
            session = make_session(
                server.url, tmp_path, handler, idle_timeout=idle, silence_timeout=silence
            )
            async with running(session):
                await wait_until(lambda: len(server.connections) >= 2, "a reconnect", 10)
            first = server.connections[0]

        assert first.closed_at is not None
        opcodes = [frame.opcode for _, frame in first.frames]
        assert opcodes[:2] == [Opcode.BINARY, Opcode.BINARY]  # VMAC, AUTH
        assert Opcode.PING in opcodes
        ping_at = next(at for at, frame in first.frames if frame.opcode is Opcode.PING)
        assert ping_at - first.opened_at >= idle * 0.9
        assert first.closed_at - first.opened_at >= silence * 0.9
        assert session.stats.pings_sent >= 1
        assert handler.disconnects >= 1
        assert len(handler.logins) >= 2

    run(test)


def test_pongs_keep_a_quiet_connection_alive(tmp_path: Path) -> None:
    async def test() -> None:
        async with FakeServer() as server:
            session = make_session(
                server.url, tmp_path, Recorder(), idle_timeout=0.05, silence_timeout=0.15
            )
            async with running(session):
                # Many idle periods, each answered by a pong, and several silence timeouts long.
                await wait_until(lambda: session.stats.pings_sent >= 8, "eight pings")
                assert len(server.connections) == 1
                assert session.state == "connected"

    run(test)


# -- messages -----------------------------------------------------------------------


def test_messages_after_login_reach_the_handler(tmp_path: Path) -> None:
    peer = IPv4Address("10.0.0.8")
    packet = ipv4_packet("10.0.0.8", "10.0.0.5")
    sent: list[WsMessage] = [
        ExptTun.create(PASSWORD, GRANT, 1),  # unsolicited: handed on, the node ignores it
        Discovery(peer, IPv4Address("255.255.255.255")),
        SystemRoutes(
            (SystemRoute(IPv4Address("192.168.1.0"), IPv4Address("255.255.255.0"), peer),)
        ),
        Forward(packet),
        UnknownWsMessage(77, b"future"),
    ]

    async def test() -> None:
        async def chatty(connection: FakeConnection) -> None:
            await connection.login()
            await connection.ws.send(b"\x03\x01")  # truncated UDP4CONN: dropped, counted
            for message in sent:
                await connection.ws.send(message.encode())
            await connection.drain()

        handler = Recorder()
        async with FakeServer(chatty) as server:
            session = make_session(server.url, tmp_path, handler)
            async with running(session):
                await wait_until(lambda: len(handler.messages) == len(sent), "the messages")
                assert session.state == "connected"  # the malformed frame did no harm

        assert handler.messages == sent
        assert session.stats.frames_malformed == 1
        assert session.stats.frames_in == 6
        assert session.stats.relay_packets_in == 1
        assert session.stats.relay_bytes_in == len(packet)

    run(test)


def test_send_while_disconnected_drops_and_counts(tmp_path: Path) -> None:
    session = make_session("ws://127.0.0.1:9/", tmp_path, Recorder())
    assert session.state == "disconnected"
    assert session.send_frames([b"\x05" + bytes(8), b"\x05" + bytes(8)]) == 0
    assert session.send_forward_packets([ipv4_packet("10.0.0.5", "10.0.0.8")]) == 0
    assert not session.send(Discovery(STATIC.ip, IPv4Address("10.0.0.8")))
    assert session.stats.frames_dropped == 4
    assert session.stats.frames_out == 0


def test_frames_sent_while_connected_reach_the_server(tmp_path: Path) -> None:
    packets = [ipv4_packet("10.0.0.5", "10.0.0.8", bytes(n)) for n in (1, 100)]

    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler)
            async with running(session):
                await wait_until(lambda: handler.logins == [STATIC], "login")
                assert session.send(Discovery(STATIC.ip, IPv4Address("10.0.0.8")))
                assert session.send_forward_packets(packets) == 2
                await wait_until(lambda: len(server.connections[0].frames) == 6, "the frames")
            messages = server.connections[0].messages

        assert messages[3] == Discovery(STATIC.ip, IPv4Address("10.0.0.8"))
        assert messages[4:] == [Forward(packet) for packet in packets]
        assert session.stats.relay_packets_out == 2
        assert session.stats.relay_bytes_out == sum(map(len, packets))
        assert session.stats.frames_out == 6
        assert session.stats.frames_dropped == 0

    run(test)


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler)
            async with running(session):
                await wait_until(lambda: handler.logins == [STATIC], "login")
                # Synchronous calls: the writer cannot run in between, so the queue fills up.
                frames = [b"\x05" + bytes(8)] * 3000
                queued = session.send_frames(frames)
                assert 0 < queued < 3000
                assert session.stats.frames_dropped == 3000 - queued

    run(test)


# -- close --------------------------------------------------------------------------


def test_close_ends_run_and_closes_cleanly(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with FakeServer() as server:
            session = make_session(server.url, tmp_path, handler)
            task = asyncio.create_task(session.run())
            await wait_until(lambda: handler.logins == [STATIC], "login")
            await session.close()
            assert task.done() and task.exception() is None
            await wait_until(lambda: server.connections[0].closed, "the server side to close")
            assert server.connections[0].ws.close_code == 1000
        assert handler.disconnects == 1
        assert session.state == "disconnected"
        assert session.connected_since is None

    run(test)


def test_close_while_waiting_to_reconnect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        session = make_session(
            "ws://127.0.0.1:9/", tmp_path, Recorder(), reconnect_initial=60, reconnect_max=60
        )
        task = asyncio.create_task(session.run())
        await wait_until(lambda: "reconnecting in" in caplog.text, "a failed attempt")
        assert session.state == "disconnected"
        await session.close()
        assert task.done() and task.exception() is None

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)


def test_invalid_url_is_a_signaling_error(tmp_path: Path) -> None:
    with pytest.raises(SignalingError, match="invalid server URL"):
        make_session("http://user:secret@example.com/", tmp_path, Recorder())


# -- TLS ------------------------------------------------------------------------------


def self_signed_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and its file."""
    cert_file, key_file = write_certificate(make_self_signed_certificate(), directory)
    context, _ = load_server_context(cert_file, key_file)
    return context, cert_file


def signaling_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.message
        for r in caplog.records
        if r.name == "p2pvpn.client.signaling" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("trust", ["system", "tls_ca", "no-verify"])
def test_tls_certificates_are_verified_unless_opted_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, trust: str
) -> None:
    """Refused as untrusted (and retried) by default; trusted through tls_ca; or not verified."""
    server_context, cert_file = self_signed_context(tmp_path)
    options: dict[str, Any] = {
        "system": {},
        "tls_ca": {"tls_ca": cert_file},
        "no-verify": {"tls_verify": False},
    }[trust]

    async def test() -> None:
        handler = Recorder()
        async with FakeServer(ssl_context=server_context) as server:
            url = f"wss://127.0.0.1:{server.port}/"
            session = make_session(url, tmp_path, handler, **options)
            async with running(session):
                if trust == "system":
                    await wait_until(
                        lambda: len(signaling_warnings(caplog)) >= 2, "two refused attempts"
                    )
                    assert handler.logins == []
                    assert server.connections == []
                else:
                    await wait_until(lambda: handler.logins == [STATIC], "login")

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    warnings = signaling_warnings(caplog)
    if trust == "system":
        assert "the server's TLS certificate is not trusted: self-signed certificate" in warnings[1]
        assert "tls_ca = FILE" in warnings[1]
    elif trust == "tls_ca":
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith("TLS certificate verification is disabled for wss://127.0.0.1:")


def test_tls_ca_of_another_server_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tls_ca replaces the system's CAs: only what it holds is trusted."""
    server_context, _ = self_signed_context(tmp_path)
    other_cert, _ = write_certificate(make_self_signed_certificate(), tmp_path, "other")

    async def test() -> None:
        async with FakeServer(ssl_context=server_context) as server:
            url = f"wss://127.0.0.1:{server.port}/"
            session = make_session(url, tmp_path, Recorder(), tls_ca=other_cert)
            async with running(session):
                await wait_until(lambda: signaling_warnings(caplog) != [], "a refused attempt")

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    assert "is not trusted" in signaling_warnings(caplog)[0]


def test_tls_to_a_plain_server_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def answer_in_plain_http(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def test() -> None:
        server = await asyncio.start_server(answer_in_plain_http, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            session = make_session(f"wss://127.0.0.1:{port}/", tmp_path, Recorder())
            async with running(session):
                await wait_until(lambda: signaling_warnings(caplog) != [], "a refused attempt")

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    assert "TLS handshake failed" in signaling_warnings(caplog)[0]


def test_an_unusable_tls_ca_is_a_signaling_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(SignalingError, match=f"tls_ca {missing}: cannot load"):
        make_session("wss://127.0.0.1:1/", tmp_path, Recorder(), tls_ca=missing)


PLAIN_WARNING = "is plain ws://: relayed packets, routes and address grants"


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("[::1]", False),
        ("localhost", False),
        ("[::ffff:127.0.0.1]", False),
        ("192.0.2.1", True),
        ("[2001:db8::1]", True),
        ("vpn.example.org", True),
    ],
)
def test_plain_ws_is_warned_about_once_unless_loopback(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    warned: bool,
) -> None:
    """Judged from the URL: run() warns once however often it reconnects."""
    warnings: list[str] = []

    async def refused(url: str, **_: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    # No packet may leave for these hosts: every attempt is refused here.
    monkeypatch.setattr(signaling_module, "connect", refused)

    async def test() -> None:
        session = make_session(f"ws://{host}:8080/", tmp_path, Recorder())
        async with running(session):
            await wait_until(lambda: session.failed_attempts >= 2, "two attempts", timeout=15)
        warnings.extend(w for w in signaling_warnings(caplog) if PLAIN_WARNING in w)

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "login hashes let an eavesdropper guess the password offline" in warnings[0]


# -- against the real relay -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ws", "wss-tls_ca", "wss-no-verify"])
def test_two_sessions_through_the_real_relay(tmp_path: Path, transport: str) -> None:
    """Over ws://, over wss:// trusted through tls_ca, and unverified like Candy's client."""
    relay_module = pytest.importorskip("p2pvpn.server")
    server_tls = None
    options: dict[str, Any] = {}
    if transport != "ws":
        server_tls = ServerTls(*write_certificate(make_self_signed_certificate(), tmp_path))
        if transport == "wss-tls_ca":
            options["tls_ca"] = server_tls.cert_file
        else:
            options["tls_verify"] = False

    async def test() -> None:
        relay = relay_module.Relay(PASSWORD, dhcp=IPv4Network("10.9.0.0/24"))
        context = server_tls.listener if server_tls is not None else None
        async with relay_module.RelayServer(relay, "127.0.0.1", 0, ssl_context=context) as server:
            scheme = "ws" if server_tls is None else "wss"
            url = f"{scheme}://127.0.0.1:{server.port}/"
            alice, bob = Recorder(), Recorder()
            a = make_session(url, tmp_path / "a", alice, static=None, **options)
            b = make_session(url, tmp_path / "b", bob, static=None, **options)
            async with running(a), running(b):
                await wait_until(lambda: bool(alice.logins and bob.logins), "both logins")
                # A login is announced once AUTH is sent; Candy's server never
                # acknowledges it, so wait until the relay has taken both.
                await wait_until(
                    lambda: relay.stats()["sessions_authenticated"] == 2, "both sessions"
                )
                a_address, b_address = alice.logins[0], bob.logins[0]
                assert a_address != b_address
                assert a_address.network == b_address.network == IPv4Network("10.9.0.0/24")
                packet = ipv4_packet(str(a_address.ip), str(b_address.ip), b"ping")
                assert a.send_forward_packets([packet]) == 1
                await wait_until(lambda: Forward(packet) in bob.messages, "the relayed packet")

    run(test)
