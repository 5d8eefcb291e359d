"""The server process: listen address, binding errors, signals and shutdown."""

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from p2pvpn.config import ServerConfig
from p2pvpn.server.runtime import ListenError, ServerRuntime, listen_address, run_server
from tests.server import PASSWORD, auth_frame, wait_until


@pytest.fixture(autouse=True)
def _restore_websockets_log_level() -> Iterator[None]:
    # run_server quiets websockets' per-connection lines; keep that out of other tests.
    websockets_logger = logging.getLogger("websockets.server")
    level = websockets_logger.level
    yield
    websockets_logger.setLevel(level)


def test_listen_address() -> None:
    assert listen_address("ws://0.0.0.0:8080/") == ("0.0.0.0", 8080)
    assert listen_address("ws://127.0.0.1:9000/some/path") == ("127.0.0.1", 9000)
    assert listen_address("ws://example.org") == ("example.org", 80)
    assert listen_address("wss://0.0.0.0:8443/") == ("0.0.0.0", 8443)
    assert listen_address("wss://example.org/") == ("example.org", 443)
    with pytest.raises(ValueError, match="expected a ws:// or wss://"):
        listen_address("https://0.0.0.0:443/")


def test_run_server_refuses_wss_without_a_certificate(caplog: pytest.LogCaptureFixture) -> None:
    config = ServerConfig(websocket="wss://127.0.0.1:8443/", password=PASSWORD, stun_port=0)
    with caplog.at_level(logging.ERROR):
        assert run_server(config) == 1
    assert "wss:// needs tls_cert and tls_key" in caplog.text
    assert PASSWORD not in caplog.text


def test_run_server_reports_a_port_in_use(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ServerConfig(websocket=f"ws://127.0.0.1:{port}/", password=PASSWORD, stun_port=0)
        with caplog.at_level(logging.ERROR):
            assert run_server(config) == 1
    assert f"ws://127.0.0.1:{port}" in caplog.text


def test_stun_bind_failure_names_the_udp_port() -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            config = ServerConfig(websocket="ws://127.0.0.1:0/", stun_port=port)
            runtime = ServerRuntime(config, stun_host="127.0.0.1")
            with pytest.raises(ListenError, match=f"udp 127.0.0.1:{port}"):
                await runtime.start()

    asyncio.run(scenario())


def test_run_server_stops_cleanly_on_sigterm(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A logged-in client is closed with 1001 and run_server returns 0."""
    original_start = ServerRuntime.start
    tasks: list[asyncio.Task[None]] = []

    async def client_then_sigterm(runtime: ServerRuntime) -> None:
        async with connect(f"ws://127.0.0.1:{runtime.ws_port}/") as connection:
            await connection.send(auth_frame("10.1.0.1", int(time.time())))
            await wait_until(lambda: runtime.stats()["sessions_authenticated"] == 1)
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await connection.recv()

    async def start_then_signal(self: ServerRuntime) -> None:
        await original_start(self)
        tasks.append(asyncio.get_running_loop().create_task(client_then_sigterm(self)))

    monkeypatch.setattr(ServerRuntime, "start", start_then_signal)
    config = ServerConfig(websocket="ws://127.0.0.1:0/", password=PASSWORD, stun_port=0, debug=True)
    with caplog.at_level(logging.INFO, logger="p2pvpn.server"):
        assert run_server(config) == 0
    assert "listening on ws://127.0.0.1:" in caplog.text
    assert "shutting down" in caplog.text
    assert "close code 1001" in caplog.text
    assert PASSWORD not in caplog.text


def test_runtime_serves_on_an_ephemeral_port() -> None:
    async def scenario() -> None:
        config = ServerConfig(websocket="ws://127.0.0.1:0/", password=PASSWORD, stun_port=0)
        runtime = ServerRuntime(config)
        await runtime.start()
        try:
            async with connect(f"ws://127.0.0.1:{runtime.ws_port}/") as connection:
                await connection.send(auth_frame("10.1.0.1", int(time.time())))
                await wait_until(lambda: runtime.stats()["sessions_authenticated"] == 1)
        finally:
            await runtime.close()
        assert runtime.stats()["connections_open"] == 0

    asyncio.run(scenario())
