"""The server's `control_socket` key: its default place, the file and the flag."""

import logging
import tempfile
from pathlib import Path

import pytest

from p2pvpn.config import (
    ConfigError,
    ConfigValue,
    ServerConfig,
    client_config_from_values,
    default_server_control_socket,
    effective_items,
    load_config,
    server_config_from_values,
    server_control_socket_from_values,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_root_serves_it_in_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    assert default_server_control_socket() == Path("/run/p2pvpn/server.sock")


def test_a_user_serves_it_in_the_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_server_control_socket() == Path("/run/user/1000/p2pvpn-server.sock")


@pytest.mark.parametrize("runtime_dir", [None, "", "relative/dir"])
def test_without_a_runtime_dir_the_temp_dir_with_the_uid(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str | None
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    if runtime_dir is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    expected = Path(tempfile.gettempdir()) / "p2pvpn-server-1000.sock"
    assert default_server_control_socket() == expected


def test_from_a_file(tmp_path: Path) -> None:
    text = 'mode = "server"\nwebsocket = "ws://0.0.0.0:80"\ncontrol_socket = "s/server.sock"\n'
    config = load_config(write(tmp_path, text))
    assert isinstance(config, ServerConfig)
    assert config.control_socket == Path("s/server.sock").absolute()
    assert config.control_socket_path == config.control_socket
    assert dict(effective_items(config))["control_socket"] == str(config.control_socket)


def test_the_default_is_shown_as_such() -> None:
    config = ServerConfig(websocket="ws://0.0.0.0:80")
    assert config.control_socket is None
    assert config.control_socket_path == default_server_control_socket()
    shown = dict(effective_items(config))["control_socket"]
    assert shown == f"{default_server_control_socket()} (default)"


def test_a_flag_sets_it() -> None:
    values = {
        "websocket": ConfigValue("ws://0.0.0.0:80", "--websocket"),
        "control_socket": ConfigValue("/tmp/x.sock", "--control-socket"),
    }
    assert server_config_from_values(values, "command line").control_socket == Path("/tmp/x.sock")


def test_a_client_ignores_it(caplog: pytest.LogCaptureFixture) -> None:
    values = {
        "websocket": ConfigValue("ws://h:1", "c.cfg:1"),
        "control_socket": ConfigValue("/tmp/x.sock", "c.cfg:2"),
    }
    with caplog.at_level(logging.WARNING):
        client_config_from_values(values, "c.cfg")
    assert "control_socket" not in caplog.text  # a server key: not "unknown"


def test_status_reads_only_the_socket_key() -> None:
    # No websocket, a password file that does not exist: status needs neither.
    values = {
        "mode": ConfigValue("server", "s.cfg:1"),
        "password_file": ConfigValue("/nonexistent/server.password", "s.cfg:2"),
        "control_socket": ConfigValue("/run/p2pvpn/a.sock", "s.cfg:3"),
    }
    assert server_control_socket_from_values(values) == Path("/run/p2pvpn/a.sock")
    assert server_control_socket_from_values({}) == default_server_control_socket()


def test_status_refuses_a_client_file() -> None:
    values = {"mode": ConfigValue("client", "c.cfg:1")}
    with pytest.raises(ConfigError, match=r"c\.cfg:1: mode: this is a client configuration"):
        server_control_socket_from_values(values)
