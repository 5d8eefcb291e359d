"""The relay cluster on a real nats-server: in-process servers on loopback, WebSocket clients.

Each test starts its own nats-server (JetStream, store in tmp_path) on a free
loopback port and two or three :class:`ServerRuntime` on port 0; the clients
log in as tests/server/test_ws.py does. Waiting is polling with a deadline.
"""

import asyncio
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2pvpn.config import SdwanRule, ServerConfig
from p2pvpn.netns import LocalNatsServer
from p2pvpn.server import cluster as cluster_module
from p2pvpn.server.cluster import NATS_MISSING, ClusterError, ClusterLink
from p2pvpn.server.relay import Publish
from p2pvpn.server.runtime import ServerRuntime, run_server
from p2pvpn.wire.close_codes import CloseCode
from p2pvpn.wire.ws import BROADCAST, Discovery, ExptTun, decode_ws_message
from tests.integration.conftest import require_tool
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
# Short enough that refreshes are frequent, long enough for a loaded test machine.
TTL = 6.0
DEADLINE = 20.0  # seconds any condition across servers may take


def cluster_config(url: str, **changes: object) -> ServerConfig:
    config = ServerConfig(
        websocket="ws://127.0.0.1:0/",
        password=PASSWORD,
        stun_port=0,
        dhcp=DHCP,
        cluster=(url,),
        cluster_ttl=TTL,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def servers(url: str, count: int, **changes: object) -> AsyncIterator[list[ServerRuntime]]:
    runtimes: list[ServerRuntime] = []
    try:
        for _ in range(count):
            runtime = ServerRuntime(cluster_config(url, **changes))
            await runtime.start()
            runtimes.append(runtime)
        yield runtimes
    finally:
        for runtime in runtimes:
            await runtime.close()


def link(runtime: ServerRuntime) -> ClusterLink:
    assert runtime.cluster is not None
    return runtime.cluster


@dataclass
class Client:
    connection: ClientConnection
    tun_ip: str

    async def recv_frame(self, timeout: float = DEADLINE) -> bytes:
        frame = await asyncio.wait_for(self.connection.recv(), timeout)
        assert isinstance(frame, bytes)
        return frame

    async def close_code(self) -> int | None:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await self.recv_frame()
        return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def open_connection(runtime: ServerRuntime) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{runtime.ws_port}/", compression=None)


async def login(
    runtime: ServerRuntime, tun_ip: str, vmac: str, *, now: int | None = None
) -> Client:
    timestamp = int(time.time()) if now is None else now
    connection = await open_connection(runtime)
    await connection.send(vmac_frame(vmac, timestamp))
    await connection.send(auth_frame(tun_ip, timestamp))
    await wait_until(lambda: runtime.relay.session_for(ip(tun_ip)) is not None, DEADLINE)
    return Client(connection, tun_ip)


async def known_everywhere(runtimes: list[ServerRuntime], *clients: Client) -> None:
    """Wait until every server sees each client's address held by the server it is on."""
    for client in clients:
        address = ip(client.tun_ip)
        for runtime in runtimes:
            if runtime.relay.session_for(address) is not None:
                continue
            view = runtime.relay.cluster
            assert view is not None
            await wait_until(
                lambda view=view, address=address: view.remote_owner(address) is not None,
                DEADLINE,
            )


async def exchange(sender: Client, receiver: Client, payload: bytes) -> None:
    frame = forward(sender.tun_ip, receiver.tun_ip, payload)
    await sender.connection.send(frame)
    assert await receiver.recv_frame() == frame


def test_frames_and_broadcasts_are_relayed_across_servers(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 3) as runtimes:
            one, two, three = runtimes
            a = await login(one, "10.77.0.1", VMAC_A)
            b = await login(two, "10.77.0.2", VMAC_B)
            c = await login(three, "10.77.0.3", VMAC_C)
            await known_everywhere(runtimes, a, b, c)
            for number in range(20):  # in order, both ways
                await exchange(a, b, b"ping %d" % number)
                await exchange(b, a, b"pong %d" % number)
            await exchange(c, a, b"from the third")
            broadcast = forward("10.77.0.1", "10.77.0.255", b"to all")
            await a.connection.send(broadcast)
            assert await b.recv_frame() == broadcast
            assert await c.recv_frame() == broadcast
            discovery = Discovery(ip("10.77.0.2"), BROADCAST).encode()
            await b.connection.send(discovery)
            assert await a.recv_frame() == discovery
            assert await c.recv_frame() == discovery
            stats = one.stats()["cluster"]
            assert stats["connected"] == 1
            assert stats["servers"] == 3
            assert stats["published"] >= 21
            status = link(one).status()
            assert status["state"] == "joined"
            rows = status["servers"]
            assert isinstance(rows, list)
            assert [row["self"] for row in rows].count(True) == 1

            def sessions_shown() -> int:
                rows = link(one).status()["servers"]
                assert isinstance(rows, list)
                return sum(row["sessions"] for row in rows)

            await wait_until(lambda: sessions_shown() == 3, DEADLINE)

    asyncio.run(scenario())


def test_a_login_on_another_server_kicks_the_old_session(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 2) as (one, two):
            old = await login(one, "10.77.0.5", VMAC_A)
            await known_everywhere([one, two], old)
            new = await login(two, "10.77.0.5", VMAC_B, now=int(time.time()) + 1)
            assert await old.close_code() == CloseCode.KICKED
            await wait_until(lambda: one.relay.session_for(ip("10.77.0.5")) is None, DEADLINE)
            # The new holder keeps the address: frames from the first server reach it.
            other = await login(one, "10.77.0.6", VMAC_C)
            await known_everywhere([one, two], new, other)
            await exchange(other, new, b"to the new holder")

    asyncio.run(scenario())


def test_a_replayed_auth_on_a_second_server_is_refused(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 2) as (one, two):
            now = int(time.time())
            await login(one, "10.77.0.7", VMAC_A, now=now)
            replayer = Client(await open_connection(two), "10.77.0.7")
            await replayer.connection.send(auth_frame("10.77.0.7", now))
            assert await replayer.close_code() == CloseCode.STALE_OR_REPLAYED
            assert two.relay.session_for(ip("10.77.0.7")) is None

    asyncio.run(scenario())


async def request_address(runtime: ServerRuntime, vmac: str, now: int) -> IPv4Interface:
    connection = await open_connection(runtime)
    await connection.send(vmac_frame(vmac, now))
    await connection.send(expttun_frame("0.0.0.0/0", now))
    reply = await asyncio.wait_for(connection.recv(), DEADLINE)
    assert isinstance(reply, bytes)
    grant = decode_ws_message(reply)
    assert isinstance(grant, ExptTun)
    await connection.close()
    return grant.cidr


def test_a_dynamic_address_follows_its_client_to_another_server(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 2) as (one, two):
            now = int(time.time())
            # Another client takes the first free address on the second server.
            first = await request_address(two, VMAC_B, now)
            granted = await request_address(one, VMAC_A, now)
            assert granted != first
            view = two.relay.cluster
            assert view is not None
            await wait_until(lambda: view.lease_of(VMAC_A) == granted.ip, DEADLINE)
            again = await request_address(two, VMAC_A, now + 1)
            assert again == granted

    asyncio.run(scenario())


def test_a_different_configuration_is_refused_naming_the_key(
    nats: LocalNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 1):
            other = ServerRuntime(cluster_config(nats.url, dhcp=IPv4Network("10.78.0.0/24")))
            with pytest.raises(ClusterError, match=r"dhcp is 10\.77\.0\.0/24 on the cluster"):
                await other.start()
            other_password = ServerRuntime(cluster_config(nats.url, password="another"))
            with pytest.raises(ClusterError, match="differs: password"):
                await other_password.start()
            rule = SdwanRule(DHCP, IPv4Network("192.168.5.0/24"), ip("10.77.0.9"))
            other_sdwan = ServerRuntime(cluster_config(nats.url, sdwan=(rule,)))
            with pytest.raises(ClusterError, match=r"differs: sdwan is '\(none\)' on the cluster"):
                await other_sdwan.start()
            other_ttl = ServerRuntime(cluster_config(nats.url, cluster_ttl=9.0))
            with pytest.raises(ClusterError, match="cluster_ttl is 6 s on the cluster, 9 s here"):
                await other_ttl.start()

    asyncio.run(scenario())
    # The configuration record outlives the first server by the ttl: `p2pvpn server` exits 1.
    config = cluster_config(nats.url, dhcp=IPv4Network("10.78.0.0/24"))
    with caplog.at_level(logging.ERROR):
        assert run_server(config) == 1
    assert "cluster configuration differs: dhcp is 10.77.0.0/24 on the cluster" in caplog.text
    assert "10.78.0.0/24 here" in caplog.text
    assert "another" not in caplog.text


def test_a_late_join_with_another_configuration_is_refused_and_serves_alone(
    nats: LocalNatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 1):
            # start() stops waiting at once: the check happens after it, in the background.
            monkeypatch.setattr(cluster_module, "START_DEADLINE", 0.0)
            other = ServerRuntime(cluster_config(nats.url, dhcp=IPv4Network("10.78.0.0/24")))
            await other.start()
            try:
                await wait_until(lambda: link(other).state == "refused", DEADLINE)
                refused = link(other).status()["refused"]
                assert isinstance(refused, str)
                assert "dhcp is 10.77.0.0/24 on the cluster, 10.78.0.0/24 here" in refused
                a = await login(other, "10.78.0.1", VMAC_A)
                c = await login(other, "10.78.0.3", VMAC_C)
                await exchange(a, c, b"alone")
            finally:
                await other.close()

    with caplog.at_level(logging.ERROR, logger="p2pvpn.server.cluster"):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("serving this server's clients alone" in message for message in errors)


def test_a_cluster_restarted_with_another_ttl_takes_its_buckets_over(
    nats: LocalNatsServer,
) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 1, cluster_ttl=2.0):
            pass  # its buckets stay on NATS with a ttl of 2 s
        deadline = time.monotonic() + DEADLINE
        while True:  # refused while the first server's configuration record lives
            runtime = ServerRuntime(cluster_config(nats.url, cluster_ttl=4.0))
            try:
                await runtime.start()
                break
            except ClusterError as exc:
                assert "cluster_ttl is 2 s on the cluster, 4 s here" in str(exc)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        try:
            assert link(runtime).state == "joined"
            status = await link(runtime)._bucket("addresses").status()
            assert status.ttl == 4.0
        finally:
            await runtime.close()

    asyncio.run(scenario())


