"""The password's sources (password_file, P2PVPN_PASSWORD, ``-p -``), the permission
warning, URL redaction (``display_url``) and the private state directory.

No network; the real processes are in tests/integration/test_secrets.py.
"""

import asyncio
import io
import logging
import os
import re
import stat
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.cli import main
from p2pvpn.client.control import client_control_server, control_socket_path
from p2pvpn.client.store import StateDirectoryError, StateStore, prepare_state_directory
from p2pvpn.config import (
    PASSWORD_ENV,
    ClientConfig,
    ConfigError,
    ConfigValue,
    client_config_from_values,
    display_url,
    effective_items,
    load_config,
    overlay_values,
    server_config_from_values,
)

SECRET = "pw-Zq8#not in any output"


@pytest.fixture(autouse=True)
def no_password_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging is restored after each test by tests/conftest.py's restore_logging."""
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def value(text: str, origin: str) -> ConfigValue:
    return ConfigValue(text, origin)


# --------------------------------------------------------------------------- password_file


@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_password_file_gives_the_password(tmp_path: Path, content: str) -> None:
    secret = write(tmp_path / "pw", content)
    config = write(tmp_path / "c.cfg", f"websocket = ws://h\npassword_file = {secret}\n", 0o644)
    loaded = load_config(config)
    assert loaded.password == SECRET
    assert loaded.password_file == secret
    items = dict(effective_items(loaded))
    assert items["password"] == "******** (from password_file)"
    assert items["password_file"] == str(secret)
    assert SECRET not in repr(loaded) + repr(effective_items(loaded))


def test_password_file_keeps_inner_spaces_and_only_one_newline(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", " a b \n")
    values = {"websocket": value("ws://h", "x"), "password_file": value(str(secret), "--pf")}
    assert server_config_from_values(values, "x").password == " a b "


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text(""), "the file is empty"),
        (lambda p: p.write_text("\n"), "the file is empty"),
        (lambda p: p.write_text(f"{SECRET}\nmore\n"), "expected the password on one line"),
        (lambda p: p.write_bytes(b"\xff" + SECRET.encode()), "not a UTF-8 text file"),
        (lambda p: p.mkdir(), "cannot read: Is a directory"),
    ],
)
def test_bad_password_file_names_the_file_never_the_content(
    tmp_path: Path, setup: Any, message: str
) -> None:
    secret = tmp_path / "pw"
    setup(secret)
    config = write(tmp_path / "c.cfg", f"websocket = ws://h\npassword_file = {secret}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == f"{config}:2: password_file: {secret}: {message}"
    assert SECRET not in str(info.value)


def test_password_file_flag_error_names_the_flag(tmp_path: Path) -> None:
    values = {
        "websocket": value("ws://h", "--websocket"),
        "password_file": value(str(tmp_path / "nope"), "--password-file"),
    }
    with pytest.raises(ConfigError, match=r"^--password-file: .*/nope: no such file$"):
        client_config_from_values(values, "command line")


def test_password_and_password_file_together_name_both(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", SECRET)
    config = write(
        tmp_path / "c.cfg", f"websocket = ws://h\npassword = {SECRET}\npassword_file = {secret}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == (
        f"{config}:2: password and {config}:3: password_file are both given: keep one of them"
    )
    flags = {
        "websocket": value("ws://h", "--websocket"),
        "password": value(SECRET, "--password"),
        "password_file": value(str(secret), "--password-file"),
    }
    with pytest.raises(ConfigError) as info:
        client_config_from_values(flags, "command line")
    assert str(info.value) == "--password and --password-file are both given: keep one of them"


# --------------------------------------------------------------------------- precedence


def test_precedence_flag_over_file_over_environment(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", "from-password-file")
    file_values = {"websocket": value("ws://h", "c:1"), "password": value("from-cfg", "c:2")}
    environ = {PASSWORD_ENV: "from-env"}

    def password(file: dict[str, ConfigValue], flags: dict[str, ConfigValue]) -> str:
        return client_config_from_values(overlay_values(file, flags, environ), "c").password

    # A flag replaces both of the file's keys, whichever the flag and the key.
    assert password(file_values, {"password": value("from-flag", "--password")}) == "from-flag"
    by_file_flag = {"password_file": value(str(secret), "--password-file")}
    assert password(file_values, by_file_flag) == "from-password-file"
    file_with_path = {**file_values, "password_file": value(str(secret), "c:3")}
    del file_with_path["password"]
    flag = {"password": value("from-flag", "--password")}
    assert password(file_with_path, flag) == "from-flag"
    # The file beats the environment; the environment counts when nothing else gives one.
    assert password(file_values, {}) == "from-cfg"
    assert password(file_with_path, {}) == "from-password-file"
    only_url = {"websocket": value("ws://h", "c:1")}
    config = client_config_from_values(overlay_values(only_url, {}, environ), "c")
    assert config.password == "from-env"
    assert dict(effective_items(config))["password"] == f"******** (from {PASSWORD_ENV})"
    # An empty variable is no password.
    empty = overlay_values(only_url, {}, {PASSWORD_ENV: ""})
    assert client_config_from_values(empty, "c").password == ""


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_configs(monkeypatch: pytest.MonkeyPatch) -> list[ClientConfig]:
    configs: list[ClientConfig] = []
    module = types.ModuleType("p2pvpn.client.node")
    module.run_client = lambda config: configs.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pvpn.client.node", module)
    return configs


class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_dash_p_dash_reads_one_line_of_stdin(
    monkeypatch: pytest.MonkeyPatch, run_configs: list[ClientConfig]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(f"{SECRET}\nnext line\n", tty=False))
    assert main(["run", "-w", "ws://h", "-p", "-"]) == 0
    assert run_configs[-1].password == SECRET


def test_dash_p_dash_on_a_terminal_uses_getpass(
    monkeypatch: pytest.MonkeyPatch, run_configs: list[ClientConfig]
) -> None:
    prompts: list[str] = []
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=True))
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or SECRET)
    assert main(["run", "-w", "ws://h", "-p", "-"]) == 0
    assert run_configs[-1].password == SECRET
    assert prompts == ["p2pvpn password: "]


