"""The WebSocket server's caps over real connections on loopback.

Connections that have not logged in (in all and per source address, counted
from the TCP accept, dropped over the cap), the login deadline and the
byte-bounded send queue, each driven past its limit while a well-behaved
client logs in and gets a relayed frame. Sources other than 127.0.0.1 are
other loopback addresses (127.0.0.0/8 is all local).
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Network

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from p2pvpn.server import ws as ws_module
from p2pvpn.server.limits import ServerLimits
from p2pvpn.server.relay import Relay
from p2pvpn.server.ws import RelayServer
from p2pvpn.wire.close_codes import CloseCode
from tests.server import (
    PASSWORD,
    VMAC_A,
    VMAC_B,
    auth_frame,
    forward,
    ip,
    vmac_frame,
    wait_until,
)

DHCP = IPv4Network("10.77.0.0/24")
# Generous: the machine may be busy with other tests; nothing here is timed.
DEADLINE = 30.0


async def open_idle(server: RelayServer, source: str) -> ClientConnection:
    """A connection from ``source`` that completes the handshake and never logs in."""
    return await connect(f"ws://127.0.0.1:{server.port}/", compression=None, local_addr=(source, 0))


# A connection over the caps is dropped right after accept: the client sees the
# connection reset or closed before any HTTP response.
REFUSED = (OSError, EOFError, InvalidHandshake)


async def assert_refused(server: RelayServer, source: str) -> None:
    with pytest.raises(REFUSED):
        connection = await open_idle(server, source)
        # Not refused: keep it open so that the count stays as it was.
        pytest.fail(f"connection from {source} accepted: {connection}")


async def good_client_login(server: RelayServer, tun_ip: str, vmac: str) -> ClientConnection:
    """Connect from 127.0.0.1 and log in, retrying a refused handshake until the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            connection = await connect(f"ws://127.0.0.1:{server.port}/", compression=None)
            break
        except REFUSED:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    now = int(time.time())
    await connection.send(vmac_frame(vmac, now))
    await connection.send(auth_frame(tun_ip, now))
    await wait_until(lambda: server.relay.session_for(ip(tun_ip)) is not None, DEADLINE)
    return connection


async def assert_relayed(a: ClientConnection, b: ClientConnection) -> None:
    frame = forward("10.77.0.1", "10.77.0.2", b"still-served")
    await a.send(frame)
    assert await asyncio.wait_for(b.recv(), DEADLINE) == frame


@contextlib.asynccontextmanager
async def serving(**limits: float) -> AsyncIterator[RelayServer]:
    relay = Relay(PASSWORD, dhcp=DHCP)
    server = RelayServer(relay, "127.0.0.1", 0, limits=ServerLimits(**limits))  # type: ignore[arg-type]
    async with server:
        yield server


