"""`p2pvpn demo`: its pieces without privileges, and whole runs in namespaces (root).

The unit tests need nothing special. The two runs at the end start the real
demo (``python -m p2pvpn demo --quick``) as a subprocess; they need root,
/dev/net/tun, ip and nft (skipped elsewhere, failed when CI=true, like every
namespace test).
"""

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

import p2pvpn.demo
from p2pvpn.cli import main
from p2pvpn.control import ControlError
from p2pvpn.demo import DemoOptions, run_demo
from p2pvpn.demo.checks import missing_requirements
from p2pvpn.demo.lookup import NameLookup, ask
from p2pvpn.demo.measure import PingResult, Throughput, parse_iperf3, parse_ping, parse_traffic
from p2pvpn.demo.monitor import StateTracker, StatusPoller, peer_views
from p2pvpn.demo.output import Console, DemoError, use_color
from p2pvpn.demo.state import DemoLock, DemoRecord, StateFile
from p2pvpn.demo.summary import ExitPing, PairResult, PathResult, Results, summary_lines
from p2pvpn.demo.topology import (
    CLIENTS,
    EXIT_NODE,
    EXIT_USER,
    NAMESPACE_PREFIX,
    ROUTERS,
    SERVER,
    block_ruleset,
    pairs,
)
from p2pvpn.netns import nat_ruleset, process_env, wait_for

NAMES = {"10.77.0.1": "alice", "10.77.0.2": "bob", "10.77.0.3": "carol"}


# --------------------------------------------------------------------------- output


def test_console_step_lines() -> None:
    stream = io.StringIO()
    console = Console(stream, color=False)
    with console.step("starting the server") as step:
        step.done("server listening on 203.0.113.1:8080")
    with console.step("waiting") as step:
        step.warn("only 4 of 6 peer pairs CONNECTED")
        step.detail("alice -> bob: PREPARING")
    with pytest.raises(DemoError), console.step("starting alice"):
        raise DemoError("alice exited with status 1", ["last lines of alice's log:"])
    with pytest.raises(KeyboardInterrupt), console.step("pinging"):
        raise KeyboardInterrupt
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\[ok\] server listening on 203\.0\.113\.1:8080 \(\d+\.\d s\)", lines[0])
    assert lines[1].startswith("[!!] only 4 of 6 peer pairs CONNECTED (")
    assert lines[2] == "     alice -> bob: PREPARING"
    assert lines[3].startswith("[FAIL] starting alice: alice exited with status 1 (")
    assert lines[4] == "     last lines of alice's log:"
    assert lines[5].startswith("[stopped] pinging (")
    assert "\033" not in stream.getvalue()


def test_console_colors_only_when_asked() -> None:
    stream = io.StringIO()
    Console(stream, color=True).ok("fine", 0.25)
    assert stream.getvalue() == "\033[32m[ok]\033[0m fine (0.2 s)\n"
    assert not use_color(io.StringIO(), no_color=False)  # not a terminal


def test_no_color_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(Terminal(), no_color=False)
    assert not use_color(Terminal(), no_color=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Terminal(), no_color=False)


def test_console_survives_a_closed_reader() -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    console = Console(Closed(), color=False)
    console.line("nobody reads this")  # no exception: the demo must still clean up
    console.ok("nor this")


# --------------------------------------------------------------------------- state changes


def snapshot(*peers: tuple[str, str, str | None]) -> dict[str, Any]:
    return {
        "name": "alice",
        "peers": [
            {"tun_ip": ip, "state": state, "path": path, "rtt_ms": 0.5, "relay_bytes_out": 10}
            for ip, state, path in peers
        ],
    }


def test_tracker_reports_each_change_once() -> None:
    tracker = StateTracker(NAMES)
    assert tracker.update("alice", snapshot(), 0.0) == []
    first = tracker.update("alice", snapshot(("10.77.0.2", "PREPARING", "relay server")), 1.0)
    assert [c.describe() for c in first] == ["alice -> bob: PREPARING"]
    assert tracker.update("alice", snapshot(("10.77.0.2", "PREPARING", "relay server")), 1.5) == []
    tracker.update("alice", snapshot(("10.77.0.2", "CONNECTING", "relay server")), 2.0)
    direct = "direct 203.0.113.12:40123"
    last = tracker.update("alice", snapshot(("10.77.0.2", "CONNECTED", direct)), 3.0)
    assert [c.describe() for c in last] == [f"alice -> bob: CONNECTING -> CONNECTED ({direct})"]
    assert last[0].at == 3.0
    assert tracker.chain("alice", "bob") == f"PREPARING -> CONNECTING -> CONNECTED ({direct})"
    assert tracker.connected("alice", "bob")
    assert tracker.first_connected("alice", "bob") == 3.0
    assert tracker.chain("bob", "alice") == "-"
    assert not tracker.connected("bob", "alice")


