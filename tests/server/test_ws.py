"""The relay over real WebSockets: end to end, close codes, timeouts, slow clients."""

import asyncio
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2pvpn.server.limits import ServerLimits
from p2pvpn.server.relay import Relay
from p2pvpn.server.ws import RelayServer, _WsSession
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import ExptTun, decode_ws_message
from tests.server import (
    PASSWORD,
    VMAC_A,
    VMAC_B,
    VMAC_C,
    auth_frame,
    expttun_frame,
    forward,
    ip,
    vmac_frame,
    wait_until,
)

DHCP = IPv4Network("10.77.0.0/24")


@dataclass
class Client:
    connection: ClientConnection
    tun_ip: str

    async def recv_frame(self, timeout: float = 5.0) -> bytes:
        frame = await asyncio.wait_for(self.connection.recv(), timeout)
        assert isinstance(frame, bytes)
        return frame


async def connect_client(
    server: RelayServer, tun_ip: str, vmac: str, *, now: int | None = None
) -> Client:
    timestamp = int(time.time()) if now is None else now
    connection = await connect(f"ws://127.0.0.1:{server.port}/", compression=None)
    await connection.send(vmac_frame(vmac, timestamp))
    await connection.send(auth_frame(tun_ip, timestamp))
    await wait_until(lambda: server.relay.session_for(ip(tun_ip)) is not None)
    return Client(connection, tun_ip)


def test_end_to_end_two_clients_exchange_forward_frames() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD, dhcp=DHCP)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            a = await connect_client(server, "10.77.0.1", VMAC_A)
            b = await connect_client(server, "10.77.0.2", VMAC_B)
            to_b = forward("10.77.0.1", "10.77.0.2", b"ping")
            await a.connection.send(to_b)
            assert await b.recv_frame() == to_b
            to_a = forward("10.77.0.2", "10.77.0.1", b"pong")
            await b.connection.send(to_a)
            assert await a.recv_frame() == to_a
            broadcast = forward("10.77.0.1", "10.77.0.255", b"all")
            await a.connection.send(broadcast)
            assert await b.recv_frame() == broadcast
            assert relay.stats()["frames_relayed"] == 3
            assert [row["tls"] for row in relay.session_rows(time.time())] == [False, False]
            await a.connection.close()
            await wait_until(lambda: relay.session_for(ip("10.77.0.1")) is None)
        # Shutting the server down closes the remaining client with 1001.
        with pytest.raises(ConnectionClosed) as closed:
            await b.connection.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001

    asyncio.run(scenario())


def test_end_to_end_dhcp_grant_over_websocket() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD, dhcp=DHCP)
        async with (
            RelayServer(relay, "127.0.0.1", 0) as server,
            connect(f"ws://127.0.0.1:{server.port}/path") as connection,
        ):
            now = int(time.time())
            await connection.send(vmac_frame(VMAC_A, now))
            await connection.send(expttun_frame("0.0.0.0/0", now))
            reply = await asyncio.wait_for(connection.recv(), 5)
            assert isinstance(reply, bytes)
            grant = decode_ws_message(reply)
            assert isinstance(grant, ExptTun)
            assert grant.verify(PASSWORD)
            assert grant.cidr == IPv4Interface("10.77.0.1/24")

    asyncio.run(scenario())


def test_oversized_frame_closes_only_the_sender_on_a_real_server() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            now = int(time.time())
            async with connect(url) as big, connect(url) as a, connect(url) as b:
                for connection, address in ((big, "10.0.0.9"), (a, "10.0.0.1"), (b, "10.0.0.2")):
                    await connection.send(auth_frame(address, now))
                await wait_until(lambda: relay.stats()["sessions_authenticated"] == 3)
                await big.send(forward("10.0.0.9", "10.0.0.1", bytes(70_000 - 21)))
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(big.recv(), 5)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1009
                # The others keep working.
                frame = forward("10.0.0.1", "10.0.0.2")
                await a.send(frame)
                assert await asyncio.wait_for(b.recv(), 5) == frame
                await wait_until(lambda: relay.session_for(ip("10.0.0.9")) is None)
            assert relay.stats()["rejections"] == {"MESSAGE_TOO_BIG": 1}

    asyncio.run(scenario())


def test_rejected_client_sees_the_private_close_code() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with (
            RelayServer(relay, "127.0.0.1", 0) as server,
            connect(f"ws://127.0.0.1:{server.port}/") as connection,
        ):
            await connection.send(auth_frame("10.0.0.1", int(time.time()), password="bad"))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(connection.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CloseCode.AUTHENTICATION_FAILED

    asyncio.run(scenario())


def test_a_kicked_client_is_closed_by_the_login_of_another() -> None:
    """The core's Close for the older session comes out of the newer one's frame."""

    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            older = await connect_client(server, "10.0.0.1", VMAC_A)
            newer = await connect_client(server, "10.0.0.1", VMAC_B, now=int(time.time()) + 1)
            with pytest.raises(ConnectionClosed) as closed:
                await older.recv_frame()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CloseCode.KICKED
            # Frames for the address now reach the newer client.
            other = await connect_client(server, "10.0.0.2", VMAC_C)
            frame = forward("10.0.0.2", "10.0.0.1")
            await other.connection.send(frame)
            assert await newer.recv_frame() == frame

    asyncio.run(scenario())


def test_silent_connection_is_closed_after_the_login_timeout() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with (
            RelayServer(relay, "127.0.0.1", 0, limits=ServerLimits(login_timeout=0.2)) as server,
            connect(f"ws://127.0.0.1:{server.port}/") as connection,
        ):
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(connection.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CloseCode.NOT_AUTHENTICATED

    asyncio.run(scenario())


class _StalledConnection:
    """Stands in for a ServerConnection whose peer stopped reading."""

    remote_address = ("192.0.2.50", 5555)

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.never = asyncio.Event()

    async def send(self, frame: bytes) -> None:
        self.sent.append(frame)
        await self.never.wait()

    async def close(self, code: int, reason: str) -> None:
        self.never.set()


def test_a_slow_client_gets_frames_dropped_instead_of_blocking() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        connection = _StalledConnection()
        session = _WsSession(connection, relay, queue_bytes=4)  # type: ignore[arg-type]
        writer = asyncio.get_running_loop().create_task(session.write_loop())
        for n in range(10):
            session.send(bytes([n]))  # returns at once even though nothing drains
        # The queue holds four bytes, four one-byte frames; the other six are dropped.
        assert relay.stats()["drops"] == {"send_queue_full": 6}
        # The writer takes one frame and stays stuck in send() for good...
        await wait_until(lambda: len(connection.sent) == 1)
        # ...which frees exactly one place in the queue.
        session.send(b"a")
        session.send(b"b")
        assert relay.stats()["drops"] == {"send_queue_full": 7}
        assert connection.sent == [bytes([0])]
        writer.cancel()

    asyncio.run(scenario())
