"""The client's control socket: served in its state directory, asked by `p2pvpn status`."""

import asyncio
import contextlib
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from p2pvpn.client.control import client_control_server, control_socket_path
from p2pvpn.client.status import query_status
from p2pvpn.control import ControlError, socket_answers
from tests.client.control_support import EXAMPLE, raw_request, serving, stale_socket

# --------------------------------------------------------------------------- server


def test_control_socket_path(state_root: Path) -> None:
    assert control_socket_path(state_root / "a") == state_root / "a" / "control.sock"


def test_status_round_trip(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        assert query_status(path) == EXAMPLE


def test_answer_is_one_json_line(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        answer = raw_request(path, b"status\n")
    assert answer.endswith(b"\n")
    assert answer.count(b"\n") == 1
    assert json.loads(answer) == EXAMPLE


def test_unknown_command(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        assert json.loads(raw_request(path, b"reboot\n")) == {"error": "unknown command"}
        assert json.loads(raw_request(path, b"\n")) == {"error": "unknown command"}
        # No trailing newline (e.g. `printf status | nc -U`) still works.
        assert json.loads(raw_request(path, b"status")) == EXAMPLE


def test_error_answer_raises(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with (
        serving(path, lambda: {"error": "unknown command"}),
        pytest.raises(ControlError, match=r"^client a answered: unknown command$"),
    ):
        query_status(path)


def test_bad_clients_do_not_kill_the_server(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))  # connect and hang up
        # Over the line limit: the server hangs up (a reset if our bytes are unread).
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            assert raw_request(path, b"x" * 100_000) == b""
        assert json.loads(raw_request(path, b"\xff\xfe\n")) == {"error": "unknown command"}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"status\n")  # and close before reading the answer
        assert query_status(path) == EXAMPLE


def test_failing_snapshot_answers_an_error(state_root: Path) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    path = control_socket_path(state_root / "a")
    with serving(path, broken):
        with pytest.raises(ControlError, match="snapshot failed"):
            query_status(path)
        assert "boom" not in raw_request(path, b"status\n").decode()


def test_snapshot_with_non_json_values_is_stringified(state_root: Path) -> None:
    from ipaddress import IPv4Address

    path = control_socket_path(state_root / "a")
    with serving(path, lambda: {"address": IPv4Address("10.0.0.1")}):
        assert query_status(path) == {"address": "10.0.0.1"}


def test_password_is_never_served(state_root: Path) -> None:
    snapshot: dict[str, object] = {
        "name": "a",
        "password": "hunter2",
        "server": {"url": "ws://x/", "Password": "hunter2"},
        "peers": [{"tun_ip": "10.0.0.2", "password": "hunter2"}],
    }
    path = control_socket_path(state_root / "a")
    with serving(path, lambda: snapshot):
        raw = raw_request(path, b"status\n")
    assert b"hunter2" not in raw
    assert json.loads(raw) == {
        "name": "a",
        "server": {"url": "ws://x/"},
        "peers": [{"tun_ip": "10.0.0.2"}],
    }


def test_socket_mode_is_0600(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600


def test_socket_removed_on_close(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):
        assert path.exists()
    assert not path.exists()


def test_close_is_idempotent_and_start_creates_directory(state_root: Path) -> None:
    path = control_socket_path(state_root / "new" / "dir")

    async def scenario() -> None:
        server = client_control_server(path, lambda: {})
        await server.close()  # never started: nothing to do
        async with server:
            assert path.is_socket()
        await server.close()

    asyncio.run(scenario())
    assert not path.exists()


def test_stale_socket_is_replaced(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    stale_socket(path)
    assert path.is_socket()
    with serving(path):
        assert query_status(path) == EXAMPLE


def test_live_socket_is_not_stolen(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with serving(path):

        async def second() -> None:
            await client_control_server(path, lambda: {}).start()

        with pytest.raises(ControlError, match="already running"):
            asyncio.run(second())
        assert query_status(path) == EXAMPLE  # the first one still serves


def test_regular_file_is_not_removed(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    path.parent.mkdir()
    path.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        asyncio.run(client_control_server(path, lambda: {}).start())
    assert path.read_text() == "keep me"


def test_close_leaves_a_newer_socket_alone(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")

    async def scenario() -> None:
        server = client_control_server(path, lambda: {})
        await server.start()
        path.unlink()  # someone else took over the path
        stale_socket(path)
        await server.close()

    asyncio.run(scenario())
    assert path.is_socket()


def test_socket_answers(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    assert not socket_answers(path)  # no socket at all
    stale_socket(path)
    assert not socket_answers(path)
    with serving(path):
        assert socket_answers(path)