def test_tracker_keeps_the_first_connected_time_and_follows_departures() -> None:
    tracker = StateTracker(NAMES)
    tracker.update("bob", snapshot(("10.77.0.1", "CONNECTED", "direct 203.0.113.11:1")), 4.0)
    changes = tracker.update("bob", snapshot(("10.77.0.1", "INIT", "relay server")), 9.0)
    assert [c.describe() for c in changes] == ["bob -> alice: CONNECTED -> INIT"]
    tracker.update("bob", snapshot(("10.77.0.1", "CONNECTED", "direct 203.0.113.11:2")), 20.0)
    assert tracker.first_connected("bob", "alice") == 4.0
    assert tracker.chain("bob", "alice") == (
        "CONNECTED -> INIT -> CONNECTED (direct 203.0.113.11:2)"
    )


def test_tracker_ignores_strangers_itself_and_malformed_rows() -> None:
    tracker = StateTracker(NAMES)
    rows: dict[str, Any] = {
        "peers": [
            {"tun_ip": "10.77.0.99", "state": "CONNECTED"},  # not a demo client
            {"tun_ip": "10.77.0.1", "state": "CONNECTED"},  # alice herself
            {"tun_ip": "10.77.0.3"},  # no state
            "garbage",
            {"tun_ip": "10.77.0.2", "state": "WAITING", "rtt_ms": True, "path": 7},
        ]
    }
    changes = tracker.update("alice", rows, 1.0)
    assert [c.describe() for c in changes] == ["alice -> bob: WAITING"]
    view = tracker.view("alice", "bob")
    assert view is not None and view.rtt_ms is None and view.path is None
    assert tracker.update("alice", {"peers": "nope"}, 2.0) == []
    assert peer_views({}, NAMES) == {}


def test_poller_rate_limits_and_survives_clients_that_do_not_answer(tmp_path: Path) -> None:
    now = [100.0]
    answers: dict[str, Any] = {
        "alice": snapshot(("10.77.0.2", "PREPARING", None)),
        "bob": ControlError("no p2pvpn client running for bob"),
    }
    asked: list[str] = []

    def query(path: Path) -> dict[str, Any]:
        name = path.parent.name
        asked.append(name)
        answer = answers[name]
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    seen: list[str] = []
    poller = StatusPoller(
        {"alice": tmp_path / "alice", "bob": tmp_path / "bob"},
        StateTracker(NAMES),
        lambda change: seen.append(change.describe()),
        clock=lambda: now[0],
        query=query,
    )
    poller.poll()
    assert seen == ["alice -> bob: PREPARING"]
    assert "bob" in poller.errors
    poller.poll()  # less than 0.5 s later: nobody is asked
    assert asked == ["alice", "bob"]
    now[0] += 0.5
    answers["alice"] = snapshot(("10.77.0.2", "CONNECTING", None))
    poller.poll()
    assert seen[-1] == "alice -> bob: PREPARING -> CONNECTING"
    assert asked == ["alice", "bob", "alice", "bob"]


