"""`p2pvpn server status`: the server's control socket, its snapshot and the tables printed."""

import asyncio
import json
import logging
import os
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from p2pvpn import __version__
from p2pvpn.config import ServerConfig
from p2pvpn.control import ControlError, query_snapshot
from p2pvpn.netns import LocalNatsServer
from p2pvpn.server.runtime import ServerRuntime
from p2pvpn.server.status import format_server_status, print_server_status, query_server_status
from p2pvpn.server.tls import make_self_signed_certificate, write_certificate
from tests.client.control_support import short_tmp_dir
from tests.server import PASSWORD, auth_frame, forward, wait_until

NOW = 1764003720.0


@pytest.fixture
def root() -> Iterator[Path]:
    # Not tmp_path: AF_UNIX paths are limited to 107 bytes.
    with short_tmp_dir() as directory:
        yield directory


def server_config(socket_path: Path) -> ServerConfig:
    return ServerConfig(
        websocket="ws://127.0.0.1:0/",
        password=PASSWORD,
        stun_port=0,
        control_socket=socket_path,
    )


# --------------------------------------------------------------------------- the runtime


def test_a_logged_in_client_shows_in_status(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / "server.sock"

    async def scenario() -> None:
        runtime = ServerRuntime(server_config(path))
        await runtime.start()
        try:
            url = f"ws://127.0.0.1:{runtime.ws_port}/"
            async with connect(url) as first, connect(url) as second:
                now = int(time.time())
                await first.send(auth_frame("10.1.0.1", now))
                await second.send(auth_frame("10.1.0.2", now))
                await wait_until(lambda: runtime.stats()["sessions_authenticated"] == 2)
                await first.send(forward("10.1.0.1", "10.1.0.2"))
                await asyncio.wait_for(second.recv(), 5)
                assert await asyncio.to_thread(print_server_status, path, as_json=True) == 0
                assert await asyncio.to_thread(print_server_status, path, as_json=False) == 0
        finally:
            await runtime.close()

    asyncio.run(scenario())
    out = capsys.readouterr().out
    decoder = json.JSONDecoder()
    snapshot, end = decoder.raw_decode(out)
    table = out[end:]
    assert snapshot["cluster"] is None
    server = snapshot["server"]
    assert server["websocket"] == "ws://127.0.0.1:0/"
    assert server["listening"].startswith("ws://127.0.0.1:")
    assert (server["tls"], server["version"], server["pid"]) == (False, __version__, os.getpid())
    assert abs(server["started"] - time.time()) < 60
    first, second = snapshot["sessions"]
    assert (first["address"], second["address"]) == ("10.1.0.1", "10.1.0.2")
    assert first["remote"].startswith("127.0.0.1:")
    assert (first["frames_relayed"], second["frames_delivered"]) == (1, 1)
    assert first["bytes_relayed"] == second["bytes_delivered"] > 0
    assert snapshot["stats"]["sessions_authenticated"] == 2
    assert PASSWORD not in out
    assert (
        "p2pvpn server  ws://127.0.0.1:0/  2 sessions  (TLS no, listening on ws://127.0.0.1:"
        in (table)
    )
    assert "ADDRESS   NAME  VMAC  REMOTE" in table
    assert "10.1.0.1  -     -     127.0.0.1:" in table
    assert "nats" not in table


def test_a_wss_session_shows_tls(root: Path, tmp_path: Path) -> None:
    cert, key = write_certificate(make_self_signed_certificate(), tmp_path)
    path = root / "server.sock"
    config = ServerConfig(
        websocket="wss://127.0.0.1:0/",
        password=PASSWORD,
        stun_port=0,
        tls_cert=cert,
        tls_key=key,
        control_socket=path,
    )
    client_context = ssl.create_default_context(cafile=cert)
    client_context.check_hostname = False

    async def scenario() -> dict[str, object]:
        runtime = ServerRuntime(config)
        await runtime.start()
        try:
            url = f"wss://127.0.0.1:{runtime.ws_port}/"
            async with connect(url, ssl=client_context) as connection:
                await connection.send(auth_frame("10.1.0.1", int(time.time())))
                await wait_until(lambda: runtime.stats()["sessions_authenticated"] == 1)
                return await asyncio.to_thread(query_snapshot, path, peer="server", role="server")
        finally:
            await runtime.close()

    snapshot = asyncio.run(scenario())
    server, sessions = snapshot["server"], snapshot["sessions"]
    assert isinstance(server, dict) and server["tls"] is True
    assert isinstance(sessions, list) and [session["tls"] for session in sessions] == [True]


def test_the_socket_is_0600_and_removed_on_shutdown(root: Path) -> None:
    path = root / "run" / "server.sock"

    async def scenario() -> None:
        runtime = ServerRuntime(server_config(path))
        await runtime.start()
        try:
            mode = os.lstat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        finally:
            await runtime.close()
        assert not path.exists()

    asyncio.run(scenario())


def test_a_stale_socket_is_replaced(root: Path) -> None:
    import socket

    path = root / "server.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(path))  # as a SIGKILLed server leaves it

    async def scenario() -> None:
        runtime = ServerRuntime(server_config(path))
        await runtime.start()
        try:
            answer = await asyncio.to_thread(query_snapshot, path, peer="server", role="server")
            assert answer["sessions"] == []
        finally:
            await runtime.close()

    asyncio.run(scenario())


def test_a_second_server_on_the_same_socket_runs_without_it(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = root / "server.sock"

    async def scenario() -> None:
        first = ServerRuntime(server_config(path))
        second = ServerRuntime(server_config(path))
        await first.start()
        try:
            with caplog.at_level(logging.WARNING, logger="p2pvpn.server.runtime"):
                await second.start()
            try:
                assert not second.control.serving
                answer = await asyncio.to_thread(query_snapshot, path, peer="server", role="server")
                assert answer["server"]["listening"].endswith(f":{first.ws_port}")
            finally:
                await second.close()
            assert path.is_socket()  # the second one leaves the first one's socket alone
        finally:
            await first.close()

    asyncio.run(scenario())
    assert "another p2pvpn server is already running with control socket" in caplog.text
    assert "(set control_socket)" in caplog.text


def test_a_socket_that_cannot_be_made_stops_the_start(root: Path) -> None:
    path = root / "server.sock"
    path.write_text("not a socket")

    async def scenario() -> None:
        runtime = ServerRuntime(server_config(path))
        with pytest.raises(ControlError, match="exists and is not a socket"):
            await runtime.start()
        # The WebSocket listener bound before it is closed again.
        with pytest.raises(RuntimeError, match="not listening"):
            runtime.ws_port  # noqa: B018

    asyncio.run(scenario())
    assert path.read_text() == "not a socket"


def test_no_server_is_exit_1_naming_the_socket(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = root / "server.sock"
    assert print_server_status(path, as_json=False) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"p2pvpn: error: no p2pvpn server answers on {path} (no control socket)")
    assert "`p2pvpn server -c FILE`" in err
    assert "--control-socket PATH" in err


def test_a_cluster_shows_nats_and_the_other_servers(root: Path, nats: LocalNatsServer) -> None:
    def config(name: str) -> ServerConfig:
        return ServerConfig(
            websocket="ws://127.0.0.1:0/",
            password=PASSWORD,
            stun_port=0,
            cluster=(nats.url,),
            cluster_ttl=6.0,
            control_socket=root / f"{name}.sock",
        )

    async def status_of(name: str) -> dict[str, object]:
        return await asyncio.to_thread(query_server_status, root / f"{name}.sock")

    async def scenario() -> tuple[dict[str, object], str]:
        first, second = ServerRuntime(config("a")), ServerRuntime(config("b"))
        await first.start()
        try:
            await second.start()
            try:
                url = f"ws://127.0.0.1:{second.ws_port}/"
                async with connect(url) as client:
                    await client.send(auth_frame("10.1.0.7", int(time.time())))
                    # The second server's record, with its session, reaches the first.
                    deadline = time.monotonic() + 20
                    while True:
                        snapshot = await status_of("a")
                        cluster = snapshot["cluster"]
                        assert isinstance(cluster, dict)
                        counts = [server["sessions"] for server in cluster["servers"]]
                        if sorted(counts) == [0, 1] or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.1)
                    return snapshot, format_server_status(snapshot)
            finally:
                await second.close()
        finally:
            await first.close()

    snapshot, table = asyncio.run(scenario())
    cluster = snapshot["cluster"]
    assert isinstance(cluster, dict)
    assert (cluster["state"], cluster["network"], cluster["refused"]) == ("joined", "p2pvpn", None)
    assert cluster["nats_url"] == nats.url
    mine, other = sorted(cluster["servers"], key=lambda server: not server["self"])
    assert (mine["self"], mine["sessions"], other["self"], other["sessions"]) == (
        True,
        0,
        False,
        1,
    )
    assert snapshot["sessions"] == []  # the client is the other server's
    lines = table.splitlines()
    assert lines[1].startswith("nats      joined for ")
    assert f"  {nats.url}  (network p2pvpn, outages: 0" in lines[1]
    mine_row = next(line for line in lines if mine["id"] in line)
    other_row = next(line for line in lines if other["id"] in line)
    assert mine_row.startswith("*  ")
    assert other_row.startswith("   ")
    assert other_row.endswith(" ago")
    assert lines[-1] == "(* this server)"


# --------------------------------------------------------------------------- the table


CLUSTER: dict[str, object] = {
    "network": "p2pvpn",
    "state": "joined",
    "refused": None,
    "nats_url": "nats://user:secret@10.0.0.1:4222",
    "connected_since": NOW - 600,
    "outages": 1,
    "servers": [
        {
            "id": "a1b2c3d4",
            "name": "relay-b",
            "websocket": "wss://b.example.org/",
            "sessions": 7,
            "updated": NOW - 3,
            "self": False,
        },
        {
            "id": "0f0f0f0f",
            "name": "relay-a",
            "websocket": "wss://vpn.example.org:443/",
            "sessions": 2,
            "updated": NOW - 1,
            "self": True,
        },
    ],
    "frames_published": 10,
    "frames_received": 12,
}

SNAPSHOT: dict[str, object] = {
    "server": {
        "websocket": "wss://vpn.example.org:443/",
        "listening": "wss://0.0.0.0:443",
        "started": NOW - 3720,
        "tls": True,
        "version": "0.1.0",
        "pid": 4242,
    },
    "sessions": [
        {
            "address": "10.1.0.10",
            "name": "laptop",
            "vmac": "fedcba9876543210",
            "remote": "198.51.100.7:40123",
            "since": NOW - 312,
            "frames_relayed": 2000,
            "bytes_relayed": 1536 * 1024,
            "frames_delivered": 3,
            "bytes_delivered": 300,
            "tls": True,
        },
        {
            "address": "10.1.0.2",
            "vmac": None,
            "remote": "203.0.113.5:5000",
            "since": NOW - 45,
            "frames_relayed": 0,
            "bytes_relayed": 0,
            "frames_delivered": 0,
            "bytes_delivered": 0,
            "tls": False,
        },
    ],
    "stats": {"sessions_authenticated": 2},
    "cluster": CLUSTER,
}


def test_the_table_with_a_cluster() -> None:
    assert format_server_status(SNAPSHOT, now=NOW).splitlines() == [
        "p2pvpn server  wss://vpn.example.org:443/  2 sessions  (TLS yes, listening on "
        "wss://0.0.0.0:443, pid 4242, up 1h02m, version 0.1.0)",
        "nats      joined for 10m00s  nats://10.0.0.1:4222  (network p2pvpn, outages: 1, "
        "frames published: 10, frames received: 12)",
        "",
        "ADDRESS    NAME    VMAC              REMOTE              SINCE         RELAYED  DELIVERED"
        "  TLS",
        "10.1.0.2   -       -                 203.0.113.5:5000    45s           0 / 0 B    0 / 0 B"
        "  no",
        "10.1.0.10  laptop  fedcba9876543210  198.51.100.7:40123  5m12s  2000 / 1.5 MiB  3 / 300 B"
        "  yes",
        "",
        "   SERVER   ID        WEBSOCKET                   SESSIONS  UPDATED",
        "*  relay-a  0f0f0f0f  wss://vpn.example.org:443/         2  1s ago",
        "   relay-b  a1b2c3d4  wss://b.example.org/               7  3s ago",
        "(* this server)",
    ]


@pytest.mark.parametrize(
    ("state", "refused", "shown"),
    [
        ("connecting", None, "nats      connecting  nats://10.0.0.1:4222"),
        ("unreachable", None, "nats      unreachable  nats://10.0.0.1:4222"),
        (
            "refused",
            "cluster configuration differs: dhcp",
            "nats      refused: cluster configuration differs: dhcp  nats://10.0.0.1:4222",
        ),
    ],
)
def test_the_nats_states(state: str, refused: str | None, shown: str) -> None:
    cluster = {**CLUSTER, "state": state, "refused": refused, "servers": []}
    lines = format_server_status({**SNAPSHOT, "cluster": cluster}, now=NOW).splitlines()
    assert lines[1].startswith(shown)
    assert "secret" not in "\n".join(lines)
    assert lines[-1] == "no servers known in the cluster"


def test_the_table_without_sessions_or_cluster() -> None:
    snapshot = {**SNAPSHOT, "sessions": [], "cluster": None}
    lines = format_server_status(snapshot, now=NOW).splitlines()
    assert lines[0].startswith("p2pvpn server  wss://vpn.example.org:443/  0 sessions  ")
    assert lines[1:] == ["", "no sessions"]


def test_a_malformed_snapshot_still_prints() -> None:
    snapshot: dict[str, object] = {
        "server": "junk",
        "sessions": [{"address": "x\x1b[2J", "since": "yesterday", "tls": 1}, 5],
        "cluster": {"state": None, "servers": "none"},
        "password": "hunter2",
    }
    text = format_server_status(snapshot, now=NOW)
    assert "\x1b" not in text
    assert "hunter2" not in text
    assert "x?[2J" in text
    assert "nats      unknown" in text