def test_nats_outage_keeps_local_relaying_and_cross_server_relaying_resumes(
    nats: LocalNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 2) as (one, two):
            a = await login(one, "10.77.0.1", VMAC_A)
            c = await login(one, "10.77.0.3", VMAC_C)
            b = await login(two, "10.77.0.2", VMAC_B)
            await known_everywhere([one, two], a, b, c)
            await exchange(a, b, b"before")
            await asyncio.to_thread(nats.stop)
            await wait_until(lambda: link(one).state == "unreachable", DEADLINE)
            await wait_until(lambda: link(two).state == "unreachable", DEADLINE)
            assert one.stats()["cluster"]["connected"] == 0
            await exchange(a, c, b"during, on one server")
            await exchange(c, a, b"back, on one server")
            # Logins go on; replays to other servers cannot be checked meanwhile.
            d = await login(one, "10.77.0.4", "0a0b0c0d0e0f1011")
            await exchange(d, a, b"logged in during the outage")
            await asyncio.to_thread(nats.start)
            await wait_until(lambda: link(one).state == "joined", DEADLINE)
            await wait_until(lambda: link(two).state == "joined", DEADLINE)
            await known_everywhere([one, two], a, b, c, d)
            await exchange(a, b, b"after")
            await exchange(b, d, b"to the one who came during the outage")
            await exchange(b, c, b"after, the other way")
            status = link(one).status()
            assert status["outages"] == 1
            assert status["state"] == "joined"

    with caplog.at_level(logging.INFO, logger="p2pvpn.server.cluster"):
        asyncio.run(scenario())
    lost = [r for r in caplog.records if r.getMessage().startswith("lost NATS")]
    assert len(lost) == 2  # once per server
    assert all(record.levelno == logging.WARNING for record in lost)
    unchecked = [r for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert len(unchecked) == 1  # one login frame per kind, one line
    back = [r for r in caplog.records if r.getMessage().startswith("rejoined the cluster")]
    assert len(back) == 2
    assert all(record.levelno == logging.INFO for record in back)


def test_unreachable_nats_at_start_serves_alone_and_joins_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("nats-server")
    monkeypatch.setattr(cluster_module, "START_DEADLINE", 1.0)
    nats = LocalNatsServer(tmp_path / "nats")  # not started yet

    async def scenario() -> None:
        async with servers(nats.url, 2) as (one, two):
            assert link(one).state == "unreachable"
            a = await login(one, "10.77.0.1", VMAC_A)
            c = await login(one, "10.77.0.3", VMAC_C)
            await exchange(a, c, b"alone")
            b = await login(two, "10.77.0.2", VMAC_B)
            await asyncio.to_thread(nats.start)
            await wait_until(lambda: link(one).state == "joined", DEADLINE)
            await wait_until(lambda: link(two).state == "joined", DEADLINE)
            await known_everywhere([one, two], a, b, c)
            await exchange(b, a, b"joined")

    try:
        asyncio.run(scenario())
    finally:
        nats.stop()


def test_a_server_that_stops_deletes_its_records_at_once(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        # A ttl far beyond the deadline: only the deletion can make the records go.
        async with servers(nats.url, 2, cluster_ttl=300.0) as (one, two):
            a = await login(one, "10.77.0.1", VMAC_A)
            b = await login(two, "10.77.0.2", VMAC_B)
            await known_everywhere([one, two], a, b)
            await wait_until(lambda: link(two).stats()["servers"] == 2, DEADLINE)
            await a.connection.close()
            view = two.relay.cluster
            assert view is not None
            await wait_until(lambda: view.remote_owner(ip("10.77.0.1")) is None, DEADLINE)
            c = await login(one, "10.77.0.3", VMAC_C)
            await known_everywhere([one, two], c)
            await one.close()
            await wait_until(lambda: view.remote_owner(ip("10.77.0.3")) is None, DEADLINE)
            await wait_until(lambda: link(two).stats()["servers"] == 1, DEADLINE)

    asyncio.run(scenario())


def test_a_dead_servers_addresses_run_out_after_the_ttl(nats: LocalNatsServer) -> None:
    async def scenario() -> None:
        async with servers(nats.url, 2, cluster_ttl=3.0) as (one, two):
            a = await login(one, "10.77.0.1", VMAC_A)
            b = await login(two, "10.77.0.2", VMAC_B)
            await known_everywhere([one, two], a, b)
            # The first server dies without a word: its records stay on NATS.
            nc = link(one)._nc
            assert nc is not None
            await nc.close()
            view = two.relay.cluster
            assert view is not None
            await wait_until(lambda: view.remote_owner(ip("10.77.0.1")) is None, DEADLINE)
            await wait_until(lambda: link(two).stats()["servers"] == 1, DEADLINE)
            # Its client comes back on the other server with the same address.
            moved = await login(two, "10.77.0.1", VMAC_A, now=int(time.time()) + 1)
            await exchange(moved, b, b"moved")

    asyncio.run(scenario())


def test_a_server_that_never_reached_nats_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_module, "START_DEADLINE", 0.5)

    async def scenario() -> None:
        with socket.socket() as closed_port:
            closed_port.bind(("127.0.0.1", 0))
            port = closed_port.getsockname()[1]
        runtime = ServerRuntime(cluster_config(f"nats://user:secret@127.0.0.1:{port}"))
        await runtime.start()
        try:
            assert link(runtime).state == "unreachable"
            status = link(runtime).status()
            assert status["nats_url"] == f"nats://127.0.0.1:{port}"
            assert runtime.stats()["cluster"]["connected"] == 0
        finally:
            await asyncio.wait_for(runtime.close(), DEADLINE)

    asyncio.run(scenario())


def test_a_cluster_without_nats_py_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    config = cluster_config("nats://127.0.0.1:4222")
    with pytest.raises(ClusterError, match=r"pip install 'p2pvpn\[cluster\]'"):
        ServerRuntime(config)
    with caplog.at_level(logging.ERROR):
        assert run_server(config) == 1
    assert NATS_MISSING in caplog.text


def test_frames_waiting_for_nats_are_capped_like_a_session_queue(nats: LocalNatsServer) -> None:
    """A flood towards another server costs at most send_queue_bytes; the rest is dropped."""

    async def scenario() -> None:
        async with servers(nats.url, 2, send_queue_bytes=64 * 1024) as (one, two):
            a = await login(one, "10.77.0.1", VMAC_A)
            b = await login(two, "10.77.0.2", VMAC_B)
            await known_everywhere([one, two], a, b)
            sender = one.relay.session_for(ip("10.77.0.1"))
            assert sender is not None
            frame = forward("10.77.0.1", "10.77.0.2", bytes(1000))
            # Without yielding, nothing leaves: the outbox fills up to the cap.
            for _ in range(200):
                for action in one.relay.handle_frame(sender, frame, time.time()):
                    assert isinstance(action, Publish)
                    link(one).perform(action)
            fitted = (64 * 1024) // len(frame)
            stats = link(one).stats()
            assert stats["publish_dropped"] == 200 - fitted
            assert one.relay.stats()["limits"]["cluster_outbox_full"] == 200 - fitted
            # What fitted still arrives, in order, and the link works on afterwards.
            for _ in range(fitted):
                assert await b.recv_frame() == frame
            await exchange(a, b, b"after the flood")

    asyncio.run(scenario())


def test_servers_join_a_nats_that_wants_a_password_and_never_show_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS with users: the right password in the URL joins; a wrong one serves alone, unshown."""
    require_tool("nats-server")
    monkeypatch.setattr(cluster_module, "START_DEADLINE", 2.0)
    secret, wrong = "n4ts-s3cret", "n0t-the-pa55"
    extra = ["--user", "p2pvpn", "--pass", secret]

    async def scenario(url: str, bad_url: str) -> None:
        async with servers(url, 2) as (one, two):
            a = await login(one, "10.77.0.1", VMAC_A)
            b = await login(two, "10.77.0.2", VMAC_B)
            await known_everywhere([one, two], a, b)
            await exchange(a, b, b"through an authenticated NATS")
            async with servers(bad_url, 1) as (refused,):
                assert link(refused).state == "unreachable"
                shown = str(refused.snapshot())
                assert wrong not in shown and secret not in shown
            assert secret not in str(one.snapshot())

    with LocalNatsServer(tmp_path / "nats", extra=extra) as nats, caplog.at_level(logging.DEBUG):
        host = f"127.0.0.1:{nats.port}"
        asyncio.run(scenario(f"nats://p2pvpn:{secret}@{host}", f"nats://p2pvpn:{wrong}@{host}"))
    assert secret not in caplog.text and wrong not in caplog.text


def test_a_credentials_file_goes_to_nats_py_as_user_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "server.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    runtime = ServerRuntime(cluster_config("nats://127.0.0.1:4222", cluster_credentials=creds))
    assert link(runtime)._connect_options()["user_credentials"] == str(creds)