# --------------------------------------------------------------------------- requirements


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake machine: root, /dev/net/tun and every tool, until a test takes them away."""
    fake: dict[str, Any] = {"uid": 0, "tun": True, "tools": {"ip", "ss", "nft", "ping"}}
    real_exists = os.path.exists
    monkeypatch.setattr(os, "geteuid", lambda: fake["uid"])
    monkeypatch.setattr(
        os.path,
        "exists",
        lambda path: fake["tun"] if path == "/dev/net/tun" else real_exists(path),
    )
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}" if name in fake["tools"] else None
    )
    return fake


def test_nothing_missing(machine: dict[str, Any]) -> None:
    assert missing_requirements() == []


def test_not_root(machine: dict[str, Any]) -> None:
    machine["uid"] = 1000
    assert missing_requirements() == [
        "p2pvpn demo needs root: it creates network namespaces (try: sudo p2pvpn demo)"
    ]
    assert missing_requirements(cleanup_only=True) == [
        "p2pvpn demo --cleanup needs root: it creates network namespaces "
        "(try: sudo p2pvpn demo --cleanup)"
    ]


def test_missing_tun_and_tools_name_the_packages(machine: dict[str, Any]) -> None:
    machine["tun"] = False
    machine["tools"] = {"ping"}
    problems = missing_requirements()
    assert problems == [
        "p2pvpn demo needs /dev/net/tun for the clients' TUN devices (try: sudo modprobe tun)",
        "p2pvpn demo needs the ip command (Debian/Ubuntu: apt-get install iproute2)",
        "p2pvpn demo needs the nft command (Debian/Ubuntu: apt-get install nftables)",
    ]
    machine["tun"] = True
    machine["tools"] = {"ip", "ss", "nft"}
    assert missing_requirements() == [
        "p2pvpn demo needs the ping command (Debian/Ubuntu: apt-get install iputils-ping)"
    ]


def test_cleanup_needs_only_root_and_ip(machine: dict[str, Any]) -> None:
    machine["tun"] = False
    machine["tools"] = {"ip"}
    assert missing_requirements(cleanup_only=True) == []


def test_run_demo_refuses_clearly_without_root(
    machine: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    machine["uid"] = 1000
    machine["tools"] = {"ip", "ss", "ping"}
    stream = io.StringIO()
    assert run_demo(DemoOptions(), stream) == 1
    err = capsys.readouterr().err
    assert "p2pvpn demo needs root: it creates network namespaces (try: sudo p2pvpn demo)" in err
    assert "apt-get install nftables" in err
    assert "Traceback" not in err
    assert stream.getvalue() == ""  # nothing was started


def test_cli_reports_missing_requirements_with_exit_status_1(
    machine: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    machine["uid"] = 1000
    assert main(["demo", "--quick"]) == 1
    assert "needs root" in capsys.readouterr().err


# --------------------------------------------------------------------------- command line


@pytest.fixture
def demo_calls(monkeypatch: pytest.MonkeyPatch) -> list[DemoOptions]:
    calls: list[DemoOptions] = []

    def fake(options: DemoOptions) -> int:
        calls.append(options)
        return 0

    monkeypatch.setattr(p2pvpn.demo, "run_demo", fake)
    return calls


def test_cli_defaults(demo_calls: list[DemoOptions]) -> None:
    assert main(["demo"]) == 0
    assert demo_calls == [DemoOptions()]
    assert demo_calls[0].throughput_seconds == 3


def test_cli_flags(demo_calls: list[DemoOptions]) -> None:
    argv = ["demo", "--keep", "--quick", "--dataplane", "pure", "--no-color", "--duration", "7"]
    assert main(argv) == 0
    assert demo_calls == [
        DemoOptions(keep=True, quick=True, dataplane="pure", no_color=True, duration=7)
    ]
    assert main(["demo", "--quick"]) == 0
    assert demo_calls[-1].throughput_seconds == 1
    assert main(["demo", "--cleanup", "-d"]) == 0
    assert demo_calls[-1] == DemoOptions(cleanup=True, debug=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--keep", "--cleanup"],
        ["demo", "--duration", "0"],
        ["demo", "--duration", "1.5"],
        ["demo", "--dataplane", "turbo"],
    ],
)
def test_cli_usage_errors(
    argv: list[str], demo_calls: list[DemoOptions], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert demo_calls == []
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- measurements


PING_OUTPUT = """\
PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.

