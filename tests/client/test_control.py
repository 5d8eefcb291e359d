"""The control socket (ControlServer, query_status, print_status) and `status` output."""

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.client.control import (
    ControlError,
    ControlServer,
    control_socket_path,
    format_duration,
    format_size,
    format_status,
    print_status,
    query_status,
)

NOW = 1764003720.0

EXAMPLE: dict[str, object] = {
    "name": "a",
    "interface": "p2pvpn-a",
    "address": "10.0.0.1/24",
    "version": "0.1.0",
    "dataplane": "pure",
    "pid": 1234,
    "started": NOW - 3720,
    "server": {
        "url": "ws://192.0.2.1:8080/",
        "state": "connected",
        "connected_since": NOW - 312,
        "reconnects": 0,
    },
    "relay": {"packets_out": 10, "bytes_out": 840, "packets_in": 10, "bytes_in": 840, "dropped": 0},
    "direct": {"packets_out": 0, "bytes_out": 0, "packets_in": 0, "bytes_in": 0},
    "peers": [
        {
            "tun_ip": "10.0.0.2",
            "state": "CONNECTED",
            "path": "direct 198.51.100.7:40123",
            "rtt_ms": 1.4,
            "packets_out": 5,
            "bytes_out": 420,
            "packets_in": 5,
            "bytes_in": 420,
            "state_seconds": 12.0,
            "retry_seconds": 30,
        }
    ],
    "routes": [{"destination": "10.0.0.3", "next_hop": "10.0.0.2", "delay_ms": 3}],
    "sysroutes": [{"network": "172.30.0.0/16", "nexthop": "10.0.0.9"}],
    "drops": {"authentication": 0},
}


