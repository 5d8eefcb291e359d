"""The session's part in names (issue 16): HELLO after AUTH, our name on every ping."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from p2pvpn.wire.names import encode_ping_payload
from p2pvpn.wire.ws import BROADCAST, Auth, Hello, NameAnnouncement
from tests.client.test_signaling import (
    STATIC,
    FakeConnection,
    Recorder,
    make_session,
    run,
    running,
    wait_until,
)

PAYLOAD = encode_ping_payload("laptop", "9.9")


class PingRecorder(ServerConnection):
    """A server connection that keeps the payload of every ping it receives."""

    pings: list[bytes]

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode == Opcode.PING:
            self.pings.append(bytes(event.data))
        super().process_event(event)


@asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[str, list[bytes], list[FakeConnection]]]:
    pings: list[bytes] = []
    connections: list[FakeConnection] = []

    async def handle(ws: ServerConnection) -> None:
        connection = FakeConnection(ws)
        connections.append(connection)
        with suppress(ConnectionClosed):
            await connection.login()
            await connection.drain()

    def connection_factory(*args: Any, **kwargs: Any) -> PingRecorder:
        connection = PingRecorder(*args, **kwargs)
        connection.pings = pings
        return connection

    async with serve(
        handle, "127.0.0.1", 0, compression=None, create_connection=connection_factory
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/", pings, connections


def test_hello_follows_auth_and_the_name_is_pinged_at_login(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with recording_server() as (url, pings, connections):
            session = make_session(url, tmp_path, handler, ping_payload=PAYLOAD, exit_node=True)
            async with running(session):
                await wait_until(lambda: handler.logins == [STATIC], "login")
                await wait_until(lambda: pings == [PAYLOAD], "the identity ping")
                await wait_until(lambda: len(connections[0].frames) == 3, "HELLO")
                _, auth, hello = connections[0].messages
                assert isinstance(auth, Auth)
                assert hello == Hello(exit_node=True)

                session.set_ping_payload(PAYLOAD)  # unchanged: nothing sent
                renamed = encode_ping_payload("desktop", "9.9")
                session.set_ping_payload(renamed)
                await wait_until(lambda: pings[-1:] == [renamed], "the new name at once")

                session.set_exit_node(False)
                await wait_until(lambda: len(connections[0].frames) == 4, "a second HELLO")
                assert connections[0].messages[-1] == Hello(exit_node=False)
            assert session.stats.pings_sent >= 2

    run(test)


def test_keepalive_pings_carry_the_name(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with recording_server() as (url, pings, _):
            session = make_session(
                url,
                tmp_path,
                handler,
                ping_payload=PAYLOAD,
                idle_timeout=0.05,
                silence_timeout=0.15,
            )
            async with running(session):
                await wait_until(lambda: len(pings) >= 4, "keepalive pings")
            assert set(pings) == {PAYLOAD}

    run(test)


def test_without_a_payload_pings_are_plain(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with recording_server() as (url, pings, _):
            session = make_session(url, tmp_path, handler, idle_timeout=0.05, silence_timeout=0.15)
            async with running(session):
                await wait_until(lambda: len(pings) >= 2, "keepalive pings")
            assert all(not ping.startswith(b"candy::") for ping in pings)

    run(test)


def test_flush_lets_the_last_words_out_before_close(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        async with recording_server() as (url, _, connections):
            session = make_session(url, tmp_path, handler)
            async with running(session):
                await wait_until(lambda: handler.logins == [STATIC], "login")
                leaving = NameAnnouncement(STATIC.ip, BROADCAST, "")
                for _ in range(50):
                    assert session.send(leaving)
                await session.flush(5.0)
                await session.close()
            await wait_until(lambda: len(connections[0].frames) == 3 + 50, "every frame")
            await session.flush(1.0)  # not connected: returns at once

    run(test)