--- 10.77.0.2 ping statistics ---
5 packets transmitted, 4 received, 20% packet loss, time 805ms
rtt min/avg/max/mdev = 0.412/0.634/1.021/0.226 ms
"""


def test_parse_ping() -> None:
    assert parse_ping(PING_OUTPUT) == PingResult(5, 4, 0.412, 0.634, 1.021)
    lost = "1 packets transmitted, 0 received, 100% packet loss, time 0ms\n"
    result = parse_ping(lost)
    assert result == PingResult(1, 0) and not result.ok
    assert parse_ping("ping: connect: Network is unreachable") is None


def test_parse_iperf3() -> None:
    data = {"end": {"sum_received": {"bits_per_second": 4.12e8, "seconds": 3.001}}}
    assert parse_iperf3(json.dumps(data)) == Throughput(4.12e8, 3.001, "iperf3")
    with pytest.raises(ValueError, match="iperf3: unable to connect to server"):
        parse_iperf3(json.dumps({"error": "unable to connect to server"}))
    with pytest.raises(ValueError, match="no JSON"):
        parse_iperf3("iperf3: error")
    with pytest.raises(ValueError, match="sum_received"):
        parse_iperf3("{}")


def test_parse_traffic() -> None:
    result = {"result": {"bits_per_second": 4e6, "seconds": 2.0, "bytes": 1000000}}
    assert parse_traffic('{"interval": {}}\n' + json.dumps(result) + "\n").bits_per_second == 4e6
    with pytest.raises(ValueError, match="no result"):
        parse_traffic("")
    with pytest.raises(ValueError, match="received nothing"):
        parse_traffic('{"result": {"bits_per_second": 0, "seconds": 0}}')
    with pytest.raises(ValueError, match="nobody answers"):
        parse_traffic('{"error": "nobody answers benchmarks at 10.0.0.2:5201"}')


def test_traffic_tool_measures_over_loopback() -> None:
    """What the demo runs without iperf3: the bench traffic agent's TCP test."""

    from p2pvpn.bench.traffic import BenchServer

    with BenchServer("127.0.0.1", 0) as server:
        argv = [sys.executable, "-m", "p2pvpn.bench.traffic", "tcp", "127.0.0.1"]
        argv += ["--port", str(server.address[1]), "--seconds", "0.3"]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, env=process_env()
        )
    assert done.returncode == 0, done.stderr
    assert parse_traffic(done.stdout).bits_per_second > 0