async def close_all(connections: list[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)


def test_the_per_address_cap_drops_extra_connections_and_others_still_log_in() -> None:
    async def scenario() -> None:
        async with serving(max_unauthenticated_per_ip=3, login_timeout=60.0) as server:
            idle = [await open_idle(server, "127.0.0.2") for _ in range(3)]
            for _ in range(5):
                await assert_refused(server, "127.0.0.2")
            assert server.pending_logins == 3
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            await assert_relayed(a, b)
            limits = server.relay.stats()["limits"]
            assert limits == {"unauthenticated_per_ip": 5}
            # Logged-in clients no longer count; closed idle ones free their slot.
            assert server.pending_logins == 3
            await close_all(idle)
            await wait_until(lambda: server.pending_logins == 0, DEADLINE)
            await open_idle(server, "127.0.0.2")
            await close_all([a, b])


def test_a_connection_that_never_sends_its_request_is_counted_and_dropped() -> None:
    """A bare TCP connection (no HTTP request) holds a slot until the login deadline."""

    async def scenario() -> None:
        async with serving(max_unauthenticated_per_ip=2, login_timeout=0.5) as server:
            port = server.port
            bare = [
                await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
                for _ in range(2)
            ]
            await wait_until(lambda: server.pending_logins == 2, DEADLINE)
            await assert_refused(server, "127.0.0.2")
            # websockets' open timeout (the login deadline) drops them and frees the slots.
            for reader, _ in bare:
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            await wait_until(lambda: server.pending_logins == 0, DEADLINE)
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            await assert_relayed(a, b)
            for _, writer in bare:
                writer.close()
            await close_all([a, b])

    asyncio.run(scenario())


def test_the_global_cap_refuses_everyone_until_the_login_deadline_frees_slots() -> None:
    async def scenario() -> None:
        async with serving(max_unauthenticated=4, login_timeout=0.5) as server:
            idle = [await open_idle(server, f"127.0.0.{2 + n}") for n in range(4)]
            await assert_refused(server, "127.0.0.9")
            # The good client is refused too at first, and gets in once the
            # deadline closed the idle connections (4006) and freed their slots.
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            await assert_relayed(a, b)
            for connection in idle:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(connection.recv(), DEADLINE)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == CloseCode.NOT_AUTHENTICATED
            limits = server.relay.stats()["limits"]
            assert limits["unauthenticated"] >= 1
            assert limits["login_timeout"] == 4
            await close_all([a, b])

    asyncio.run(scenario())


def test_the_default_login_deadline_is_five_seconds() -> None:
    assert ServerLimits().login_timeout == 5.0
    assert ws_module.DEFAULT_LOGIN_TIMEOUT == 5.0


def test_a_flood_of_silent_connections_is_closed_while_a_client_logs_in() -> None:
    async def scenario() -> None:
        async with serving(login_timeout=0.3) as server:
            idle = [await open_idle(server, "127.0.0.2") for _ in range(20)]
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            await wait_until(lambda: server.pending_logins == 0, DEADLINE)
            await assert_relayed(a, b)
            assert server.relay.stats()["limits"]["login_timeout"] == 20
            await close_all([*idle, a, b])

    asyncio.run(scenario())


def test_a_client_that_stops_reading_is_closed_and_others_are_still_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ws_module, "SEND_QUEUE_STALL", 0.3)

    async def scenario() -> None:
        async with serving(send_queue_bytes=65536) as server:
            relay = server.relay
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            # max_queue=1: the client stops reading its socket after one frame,
            # so the kernel buffers fill, then the server's send queue.
            port = server.port
            stuck = await connect(f"ws://127.0.0.1:{port}/", compression=None, max_queue=1)
            now = int(time.time())
            await stuck.send(vmac_frame("00112233445566aa", now))
            await stuck.send(auth_frame("10.77.0.3", now))
            await wait_until(lambda: relay.session_for(ip("10.77.0.3")) is not None, DEADLINE)
            big = forward("10.77.0.1", "10.77.0.3", bytes(60000))
            deadline = time.monotonic() + DEADLINE
            while relay.session_for(ip("10.77.0.3")) is not None:
                assert time.monotonic() < deadline, relay.stats()
                await a.send(big)
            stats = relay.stats()
            assert stats["drops"]["send_queue_full"] >= 1
            assert stats["limits"]["send_queue_full"] >= 1
            assert stats["limits"]["send_queue_stalled"] == 1
            assert stats["rejections"]["SEND_QUEUE_STALLED"] == 1
            # The reader of a full queue held up nobody.
            await assert_relayed(a, b)
            stuck.transport.abort()
            await close_all([a, b])

    asyncio.run(scenario())


def test_a_client_sending_junk_is_read_more_slowly_and_others_are_still_served() -> None:
    async def scenario() -> None:
        async with serving(junk_rate=20) as server:
            relay = server.relay
            a = await good_client_login(server, "10.77.0.1", VMAC_A)
            b = await good_client_login(server, "10.77.0.2", VMAC_B)
            flooder = await good_client_login(server, "10.77.0.3", "00112233445566aa")
            session = relay.session_for(ip("10.77.0.3"))
            assert session is not None
            junk = forward("10.77.0.3", "10.77.0.99", bytes(200))  # nobody there: dropped

            async def flood() -> None:
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(2000):
                        await flooder.send(junk)

            flooding = asyncio.create_task(flood())
            # Past its burst (2 x 20) the flooder's reader pauses between frames.
            await wait_until(lambda: relay.stats()["limits"].get("junk_rate", 0) >= 5, DEADLINE)
            # While it is throttled, a well-behaved pair is served as usual...
            await assert_relayed(a, b)
            # ...and the flooder is slowed, not closed: it is still logged in.
            assert relay.session_for(ip("10.77.0.3")) is session
            assert not session.closed
            assert session.dropped_frames < 2000
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
            flooder.transport.abort()
            await close_all([a, b])

    asyncio.run(scenario())
