"""`p2pvpn status`: asking a client (query_status, print_status) and the table it prints."""

import json
import socket
import threading
from pathlib import Path

import pytest

from p2pvpn.client.control import control_socket_path
from p2pvpn.client.status import format_status, print_status, query_status
from p2pvpn.control import ControlError
from tests.client.control_support import EXAMPLE, NOW, serving, stale_socket

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


def test_state_dir_may_be_the_clients_own_directory(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = state_root / "lab"  # as given to `run --state-dir`
    with serving(control_socket_path(own)):
        for name in (None, "lab", ""):
            assert print_status(name, True, own) == 0
            assert json.loads(capsys.readouterr().out) == EXAMPLE


def test_a_named_directory_below_a_clients_own_wins(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        serving(control_socket_path(state_root), lambda: {"name": "outer"}),
        serving(control_socket_path(state_root / "inner"), lambda: {"name": "inner"}),
    ):
        assert print_status("inner", True, state_root) == 0
        assert json.loads(capsys.readouterr().out) == {"name": "inner"}
        assert print_status(None, True, state_root) == 0
        assert json.loads(capsys.readouterr().out) == {"name": "outer"}


def test_a_stale_socket_in_the_clients_own_directory_is_reported(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale_socket(control_socket_path(state_root / "lab"))
    assert print_status("lab", False, state_root / "lab") == 1
    assert "no p2pvpn client running for lab (stale control socket" in capsys.readouterr().err


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


def test_header_names_the_tun_offloads_after_the_udp_ones() -> None:
    snapshot = {
        **EXAMPLE,
        "dataplane": "fast",
        "udp_offloads": ["gso", "gro"],
        "tun_offloads": ["csum", "tso4", "uso4"],
    }
    header = format_status(snapshot, now=NOW).splitlines()[0]
    assert "(dataplane: fast udp gso+gro tun csum+tso4+uso4, pid 1234," in header
    tun_only = {**EXAMPLE, "dataplane": "fast", "udp_offloads": [], "tun_offloads": ["csum"]}
    assert "(dataplane: fast tun csum, pid" in format_status(tun_only, now=NOW)
    plain = {**snapshot, "tun_offloads": []}
    assert "(dataplane: fast udp gso+gro, pid" in format_status(plain, now=NOW)


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


def test_format_status_says_how_long_a_client_has_been_retrying() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["server"] = {
        "url": "ws://192.0.2.1:8080/",
        "state": "connecting",
        "connected_since": None,
        "reconnects": 0,
        "failed_attempts": 5,
        "retrying_since": NOW - 42,
    }
    line = format_status(snapshot, now=NOW).splitlines()[1]
    assert line == (
        "server    ws://192.0.2.1:8080/  connecting  "
        "(retrying for 42s, 5 failed attempts; reconnects: 0)"
    )
    snapshot["server"] = {**snapshot["server"], "failed_attempts": 1, "retrying_since": "x"}
    assert "(1 failed attempt; reconnects: 0)" in format_status(snapshot, now=NOW)


def test_format_status_ignores_failed_attempts_once_connected() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["server"] = {**EXAMPLE["server"], "failed_attempts": 3}  # type: ignore[dict-item]
    assert "failed" not in format_status(snapshot, now=NOW)


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


def test_format_status_lists_refused_sysroutes_with_their_reasons() -> None:
    snapshot = dict(EXAMPLE)
    snapshot["sysroutes_refused"] = [
        {"network": "0.0.0.0/0", "nexthop": "10.0.0.9", "reason": "the default route (...)"},
        {"network": "127.0.0.0/8", "nexthop": "10.0.0.9", "reason": "reaches into loopback"},
    ]
    lines = format_status(snapshot, now=NOW).splitlines()
    start = lines.index("REFUSED SYSROUTE  NEXT HOP  REASON")
    assert lines[start + 1 :] == [
        "0.0.0.0/0         10.0.0.9  the default route (...)",
        "127.0.0.0/8       10.0.0.9  reaches into loopback",
    ]
    assert "REFUSED" not in format_status(dict(EXAMPLE), now=NOW)