def test_wait_for_polls_until_true_or_deadline() -> None:
    now = [0.0]
    ticks: list[float] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    found = wait_for(
        lambda: "yes" if now[0] >= 1.0 else None,
        5.0,
        tick=lambda: ticks.append(now[0]),
        interval=0.5,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert found == "yes" and ticks == [0.0, 0.5, 1.0]
    assert wait_for(lambda: False, 2.0, clock=lambda: now[0], sleep=sleep) is None


# --------------------------------------------------------------------------- summary


def results(*, connected: bool) -> Results:
    pairs_ = [
        PairResult(
            a,
            b,
            state="CONNECTED" if connected or (a, b) != ("alice", "bob") else "CONNECTING",
            path="direct 203.0.113.12:40123",
            rtt_ms=0.61,
            connected_after=3.5,
            ping=PingResult(5, 5, 0.3, 0.4, 0.5),
        )
        for a, b in pairs(("alice", "bob", "carol"))
    ]
    return Results(
        pairs=pairs_,
        paths=[
            PathResult("direct", PingResult(5, 5, 0.3, 0.4, 0.5), Throughput(4e8, 3, "iperf3"), 0),
            PathResult(
                "relay", PingResult(5, 5, 1, 2, 3), Throughput(1e8, 3, "iperf3"), 37_000_000
            ),
        ],
        measured_pair=("alice", "bob"),
        connect_timeout=30,
        all_connected_after=3.5 if connected else None,
        setup={"network": 0.3, "server": 0.2, "clients": 0.6},
        total=12.0,
        name_lookup=NameLookup(
            "alice",
            IPv4Address("10.77.0.1"),
            "bob.vpn",
            IPv4Address("10.77.0.2"),
            rcode="NOERROR",
            addresses=("10.77.0.2",),
        ),
        exit_ping=ExitPing(
            "bob",
            "carol",
            IPv4Address("10.77.0.3"),
            IPv4Address("198.51.100.1"),
            state="active",
            ping=PingResult(5, 5, 0.5, 0.81, 1.2),
        ),
    )


def test_summary_when_everything_connected() -> None:
    result = results(connected=True)
    assert result.ok
    text = "\n".join(summary_lines(result))
    assert "alice -> bob    CONNECTED  direct 203.0.113.12:40123  0.61 ms  0.40 ms" in text
    assert re.search(r"direct\s+0\.40 ms\s+400 Mbit/s\s+0\.0 MB\s+iperf3, 3 s", text)
    assert re.search(r"relay\s+2\.00 ms\s+100 Mbit/s\s+37\.0 MB", text)
    assert "direct/relay throughput ratio: 4.0x" in text
    assert "setup: network 0.3 s, server 0.2 s, clients 0.6 s (total 1.1 s)" in text
    assert "all peers CONNECTED 3.5 s after the clients started" in text
    assert text.endswith("result: all 6 peer pairs CONNECTED")
    assert re.search(
        r"^  name lookup +ok +bob\.vpn -> 10\.77\.0\.2 +dnspython, asking alice's DNS "
        r"at 10\.77\.0\.1:53$",
        text,
        re.M,
    ), text
    assert re.search(
        r"^  exit node +ok +ping bob -> 198\.51\.100\.1: 0\.81 ms +through the exit node "
        r"carol \(10\.77\.0\.3\)$",
        text,
        re.M,
    ), text


def test_summary_marks_a_failed_lookup_and_exit_ping() -> None:
    result = results(connected=True)
    assert result.name_lookup is not None and result.exit_ping is not None
    result.name_lookup = NameLookup(
        "alice", IPv4Address("10.77.0.1"), "bob.vpn", IPv4Address("10.77.0.2"), rcode="NXDOMAIN"
    )
    result.exit_ping.state, result.exit_ping.ping = "waiting", None
    result.exit_ping.note = "bob's exit state stayed waiting"
    text = "\n".join(summary_lines(result))
    assert re.search(r"name lookup +FAIL +bob\.vpn: NXDOMAIN .*\(expected 10\.77\.0\.2\)", text)
    assert re.search(
        r"exit node +FAIL +ping bob -> 198\.51\.100\.1: - .*stayed waiting$", text, re.M
    )
    unanswered = NameLookup("a", IPv4Address("10.0.0.1"), "b.vpn", IPv4Address("10.0.0.2"))
    assert not unanswered.ok and unanswered.describe() == "b.vpn: no answer"


def test_lookup_asks_with_dnspython_and_reports_what_came() -> None:
    """The query the demo runs in a member's namespace, against a fake DNS on loopback."""
    import socket

    import dns.message
    import dns.rcode
    import dns.rrset

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_twice() -> None:
        for rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            data, peer = server.recvfrom(4096)
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(rcode)
            if rcode == dns.rcode.NOERROR:
                reply.answer.append(dns.rrset.from_text("bob.vpn.", 60, "IN", "A", "10.77.0.2"))
            server.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=answer_twice, daemon=True)
    thread.start()
    try:
        assert ask("127.0.0.1", "bob.vpn", 5.0, port) == {
            "rcode": "NOERROR",
            "addresses": ["10.77.0.2"],
        }
        assert ask("127.0.0.1", "nobody.vpn", 5.0, port) == {"rcode": "NXDOMAIN", "addresses": []}
        thread.join(5)
        silent = ask("127.0.0.1", "bob.vpn", 0.2, port)
        assert silent["rcode"] is None and silent["error"]
    finally:
        server.close()


def test_summary_names_the_pairs_that_did_not_connect() -> None:
    result = results(connected=False)
    result.paths[0] = PathResult("direct", note="skipped: alice <-> bob not CONNECTED")
    assert not result.ok
    text = "\n".join(summary_lines(result))
    assert (
        "result: 5 of 6 peer pairs CONNECTED within 30 s; "
        "not CONNECTED: alice -> bob (CONNECTING)" in text
    )
    assert "skipped: alice <-> bob not CONNECTED" in text
    assert "ratio" not in text


def test_a_problem_fails_the_run_even_when_connected() -> None:
    result = results(connected=True)
    result.problems.append("throughput over the relay path: iperf3 did not finish")
    assert not result.ok
    assert summary_lines(result)[-1].startswith("problem: throughput over the relay path")


# --------------------------------------------------------------------------- topology and state