@pytest.fixture
def state_root() -> Iterator[Path]:
    # Not tmp_path: AF_UNIX paths are limited to 107 bytes and pytest's
    # per-test directories (named after the test) can exceed that.
    root = Path(tempfile.mkdtemp(prefix="p2c-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class BackgroundLoop:
    """An event loop in a thread, so synchronous clients can talk to the server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def serving(
    path: Path, snapshot: Callable[[], dict[str, object]] = lambda: EXAMPLE
) -> Iterator[ControlServer]:
    background = BackgroundLoop()
    server = ControlServer(path, snapshot)
    try:
        background.run(server.start())
        yield server
    finally:
        background.run(server.close())
        background.stop()


def raw_request(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed client leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


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
        server = ControlServer(path, lambda: {})
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
            await ControlServer(path, lambda: {}).start()

        with pytest.raises(ControlError, match="already running"):
            asyncio.run(second())
        assert query_status(path) == EXAMPLE  # the first one still serves


def test_regular_file_is_not_removed(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    path.parent.mkdir()
    path.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        asyncio.run(ControlServer(path, lambda: {}).start())
    assert path.read_text() == "keep me"


def test_close_leaves_a_newer_socket_alone(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")

    async def scenario() -> None:
        server = ControlServer(path, lambda: {})
        await server.start()
        path.unlink()  # someone else took over the path
        stale_socket(path)
        await server.close()

    asyncio.run(scenario())
    assert path.is_socket()


# --------------------------------------------------------------------------- client


def test_missing_socket_error_names_the_path(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    with pytest.raises(ControlError) as caught:
        query_status(path)
    assert str(caught.value) == f"no p2pvpn client running for a (no control socket at {path})"


def test_stale_socket_is_refused(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    stale_socket(path)
    with pytest.raises(ControlError, match=f"no p2pvpn client running for a .*{path}"):
        query_status(path)


def test_silent_server_times_out(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(ControlError, match=r"did not answer within 0\.2s"):
            query_status(path, timeout=0.2)


def test_malformed_answer(state_root: Path) -> None:
    path = control_socket_path(state_root / "a")
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(100)
                connection.sendall(b"[1, 2]\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ControlError, match="malformed answer"):
            query_status(path)
        thread.join(5)


def test_print_status_json(state_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(control_socket_path(state_root / "a")):
        assert print_status("a", True, state_root) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == EXAMPLE
    assert out == json.dumps(EXAMPLE, indent=2) + "\n"


def test_print_status_table(state_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(control_socket_path(state_root / "a")):
        assert print_status("a", False, state_root) == 0
    out = capsys.readouterr().out
    assert out.startswith("p2pvpn-a  10.0.0.1/24  (dataplane: pure, pid 1234, up ")
    assert "10.0.0.2" in out and "CONNECTED" in out


def test_print_status_default_name(state_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(control_socket_path(state_root / "default")):
        assert print_status(None, True, state_root) == 0
        assert print_status("", True, state_root) == 0


def test_print_status_finds_the_only_client(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(control_socket_path(state_root / "office")):
        assert print_status(None, True, state_root) == 0
    assert json.loads(capsys.readouterr().out) == EXAMPLE


def test_print_status_several_clients(state_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with (
        serving(control_socket_path(state_root / "home")),
        serving(control_socket_path(state_root / "office")),
    ):
        assert print_status(None, False, state_root) == 1
        assert print_status("office", True, state_root) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("p2pvpn: error: several p2pvpn clients")
    assert "home, office" in captured.err
    assert json.loads(captured.out) == EXAMPLE


def test_print_status_ignores_stale_sockets_when_guessing(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale_socket(control_socket_path(state_root / "crashed"))
    with serving(control_socket_path(state_root / "office")):
        assert print_status(None, True, state_root) == 0
    assert json.loads(capsys.readouterr().out) == EXAMPLE


def test_print_status_no_client(state_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert print_status(None, False, state_root) == 1
    assert print_status("a", False, state_root) == 1
    err = capsys.readouterr().err.splitlines()
    default = state_root / "default" / "control.sock"
    assert err == [
        f"p2pvpn: error: no p2pvpn client running for default (no control socket at {default})",
        "p2pvpn: error: no p2pvpn client running for a "
        f"(no control socket at {state_root / 'a' / 'control.sock'})",
    ]


def test_print_status_missing_state_root(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_status(None, False, Path("/nonexistent/p2pvpn")) == 1
    assert "/nonexistent/p2pvpn/default/control.sock" in capsys.readouterr().err


def test_print_status_rejects_path_names(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert print_status("../etc", False, state_root) == 1
    assert "invalid client name" in capsys.readouterr().err


# --------------------------------------------------------------------------- formatting


def test_header_names_the_udp_offloads_in_use() -> None:
    snapshot = {**EXAMPLE, "dataplane": "fast", "udp_offloads": ["gso", "gro"]}
    header = format_status(snapshot, now=NOW).splitlines()[0]
    assert header.startswith("p2pvpn-a  10.0.0.1/24  (dataplane: fast udp gso+gro, pid 1234,")
    no_offloads = {**EXAMPLE, "dataplane": "fast", "udp_offloads": []}
    assert "(dataplane: fast, pid" in format_status(no_offloads, now=NOW)


def test_format_status_example() -> None:
    lines = format_status(EXAMPLE, now=NOW).splitlines()
    assert lines[0] == "p2pvpn-a  10.0.0.1/24  (dataplane: pure, pid 1234, up 1h02m, version 0.1.0)"
    assert lines[1] == "server    ws://192.0.2.1:8080/  connected for 5m12s  (reconnects: 0)"
    assert lines[2] == "traffic   relay   out 10 pkts / 840 B  in 10 pkts / 840 B"
    assert lines[3] == "          direct  out 0 pkts / 0 B     in 0 pkts / 0 B"
    assert lines[4] == ""  # no drops line: every counter is zero
    header, peer = lines[5], lines[6]
    assert header.startswith("PEER      STATE")
    assert peer.startswith("10.0.0.2  CONNECTED  direct 198.51.100.7:40123  1.4 ms")
    # Every column starts where its heading starts.
    for heading, value in [
        ("STATE", "CONNECTED"),
        ("PATH", "direct"),
        ("RTT", "1.4 ms"),
        ("OUT", "420 B"),
        ("IN STATE", "12s"),
        ("RETRY", "30s"),
    ]:
        assert header.index(heading) == peer.index(value), heading
    assert header.index(" IN ") + 1 == peer.index("420 B", peer.index("420 B") + 1)
    assert lines[7:] == [
        "",
        "ROUTE     NEXT HOP  DELAY",
        "10.0.0.3  10.0.0.2  3 ms",
        "",
        "SYSROUTE       NEXT HOP",
        "172.30.0.0/16  10.0.0.9",
    ]
    assert all(line == line.rstrip() for line in lines)


def test_format_status_columns_follow_content() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["peers"] = [
        {"tun_ip": "10.0.0.10", "state": "PREPARING", "path": "relay", "bytes_out": 5 << 20},
        {"tun_ip": "10.0.0.2", "state": "CONNECTING", "path": "relay", "rtt_ms": 250.4},
    ]
    lines = format_status(snapshot, now=NOW).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("PEER")))
    header, first, second = lines[start : start + 3]
    # Sorted numerically: 10.0.0.2 before 10.0.0.10.
    assert first.startswith("10.0.0.2   CONNECTING  relay  250 ms  -        -")
    assert second.startswith("10.0.0.10  PREPARING   relay  -       5.0 MiB")
    assert header.index("STATE") == first.index("CONNECTING") == second.index("PREPARING")
    assert header.index("OUT") == second.index("5.0 MiB")


def test_format_status_empty_peers() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["peers"] = []
    text = format_status(snapshot, now=NOW)
    assert "no peers yet" in text
    assert "PEER" not in text


def test_format_status_optional_sections() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["routes"] = []
    del snapshot["sysroutes"]
    snapshot["drops"] = {"authentication": 3, "malformed": 0, "no_route": 2}
    snapshot["relay"] = {"packets_out": 1, "bytes_out": 2048, "dropped": 4}
    text = format_status(snapshot, now=NOW)
    assert "ROUTE" not in text
    assert "SYSROUTE" not in text
    assert "drops     authentication 3, no_route 2\n" in text
    assert "malformed" not in text
    relay, direct = text.splitlines()[2:4]
    assert relay == "traffic   relay   out 1 pkts / 2.0 KiB  in - pkts / -    dropped 4"
    assert direct == "          direct  out 0 pkts / 0 B      in 0 pkts / 0 B"


def test_format_status_server_not_connected() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["server"] = {
        "url": "wss://vpn.example/",
        "state": "reconnecting",
        "connected_since": NOW - 100,
        "reconnects": 3,
    }
    text = format_status(snapshot, now=NOW)
    assert "server    wss://vpn.example/  reconnecting  (reconnects: 3)\n" in text


def test_format_status_tolerates_missing_and_odd_values() -> None:
    assert format_status({}, now=NOW) == "p2pvpn\n\nno peers yet"
    odd: dict[str, object] = {
        "name": "b",
        "address": None,
        "pid": "x",
        "started": float("nan"),
        "server": "not a dict",
        "relay": [],
        "peers": [{"tun_ip": "10.0.0.2"}, "junk", {"state": "FAILED", "rtt_ms": True}],
        "routes": {"not": "a list"},
        "drops": {"x": "many"},
    }
    lines = format_status(odd, now=NOW).splitlines()
    assert lines[0] == "b"
    assert lines[2].split() == ["PEER", "STATE", "PATH", "RTT", "OUT", "IN", "IN", "STATE", "RETRY"]
    assert lines[3].split() == ["10.0.0.2", "-", "-", "-", "-", "-", "-", "-"]
    assert lines[4].split() == ["-", "FAILED", "-", "-", "-", "-", "-", "-"]


def test_format_status_drops_password_and_control_characters() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["password"] = "hunter2"
    snapshot["interface"] = "p2pvpn-a\x1b[2J"
    text = format_status(snapshot, now=NOW)
    assert "hunter2" not in text
    assert "\x1b" not in text
    assert text.startswith("p2pvpn-a?[2J  ")


def test_format_status_uses_the_clock_by_default() -> None:
    import time

    snapshot = dict(EXAMPLE)
    snapshot["started"] = time.time() - 45
    assert "up 45s" in format_status(snapshot) or "up 46s" in format_status(snapshot)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (45, "45s"),
        (59.99, "59s"),
        (60, "1m00s"),
        (312, "5m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (2 * 86400 + 3 * 3600 + 59, "2d03h"),
        (400 * 86400, "400d00h"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (840, "840 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),
        (12 * 1024 * 1024 + 300 * 1024, "12.3 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**4, "5.0 TiB"),
        (5000 * 1024**4, "5000.0 TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
