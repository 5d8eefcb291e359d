"""`p2pvpn server status` on the command line, beside `p2pvpn server` that runs one."""

from pathlib import Path
from typing import Any

import pytest

from p2pvpn.cli import main
from p2pvpn.config import ServerConfig, default_server_control_socket
from tests.test_cli import fake_module, write


@pytest.fixture
def server_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return fake_module(monkeypatch, "p2pvpn.server.runtime", "run_server")


@pytest.fixture
def status_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return fake_module(monkeypatch, "p2pvpn.server.status", "print_server_status")


def test_server_without_the_word_still_runs_a_server(
    server_calls: list[Any], status_calls: list[Any]
) -> None:
    assert main(["server", "-w", "ws://0.0.0.0:80"]) == 0
    assert server_calls == [((ServerConfig(websocket="ws://0.0.0.0:80"),), {})]
    assert status_calls == []


def test_server_takes_the_control_socket_flag(server_calls: list[Any]) -> None:
    assert main(["server", "-w", "ws://0.0.0.0:80", "--control-socket", "/run/a.sock"]) == 0
    [((config,), _)] = server_calls
    assert config.control_socket == Path("/run/a.sock")


def test_status_asks_the_default_socket(server_calls: list[Any], status_calls: list[Any]) -> None:
    assert main(["server", "status"]) == 0
    assert main(["server", "status", "--json", "--control-socket", "/run/a.sock"]) == 0
    assert status_calls == [
        ((default_server_control_socket(),), {"as_json": False}),
        ((Path("/run/a.sock"),), {"as_json": True}),
    ]
    assert server_calls == []


def test_status_finds_the_socket_in_the_servers_file(
    tmp_path: Path, status_calls: list[Any]
) -> None:
    # The password file is only read to run a server: status must not need it.
    text = (
        "mode = server\nwebsocket = ws://0.0.0.0:80\n"
        "password_file = /nonexistent/server.password\n"
        f"control_socket = {tmp_path}/s.sock\n"
    )
    path = write(tmp_path, "server.cfg", text)
    assert main(["server", "status", "-c", str(path)]) == 0
    assert main(["server", "-c", str(path), "status", "--json"]) == 0
    # The flag wins over the file.
    assert main(["server", "status", "-c", str(path), "--control-socket", "/x.sock"]) == 0
    sockets = [args[0] for args, _ in status_calls]
    assert sockets == [tmp_path / "s.sock", tmp_path / "s.sock", Path("/x.sock")]


def test_status_refuses_what_only_running_takes(
    status_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "status", "-w", "ws://0.0.0.0:80", "--dhcp", "10.0.0.0/24"]) == 2
    err = capsys.readouterr().err
    assert "server status: --websocket, --dhcp only go with running a server" in err
    assert status_calls == []


def test_json_only_goes_with_status(
    server_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "-w", "ws://0.0.0.0:80", "--json"]) == 2
    assert "--json only goes with `p2pvpn server status`" in capsys.readouterr().err
    assert server_calls == []


def test_an_unknown_word_is_a_usage_error(
    server_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "stats"]) == 2
    assert "invalid choice: 'stats'" in capsys.readouterr().err
    assert server_calls == []


def test_status_of_a_client_file_is_a_usage_error(
    tmp_path: Path, status_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "client.cfg", "websocket = ws://h:1\nmode = client\n")
    assert main(["server", "status", "-c", str(path)]) == 2
    assert "mode: this is a client configuration" in capsys.readouterr().err
    assert status_calls == []