def test_names_fit_linux_limits() -> None:
    for site in CLIENTS:
        assert len(site.interface) <= 15 and len(site.port_name) <= 15
        assert site.namespace.startswith(NAMESPACE_PREFIX)
    for router in ROUTERS:
        assert router.namespace.startswith(NAMESPACE_PREFIX)
    assert SERVER.ws_url == "wss://203.0.113.1:8080/"
    assert SERVER.stun_url == "stun://203.0.113.1:3478"
    assert [c.vpn.ip.exploded for c in CLIENTS] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    # alice and carol share nat1's LAN; bob is behind nat2
    assert {c.name: c.router for c in CLIENTS} == {"alice": "nat1", "bob": "nat2", "carol": "nat1"}
    # carol offers herself as an exit node, bob uses her
    assert [c.name for c in CLIENTS if c.exit_node] == [EXIT_NODE] == ["carol"]
    assert [(c.name, c.exit) for c in CLIENTS if c.exit] == [(EXIT_USER, EXIT_NODE)]


def test_rulesets() -> None:
    nat = nat_ruleset("wan0")
    assert 'oifname "wan0" masquerade' in nat
    assert nat.count('iifname "wan0" ct state new drop') == 2  # input and forward
    block = block_ruleset(ROUTERS[1].wan.ip)
    assert 'oifname "wan0" ip daddr 203.0.113.12 meta l4proto udp drop' in block
    assert 'iifname "wan0" ip saddr 203.0.113.12 meta l4proto udp drop' in block
    assert not re.search(rf"{re.escape(str(SERVER.address.ip))}\b", block)  # not the server


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "demo.json")
    assert state.load() is None and not state.exists()
    record = DemoRecord(pid=42, workdir="/tmp/p2pdemo-x", namespaces=["p2pdemo-inet"])
    state.save(record)
    assert state.load() == record
    state.path.write_text('{"pid": 1, "namespaces": ["p2pdemo-a", "not-ours"], "kept": true}')
    loaded = state.load()
    assert loaded is not None and loaded.namespaces == ["p2pdemo-a"] and loaded.kept
    state.path.write_text("{broken")
    assert state.load() is None and state.exists()
    state.remove()
    assert not state.exists()


def test_lock_excludes_a_second_demo(tmp_path: Path) -> None:
    first, second = DemoLock(tmp_path / "demo.lock"), DemoLock(tmp_path / "demo.lock")
    assert first.acquire()
    assert not second.acquire()
    assert second.holder() == os.getpid()
    first.release()
    assert second.acquire()
    second.release()


# --------------------------------------------------------------------------- whole runs (root)


def _namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(NAMESPACE_PREFIX))
    except FileNotFoundError:
        return []


BUSY = "another p2pvpn demo is running"
ATTEMPTS = 3


def _wait_until_no_demo_runs() -> None:
    """Another demo (a developer's, another test run's) holds the lock: wait for its end."""
    lock = DemoLock()
    if not wait_for(lock.acquire, timeout=300, interval=1.0):
        pytest.fail(f"another p2pvpn demo (pid {lock.holder()}) kept running for 300 s")
    lock.release()


@pytest.fixture
def demo_env() -> Iterator[dict[str, str]]:
    """Requirements checked; no other demo running; everything gone afterwards, whatever happens."""
    from tests.integration.conftest import require_netns, require_tool

    require_netns()
    require_tool("nft", "nftables")
    _wait_until_no_demo_runs()
    try:
        yield process_env({"NO_COLOR": "1"})
    finally:
        if _namespaces():
            subprocess.run(
                [sys.executable, "-m", "p2pvpn", "demo", "--cleanup"],
                env=process_env(),
                capture_output=True,
                timeout=120,
                check=False,
            )


def _demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pvpn", "demo", "--quick", "--no-color", *args]