def test_dash_p_dash_with_nothing_on_stdin(
    monkeypatch: pytest.MonkeyPatch, run_configs: list[ClientConfig], capsys: Any
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("", tty=False))
    assert main(["run", "-w", "ws://h", "-p", "-"]) == 2
    assert "--password -: no password on standard input" in capsys.readouterr().err
    assert run_configs == []


def test_environment_and_password_file_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_configs: list[ClientConfig]
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    assert main(["run", "-w", "ws://h"]) == 0
    assert run_configs[-1].password == SECRET
    secret = write(tmp_path / "pw", "from-file\n")
    assert main(["run", "-w", "ws://h", "--password-file", str(secret)]) == 0
    assert run_configs[-1].password == "from-file"
    assert run_configs[-1].password_file == secret


def test_check_config_shows_the_password_file_not_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = write(tmp_path / "pw", SECRET)
    config = write(tmp_path / "c.cfg", f"websocket = ws://h\npassword_file = {secret}\n", 0o644)
    assert main(["check-config", str(config)]) == 0
    captured = capsys.readouterr()
    # The keys are padded to the longest one: the width follows the key list.
    assert re.search(rf"^password_file += {re.escape(str(secret))}$", captured.out, re.MULTILINE)
    assert re.search(r"^password += \*{8} \(from password_file\)$", captured.out, re.MULTILINE)
    assert SECRET not in captured.out + captured.err
    assert "warning" not in captured.err.lower()  # the file holds no password itself


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o600, 0o400])
def test_a_config_file_with_the_password_readable_by_others_warns(
    tmp_path: Path, mode: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "c.cfg", f"websocket = ws://h\npassword = {SECRET}\n", mode)
    assert main(["check-config", str(config)]) == 0
    err = capsys.readouterr().err
    if mode & 0o077:
        assert f"{config} holds the password and is readable by group or others" in err
        assert f"(mode {mode:04o}): run `chmod 600 {config}`" in err
    else:
        assert err == ""
    assert SECRET not in err


def test_a_password_file_readable_by_others_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = write(tmp_path / "pw", SECRET, 0o644)
    values = {"websocket": value("ws://h", "x"), "password_file": value(str(secret), "x")}
    with caplog.at_level(logging.WARNING):
        client_config_from_values(values, "x")
    assert f"run `chmod 600 {secret}`" in caplog.text
    caplog.clear()
    secret.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        client_config_from_values(values, "x")
    assert caplog.text == ""


