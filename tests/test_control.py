"""The generic control socket (p2pvpn.control): what the client and the server share."""

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pvpn.control import (
    ControlError,
    ControlInUseError,
    ControlServer,
    NotListeningError,
    make_parent_directory,
    query_snapshot,
    snapshot_number,
    snapshot_text,
)
from tests.client.control_support import raw_request, serving, short_tmp_dir, stale_socket

SNAPSHOT: dict[str, object] = {"server": {"websocket": "ws://h:1/"}, "sessions": []}


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tmp_dir() as directory:
        yield directory


def server_control(path: Path, snapshot: Callable[[], dict[str, object]]) -> ControlServer:
    return ControlServer(path, snapshot, role="server")


def ask(path: Path, timeout: float = 3.0) -> dict[str, object]:
    return query_snapshot(path, peer="server", role="server", timeout=timeout)


def test_round_trip_with_the_default_directory(root: Path) -> None:
    path = root / "run" / "p2pvpn" / "server.sock"
    with serving(path, lambda: SNAPSHOT, server_control):
        assert ask(path) == SNAPSHOT
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # The directory it made is private; the ones above it are left as they were.
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.exists()
    assert path.parent.is_dir()


def test_an_existing_directory_keeps_its_mode(root: Path) -> None:
    shared = root / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    make_parent_directory(shared / "server.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_messages_name_the_role(root: Path) -> None:
    path = root / "server.sock"

    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    with serving(path, broken, server_control):
        with pytest.raises(ControlError, match=r"^server answered: .*see the server's log"):
            ask(path)

        async def second() -> None:
            await server_control(path, dict).start()

        with pytest.raises(ControlInUseError, match="another p2pvpn server is already running"):
            asyncio.run(second())


def test_a_custom_prepare_runs_before_binding(root: Path) -> None:
    path = root / "server.sock"
    prepared: list[Path] = []

    async def scenario() -> None:
        async with ControlServer(path, dict, role="server", prepare=prepared.append) as server:
            assert server.serving
        assert not server.serving

    asyncio.run(scenario())
    assert prepared == [path]


def test_nothing_listening_says_whether_a_socket_is_left(root: Path) -> None:
    path = root / "server.sock"
    with pytest.raises(NotListeningError) as missing:
        ask(path)
    assert (missing.value.path, missing.value.stale) == (path, False)
    assert str(missing.value) == f"nothing answers on {path} (no control socket)"
    stale_socket(path)
    with pytest.raises(NotListeningError) as stale:
        ask(path)
    assert stale.value.stale
    assert isinstance(stale.value, ControlError)


def test_the_peer_is_named_in_answers_gone_wrong(root: Path) -> None:
    path = root / "server.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(100)
                connection.sendall(b"not json\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ControlError, match=f"^server sent a malformed answer on {path}$"):
            ask(path)
        thread.join(5)
        with pytest.raises(ControlError, match=r"^server did not answer within 0\.2s"):
            ask(path, timeout=0.2)


def test_the_password_is_scrubbed_on_both_ends(root: Path) -> None:
    path = root / "server.sock"
    with serving(path, lambda: {"stats": {"Password": "hunter2", "frames": 1}}, server_control):
        assert b"hunter2" not in raw_request(path, b"status\n")
        assert ask(path) == {"stats": {"frames": 1}}


def test_snapshot_number_and_text() -> None:
    assert snapshot_number(3) == 3.0
    assert snapshot_number(2.5) == 2.5
    for odd in (None, True, "3", float("nan"), float("inf")):
        assert snapshot_number(odd) is None
    assert snapshot_text(None) == "-"
    assert snapshot_text("", "none") == "none"
    assert snapshot_text("a\x1b[2Jb") == "a?[2Jb"
    assert snapshot_text(12) == "12"