def _run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A whole ``p2pvpn demo --quick``; started again if another demo slipped in first."""
    for _ in range(ATTEMPTS):
        result = subprocess.run(
            _demo_argv(),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if BUSY not in result.stdout:
            break
        _wait_until_no_demo_runs()
    return result


@pytest.mark.netns
@pytest.mark.slow
def test_demo_runs_connects_and_cleans_up(demo_env: dict[str, str]) -> None:
    result = _run_demo(demo_env)
    out = result.stdout
    report = f"exit status {result.returncode}\nstdout:\n{out}\nstderr:\n{result.stderr}"
    # The set-up and the relay work whatever the direct connections do.
    assert "[ok] server listening on 203.0.113.1:8080" in out, report
    assert "(wss://, TLS with a certificate made for this run)" in out, report
    for name in ("alice", "bob", "carol"):
        up = rf"\[ok\] {name}: 10\.77\.0\.\d/24 on p2pvpn-{name}, logged in over wss://"
        assert re.search(up, out), report
    for a, b in pairs(("alice", "bob", "carol")):
        assert re.search(rf"\[ok\] ping {a} -> {b} \(10\.77\.0\.\d\): reply in", out), report
    assert "Summary" in out, report
    relay = r"\[ok\] throughput alice -> bob over the relay path: [\d.]+ [kMG]?bit/s"
    assert re.search(relay, out), report
    assert "Traceback" not in out + result.stderr, report
    # Nothing is left behind, whatever the outcome.
    removed = re.search(r"\[ok\] removed 8 namespaces, \d+ process(es)? and (\S+)", out)
    assert removed is not None, report
    assert not Path(removed.group(2)).exists()
    assert _namespaces() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert NAMESPACE_PREFIX not in listed.stdout
    assert not Path("/run/p2pvpn-demo.json").exists()
    # Every pair went CONNECTED (needs the direct-connection part of the client).
    # Over the LAN (alice <-> carol) or through both NATs (the others).
    for a, b in pairs(("alice", "bob", "carol")):
        kind = "lan 192.168.1" if {a, b} == {"alice", "carol"} else "direct 203.0.113.1"
        assert re.search(rf"^ +{a} -> {b}: .*CONNECTED \({kind}", out, re.M), report
    assert "result: all 6 peer pairs CONNECTED" in out, report
    direct = r"\[ok\] throughput alice -> bob over the direct path: [\d.]+ [kMG]?bit/s"
    assert re.search(direct, out), report
    # Names and the exit node (needs issue 16's client): both summary lines say ok.
    assert re.search(r"^  name lookup +ok +bob\.vpn -> 10\.77\.0\.2 ", out, re.M), report
    exit_line = (
        r"^  exit node +ok +ping bob -> 198\.51\.100\.1: [\d.]+ ms +through the exit node carol"
    )
    assert re.search(exit_line, out, re.M), report
    assert not Path("/etc/netns/p2pdemo-alice").exists()
    assert result.returncode == 0, report


def _interrupt_after_setup(env: dict[str, str]) -> tuple[int, str] | None:
    """Start the demo, SIGINT it once the server is up; (exit status, output), or None when
    another demo was running."""
    demo = subprocess.Popen(
        _demo_argv(),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("server listening" in line for line in output):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no set-up progress within 120 s:\n" + "".join(output)
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None and BUSY in "".join(output):
                return None
            assert line is not None, "the demo ended before the interrupt:\n" + "".join(output)
            output.append(line)
        assert _namespaces(), "the set-up progress came before the namespaces"
        demo.send_signal(signal.SIGINT)
        returncode = demo.wait(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    return returncode, "".join(output)


@pytest.mark.netns
@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_removes_everything(demo_env: dict[str, str]) -> None:
    for _ in range(ATTEMPTS):
        outcome = _interrupt_after_setup(demo_env)
        if outcome is not None:
            break
        _wait_until_no_demo_runs()
    assert outcome is not None, "another demo kept getting in the way"
    returncode, text = outcome
    assert returncode == 130, text
    assert "interrupted (SIGINT): removing the demo" in text
    assert re.search(r"\[ok\] removed 8 namespaces", text), text
    assert "Traceback" not in text
    assert _namespaces() == []
    assert not Path("/run/p2pvpn-demo.json").exists()


@pytest.mark.netns
def test_throughput_meter_without_iperf3_between_namespaces(tmp_path: Path) -> None:
    """The demo's measurement when iperf3 is missing: the traffic agent in namespaces."""
    from ipaddress import IPv4Address

    from p2pvpn.demo.measure import ThroughputMeter
    from tests.integration.conftest import open_testbed

    with open_testbed(tmp_path / "logs") as bed:
        sender, receiver = bed.namespace("tx"), bed.namespace("rx")
        bed.link(sender, receiver, "10.202.0.1/24", "10.202.0.2/24")
        meter = ThroughputMeter(iperf3=False, log_dir=tmp_path / "logs")
        throughput = meter.measure(
            receiver, sender, IPv4Address("10.202.0.2"), 1, label="test", tick=lambda: None
        )
    assert throughput.tool == "p2pvpn traffic"
    assert throughput.bits_per_second > 0
    assert 0.5 < throughput.seconds < 2