def test_a_config_file_without_a_password_may_be_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "c.cfg", "websocket = ws://h\n", 0o644)
    assert main(["check-config", str(config)]) == 0
    assert capsys.readouterr().err == ""


def test_run_warns_too(
    tmp_path: Path, run_configs: list[ClientConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "c.cfg", f"websocket = ws://h\npassword = {SECRET}\n", 0o644)
    assert main(["run", "-c", str(config)]) == 0
    assert f"run `chmod 600 {config}`" in capsys.readouterr().err


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ws://user:secret@host:1/path?token=x", "ws://host:1/path"),
        ("wss://user@host/path#frag", "wss://host/path"),
        ("ws://host:1/path", "ws://host:1/path"),
        ("ws://host", "ws://host"),
        ("ws://u:p@[::1]:80/?q", "ws://[::1]:80/"),
        ("ws://u:p@host:99999/x?q", "ws://host:99999/x"),  # a bad port: still redacted
        ("ws://u:p@[::1/x?q", "ws://[::1/x"),  # unclosed bracket: urlsplit would raise
        ("u:p@host/x?y", "host/x"),
        ("ws://a@b@host/", "ws://host/"),
    ],
)
def test_display_url(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_config_shows_and_reports_the_url_without_secrets() -> None:
    config = ClientConfig(websocket="ws://user:secret@host:1/path?token=x")
    assert dict(effective_items(config))["websocket"] == "ws://host:1/path"
    values = {"websocket": value("http://user:secret@host/?token=x", "c:1")}
    with pytest.raises(ConfigError) as info:
        client_config_from_values(values, "c")
    assert "secret" not in str(info.value) and "token" not in str(info.value)
    assert "'http://host/'" in str(info.value)
    values = {"websocket": value("ws://user:secret@host/#token", "c:1")}
    with pytest.raises(ConfigError) as info:
        client_config_from_values(values, "c")
    assert str(info.value) == "c:1: websocket: 'ws://host/': a WebSocket URL has no #fragment"


def test_snapshot_shows_the_url_without_secrets(tmp_path: Path) -> None:
    from p2pvpn.client.status import format_status

    snapshot = {"server": {"url": "ws://user:secret@host:1/path?token=x", "state": "connected"}}
    text = format_status(snapshot, now=0.0)  # a client that did not redact it
    assert "ws://host:1/path" in text
    assert "secret" not in text and "token" not in text


# --------------------------------------------------------------------------- state dir


def test_state_dir_is_created_0700(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "state"
    prepare_state_directory(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    StateStore(tmp_path / "b").vmac()
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700


def test_our_open_state_dir_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    directory.chmod(0o775)
    with caplog.at_level(logging.WARNING):
        prepare_state_directory(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert f"state directory {directory} was mode 0775: changed to 0700" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)  # nobody
    with pytest.raises(StateDirectoryError) as info:
        prepare_state_directory(directory)
    assert str(info.value).startswith(f"state directory {directory} is owned by ")
    assert "uid 65534" in str(info.value)
    assert "refusing to keep state there" in str(info.value)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # left alone

    # The client refuses to start: the control socket is taken first.
    server = client_control_server(control_socket_path(directory), dict)
    with pytest.raises(OSError, match="refusing to keep state there"):
        asyncio.run(server.start())
    assert not control_socket_path(directory).exists()


def test_the_control_socket_directory_is_created_0700(tmp_path: Path) -> None:
    directory = tmp_path / "new"
    server = client_control_server(control_socket_path(directory), dict)

    async def scenario() -> None:
        await server.start()
        await server.close()

    asyncio.run(scenario())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_logged_http_requests_lose_their_credentials() -> None:
    """websockets logs its handshake at DEBUG: the query and the Basic credentials go."""
    from p2pvpn.logs import SecretFilter

    masked = SecretFilter().mask
    assert masked("> GET /path?token=x HTTP/1.1") == "> GET /path?******** HTTP/1.1"
    assert masked("< Authorization: Basic dXNlcjpzZWNyZXQ=") == "< Authorization: ********"
    assert masked("> GET /path HTTP/1.1") == "> GET /path HTTP/1.1"


def test_an_empty_password_file_key_gives_no_file() -> None:
    values = {
        "websocket": value("ws://h", "c:1"),
        "password": value(SECRET, "c:2"),
        "password_file": value("", "c:3"),
    }
    config = client_config_from_values(values, "c")
    assert (config.password, config.password_file) == (SECRET, None)
