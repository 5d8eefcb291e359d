"""`p2pvpn bench peer` and `bench serve` without a network: fake status, fake traffic."""

from __future__ import annotations

import argparse
import threading
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any, ClassVar

import pytest

from p2pvpn.bench import peer, peer_run, peer_serve, peer_server
from p2pvpn.bench.peer_run import UDP_FRACTION_OF_TCP, PeerOptions, udp_bytes, udp_rate
from p2pvpn.bench.peer_status import (
    ClientView,
    PeerTarget,
    client_view,
    cpu_seconds,
    describe_path,
    find_peer,
    path_kind,
    resolve_target,
)
from p2pvpn.bench.peer_table import cpu_per_gb
from p2pvpn.bench.report import BenchError
from p2pvpn.bench.traffic import (
    DEFAULT_PORT,
    BenchRefusedError,
    Interval,
    RttResult,
    SearchResult,
    TcpResult,
    UdpResult,
)
from p2pvpn.client import node
from p2pvpn.client.status import format_status

OWN = "10.77.0.11/24"
PEER = "10.77.0.12"
DIRECT = "direct 198.51.100.3:40000"


def row(tun_ip: str = PEER, path: str = DIRECT, **extra: Any) -> dict[str, Any]:
    return {"tun_ip": tun_ip, "state": "CONNECTED", "path": path, "bytes_in": 100, **extra}


def snapshot(*rows: dict[str, Any], address: str | None = OWN, pid: int = 4242) -> dict[str, Any]:
    return {"name": "a", "address": address, "pid": pid, "peers": list(rows), "dataplane": "fast"}


def view(*rows: dict[str, Any], **kwargs: Any) -> ClientView:
    return client_view(snapshot(*rows, **kwargs))


# ----------------------------------------------------------------------- fake traffic

MB = 1_000_000


def tcp_result(sender: str, megabytes: int, seconds: float = 1.0) -> TcpResult:
    half = megabytes * MB // 2
    return TcpResult(
        sender=sender,
        bytes=megabytes * MB,
        seconds=seconds,
        bits_per_second=megabytes * MB * 8 / seconds,
        intervals=(Interval(0.0, 0.5, half), Interval(0.5, 1.0, half)),
    )


def udp_result(sender: str, rate: float, sent: int, received: int) -> UdpResult:
    lost = sent - received
    return UdpResult(
        sender=sender,
        target_bps=rate,
        length=1000,
        sent_packets=sent,
        received_packets=received,
        lost_packets=lost,
        loss_percent=100.0 * lost / sent,
        sent_bps=sent * 8000.0,
        received_bps=received * 8000.0,
        seconds=1.0,
        jitter_ms=0.25,
        intervals=(Interval(0.0, 1.0, received * 1000),),
    )


def rtt_result(p50: float) -> RttResult:
    return RttResult(
        sent=10, received=10, p50_ms=p50, p99_ms=p50 * 2, max_ms=p50 * 3, rtts_ms=(p50,) * 10
    )


class FakeBench:
    """Upload 100 MB/s TCP, download 50 MB/s; UDP at the asked rate loses 1 in 100."""

    def __init__(self, address: str, port: int, *, refuse: bool = False) -> None:
        self.address, self.port, self.refuse = address, port, refuse
        self.calls: list[tuple[str, Any]] = []

    def hello(self) -> dict[str, Any]:
        self.calls.append(("hello", None))
        if self.refuse:
            raise BenchRefusedError(f"nobody answers at {self.address}:{self.port}")
        return {"version": "test", "hostname": "host-b"}

    def tcp(self, seconds: float, *, reverse: bool = False, on_interval: Any = None) -> TcpResult:
        self.calls.append(("tcp", reverse))
        result = tcp_result("server" if reverse else "client", 50 if reverse else 100)
        for interval in result.intervals:
            if on_interval is not None:
                on_interval(interval)
        return result

    def udp(
        self, rate_bps: float, seconds: float, *, reverse: bool = False, on_interval: Any = None
    ) -> UdpResult:
        self.calls.append(("udp", rate_bps))
        sent = int(rate_bps / 8000)
        result = udp_result("server" if reverse else "client", rate_bps, sent, sent * 99 // 100)
        for interval in result.intervals:
            if on_interval is not None:
                on_interval(interval)
        return result

    def rtt(self, count: int, *, interval: float = 0.05) -> RttResult:
        self.calls.append(("rtt", count))
        return rtt_result(0.5)

    def loaded_rtt(
        self, seconds: float, *, interval: float = 0.05, reverse: bool = False
    ) -> tuple[RttResult, TcpResult]:
        self.calls.append(("loaded_rtt", reverse))
        return rtt_result(4.0), tcp_result("server" if reverse else "client", 10)

    def udp_search(self, start_bps: float, **kwargs: Any) -> SearchResult:
        self.calls.append(("udp_search", start_bps))
        trial = udp_result("client", start_bps / 2, 100, 100)
        return SearchResult(
            best=trial,
            trials=(trial,),
            bits_per_second=trial.received_bps,
            loss_percent=0.0,
            sender_limited=False,
        )


def args_for(target: str = PEER, **extra: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    peer.configure_parser(parser)
    argv = [target, "--state-dir", "/nonexistent"]
    extra.setdefault("seconds", 1)
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


class Scenario:
    """The local client's answers (one snapshot per status query, the last one repeats)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *snapshots: dict[str, Any]) -> None:
        self.snapshots = list(snapshots)
        self.cpu = 10.0
        self.benches: list[FakeBench] = []
        monkeypatch.setattr(peer, "read_client", self.read)
        monkeypatch.setattr(peer, "cpu_seconds", self.read_cpu)
        monkeypatch.setattr(peer, "_machine", lambda: ({"hostname": "host-a"}, ("machine: test",)))

    def read(self, name: str | None, state_dir: Path) -> ClientView:
        current = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
        return client_view(current)

    def read_cpu(self, pid: int | None) -> float | None:
        assert pid == 4242
        self.cpu += 0.1  # 0.1 s of CPU between two readings
        return self.cpu

    def connect(self, refuse: bool = False) -> Any:
        def make(address: str, port: int) -> FakeBench:
            bench = FakeBench(address, port, refuse=refuse)
            self.benches.append(bench)
            return bench

        return make


# ----------------------------------------------------------------------- status side


def test_the_peer_row_is_found_by_address_or_by_name() -> None:
    client = view(row(PEER), row("10.77.0.13", name="office"))
    assert find_peer(client, PEER) == row(PEER)
    assert find_peer(client, "office") == row("10.77.0.13", name="office")
    assert find_peer(client, "10.77.0.99") is None
    target = resolve_target(client, "office")
    assert (target.address, target.name) == ("10.77.0.13", "office")


def test_an_address_in_the_network_without_a_row_may_still_be_a_member() -> None:
    assert resolve_target(view(), "10.77.0.50") == PeerTarget("10.77.0.50", None, None)


@pytest.mark.parametrize(
    ("client", "target", "message"),
    [
        (
            view(row(PEER)),
            "192.168.1.7",
            f"192.168.1.7 is not a member of the network (peers: {PEER})",
        ),
        (view(), "10.99.0.1", "10.99.0.1 is not a member of the network (peers: none seen yet)"),
        (
            view(row(PEER)),
            "office",
            f"no peer named 'office' (peers: {PEER}): give its VPN address",
        ),
        (view(), "10.77.0.11", "10.77.0.11 is this client's own address: name another member"),
        (
            view(address=None),
            PEER,
            "client a has no VPN address yet (not logged in to its server): "
            "try again when `p2pvpn status` shows one",
        ),
    ],
)
def test_targets_that_cannot_be_measured_are_named(
    client: ClientView, target: str, message: str
) -> None:
    with pytest.raises(BenchError) as info:
        resolve_target(client, target)
    assert str(info.value) == message


def test_a_snapshot_with_odd_values_gives_an_empty_view() -> None:
    client = client_view({"address": 7, "pid": "x", "peers": "none", "bench_server": 1})
    assert (client.address, client.pid, client.peers, client.bench_server) == (None, None, (), None)


@pytest.mark.parametrize(
    ("path", "kind", "shown"),
    [
        (DIRECT, "direct", DIRECT),
        ("lan 192.168.50.3:5000", "lan", "lan 192.168.50.3:5000"),
        ("via 10.77.0.13", "relay client", "relay client 10.77.0.13"),
        ("relay server", "relay server", "relay server"),
        (None, "unknown", "unknown"),
        ("teleport", "unknown", "teleport"),
    ],
)
def test_paths_are_sorted_into_kinds(path: str | None, kind: str, shown: str) -> None:
    assert path_kind(path) == kind
    assert describe_path(path) == shown


def test_cpu_seconds_add_user_and_system_time_of_all_threads(tmp_path: Path) -> None:
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "77").mkdir()
    # A command name with a space and a parenthesis must not shift the fields.
    fields = ["S", *["0"] * 10, str(3 * ticks), str(ticks), *["0"] * 30]
    (tmp_path / "77" / "stat").write_text(f"77 (p2pvpn (x) y) {' '.join(fields)}\n")
    (tmp_path / "77" / "cmdline").write_bytes(b"python3\0-m\0p2pvpn\0run\0")
    assert cpu_seconds(77, tmp_path) == pytest.approx(4.0)
    assert cpu_seconds(78, tmp_path) is None
    assert cpu_seconds(None, tmp_path) is None
    (tmp_path / "79").mkdir()
    (tmp_path / "79" / "stat").write_text("79 (short) S 1\n")
    (tmp_path / "79" / "cmdline").write_bytes(b"p2pvpn\0run\0")
    assert cpu_seconds(79, tmp_path) is None


def test_a_pid_that_is_not_a_p2pvpn_process_has_no_cpu_time(tmp_path: Path) -> None:
    # The client's pid in its own PID namespace (a container) is another process here.
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "stat").write_text("1 (systemd) S " + " ".join(["100"] * 40) + "\n")
    (tmp_path / "1" / "cmdline").write_bytes(b"/sbin/init\0")
    assert cpu_seconds(1, tmp_path) is None


def test_cpu_seconds_of_this_process_are_readable(tmp_path: Path) -> None:
    import os

    # /proc/self as the client would be: a p2pvpn command line, the real stat.
    own = tmp_path / str(os.getpid())
    own.mkdir()
    (own / "cmdline").write_bytes(b"p2pvpn\0run\0")
    (own / "stat").write_text(Path("/proc/self/stat").read_text())
    seconds = cpu_seconds(os.getpid(), tmp_path)
    assert seconds is not None and seconds > 0


def test_cpu_per_gb() -> None:
    assert cpu_per_gb(2.0, 500_000_000) == pytest.approx(4.0)
    assert cpu_per_gb(None, 500_000_000) is None
    assert cpu_per_gb(1.0, 0) is None


# ----------------------------------------------------------------------- rates


def test_the_udp_rate_is_a_fraction_of_tcp_unless_given() -> None:
    options = PeerOptions(seconds=1.0, udp_rate=None)
    assert udp_rate(options, 100e6) == pytest.approx(100e6 * UDP_FRACTION_OF_TCP)
    assert udp_rate(options, None) == 10e6
    assert udp_rate(PeerOptions(seconds=1.0, udp_rate=5e6), 100e6) == 5e6
    assert options.udp_rate_source() == "90% of TCP; over 5 % loss, again at 90% of what arrived"


def test_udp_bytes_count_what_went_through_the_local_client() -> None:
    assert udp_bytes(udp_result("client", 8e6, 1000, 900)) == 1000 * 1000  # encrypted here
    assert udp_bytes(udp_result("server", 8e6, 1000, 900)) == 900 * 1000  # decrypted here


@pytest.mark.parametrize(
    ("text", "value"), [("250M", 250e6), ("1.5g", 1.5e9), ("8000000", 8e6), ("search", "search")]
)
def test_udp_rate_option(text: str, value: float | str) -> None:
    assert args_for(udp_rate=text).udp_rate == value


@pytest.mark.parametrize("argv", [["--udp-rate", "fast"], ["--seconds", "0"], ["--port", "0"]])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    peer.configure_parser(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([PEER, *argv])


# ----------------------------------------------------------------------- bench peer


def test_both_directions_are_measured_and_shown_side_by_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    report = peer.run(args_for(), connect=scenario.connect())
    [bench] = scenario.benches
    assert [name for name, _ in bench.calls] == [
        "hello",
        "rtt",
        *("tcp", "udp", "loaded_rtt") * 2,
    ]
    upload_rate, download_rate = (value for name, value in bench.calls if name == "udp")
    assert upload_rate == pytest.approx(800e6 * 0.9)
    assert download_rate == pytest.approx(400e6 * 0.9)
    assert report.ok
    results = report.to_json()["results"]
    assert results["path"] == {
        "before": DIRECT,
        "after": DIRECT,
        "kind_before": "direct",
        "kind_after": "direct",
        "changed": False,
    }
    assert results["upload"]["tcp"] is not None and results["download"]["tcp"] is not None
    assert (
        results["upload"]["udp_rate_source"]
        == "90% of TCP; over 5 % loss, again at 90% of what arrived"
    )
    assert results["upload"]["udp_first_try"] is None
    # Three tests per direction, 0.1 s of CPU each; upload moved 100 + 0.9*100*0.99... MB.
    assert results["upload"]["cpu_seconds"] == pytest.approx(0.3)
    upload_bytes = 100 * MB + int(720e6 / 8000) * 1000 + 10 * MB
    assert results["upload"]["bytes_moved"] == upload_bytes
    assert results["upload"]["cpu_seconds_per_gb"] == pytest.approx(0.3 / (upload_bytes / 1e9))
    assert results["cpu"]["seconds"] == pytest.approx(0.6)
    assert [(bar.group, bar.label) for bar in report.bars] == [
        ("TCP Mbit/s", "upload"),
        ("UDP Mbit/s", "upload"),
        ("TCP Mbit/s", "download"),
        ("UDP Mbit/s", "download"),
    ]
    assert report.bars[0].value == 800.0
    assert [series.label for series in report.series] == [
        "upload TCP",
        "upload UDP 720 Mbit/s",
        "download TCP",
        "download UDP 360 Mbit/s",
    ]
    assert report.series[0].points == [(0.5, 800.0), (1.0, 800.0)]
    text = report.text
    assert f"p2pvpn bench peer: 10.77.0.11 -> {PEER} (host host-b)" in text
    assert f"path: {DIRECT}" in text
    assert "WARNING" not in text
    assert "machine: test" in text
    lines = text.splitlines()
    header = next(line for line in lines if "upload" in line and "download" in line)
    assert header.index("upload") < header.index("download")
    tcp_line = next(line for line in lines if line.startswith("TCP "))
    assert tcp_line.split()[1:] == ["800", "Mbit/s", "400", "Mbit/s"]
    assert any(line.startswith("UDP loss ") and "1.00 %" in line for line in lines)
    assert "UDP rate: 90% of TCP; over 5 % loss, again at 90% of what arrived" in text


def test_a_path_change_during_the_run_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(
        monkeypatch,
        snapshot(row()),
        snapshot(row()),
        snapshot(row(path="relay server")),
    )
    report = peer.run(args_for(), connect=scenario.connect())
    assert report.to_json()["results"]["path"]["changed"] is True
    assert (
        "WARNING: the path changed during the run, to relay server: the figures mix both paths"
    ) in report.text


def test_a_fixed_udp_rate_and_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    peer.run(args_for(udp_rate="20M"), connect=scenario.connect())
    assert [value for name, value in scenario.benches[0].calls if name == "udp"] == [20e6, 20e6]
    report = peer.run(args_for(udp_rate="search"), connect=scenario.connect())
    starts = [value for name, value in scenario.benches[1].calls if name == "udp_search"]
    assert starts == [800e6, 400e6]
    assert report.to_json()["results"]["upload"]["udp_search"] is not None
    assert "UDP rate: search (3 steps from the TCP figure)" in report.text


def test_a_lossy_default_udp_rate_is_tried_again_at_what_arrived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))

    def connect(address: str, port: int) -> FakeBench:
        bench = FakeBench(address, port)
        plain_udp = bench.udp

        def udp(rate_bps: float, seconds: float, **kwargs: Any) -> UdpResult:
            result = plain_udp(rate_bps, seconds, **kwargs)
            if rate_bps < 300e6:
                return result
            sent = result.sent_packets  # above 300 Mbit/s, 3 in 4 are lost
            return udp_result(result.sender, rate_bps, sent, sent // 4)

        bench.udp = udp  # type: ignore[method-assign]
        scenario.benches.append(bench)
        return bench

    report = peer.run(args_for(), connect=connect)
    rates = [value for name, value in scenario.benches[0].calls if name == "udp"]
    assert rates == pytest.approx([720e6, 720e6 / 4 * 0.9, 360e6, 360e6 / 4 * 0.9], rel=1e-3)
    upload = report.to_json()["results"]["upload"]
    assert upload["udp_first_try"] is not None
    assert upload["udp_rate_bps"] == pytest.approx(162e6, rel=1e-3)
    assert "  upload: first try at 720 Mbit/s lost 75.00 %" in report.text.splitlines()
    assert report.ok


def test_a_refused_peer_says_how_to_make_it_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    with pytest.raises(BenchError) as info:
        peer.run(args_for(), connect=scenario.connect(refuse=True))
    assert str(info.value) == (
        f"{PEER} does not answer benchmarks on port {DEFAULT_PORT}: run `p2pvpn bench serve` "
        "there (or set bench_server = true in its config)"
    )


def test_an_address_nobody_answers_from_is_not_a_member(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hello's packets give the address a row, but nothing ever comes back from it.
    stranger = row("10.77.0.50", path="relay server", bytes_in=0)
    scenario = Scenario(monkeypatch, snapshot(row()), snapshot(row(), stranger))
    with pytest.raises(BenchError) as info:
        peer.run(args_for("10.77.0.50"), connect=scenario.connect(refuse=True))
    assert str(info.value) == f"10.77.0.50 is not a member of the network (peers: {PEER})"


def test_a_member_seen_for_the_first_time_that_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    newcomer = row("10.77.0.50", path="relay server", bytes_in=60)
    scenario = Scenario(monkeypatch, snapshot(), snapshot(newcomer))
    with pytest.raises(BenchError, match=r"10\.77\.0\.50 does not answer benchmarks on port"):
        peer.run(args_for("10.77.0.50"), connect=scenario.connect(refuse=True))


def test_a_failed_test_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Scenario(monkeypatch, snapshot(row()))
    monkeypatch.setattr(peer_run, "BUSY_WAIT", 0.05)

    def busy(*args: Any, **kwargs: Any) -> Any:
        raise BenchError("the bench server is busy with another test")

    def connect(address: str, port: int) -> FakeBench:
        bench = FakeBench(address, port)
        bench.loaded_rtt = busy  # type: ignore[method-assign]
        return bench

    report = peer.run(args_for(), connect=connect)
    assert not report.ok
    assert "failed: upload loaded RTT: the bench server is busy with another test" in report.text
    assert report.to_json()["results"]["download"]["tcp"] is not None


def test_a_busy_server_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    monkeypatch.setattr(peer_run, "BUSY_RETRY", 0.01)
    answers = [BenchError("refused tcp: busy: another test is running, try later")]

    def connect(address: str, port: int) -> FakeBench:
        bench = FakeBench(address, port)
        plain_tcp = bench.tcp

        def tcp(seconds: float, **kwargs: Any) -> TcpResult:
            if answers:
                raise answers.pop()
            return plain_tcp(seconds, **kwargs)

        bench.tcp = tcp  # type: ignore[method-assign]
        scenario.benches.append(bench)
        return bench

    report = peer.run(args_for(), connect=connect)
    assert report.ok, report.text
    assert report.series[0].label == "upload TCP"  # one, though tried twice
    assert len(report.series) == 4


def test_unreadable_cpu_time_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    monkeypatch.setattr(peer, "cpu_seconds", lambda pid: None)
    report = peer.run(args_for(), connect=scenario.connect())
    assert report.to_json()["results"]["cpu"]["seconds_per_gb"] is None
    assert "client CPU: not readable (/proc/4242/stat)" in report.text


def test_no_running_client_is_a_clear_error(tmp_path: Path) -> None:
    args = args_for()
    args.state_dir = tmp_path
    with pytest.raises(BenchError, match="no p2pvpn client running for default"):
        peer.run(args)


# ----------------------------------------------------------------------- serving


class FakeServer:
    bound: ClassVar[list[FakeServer]] = []

    def __init__(self, address: str, port: int = DEFAULT_PORT, **_: Any) -> None:
        self._address, self.port, self.stopped = address, port, False

    def start(self) -> None:
        if self._address == "10.77.0.66":
            raise BenchError(f"cannot bind {self._address}:{self.port}: address in use")
        FakeServer.bound.append(self)

    @property
    def address(self) -> tuple[str, int]:
        return self._address, self.port

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> list[FakeServer]:
    FakeServer.bound = []
    monkeypatch.setattr(peer_server, "BenchServer", FakeServer)
    return FakeServer.bound


def test_the_bench_server_follows_the_address(fake_servers: list[FakeServer]) -> None:
    server = peer_server.FollowingBenchServer(5301)
    assert server.endpoint is None
    assert server.follow("10.77.0.11") is True
    assert server.follow("10.77.0.11") is False
    assert server.endpoint == "10.77.0.11:5301"
    assert server.follow("10.77.0.12") is True
    assert [s.stopped for s in fake_servers] == [True, False]
    with pytest.raises(BenchError, match=r"cannot bind 10\.77\.0\.66:5301"):
        server.follow("10.77.0.66")
    assert server.endpoint is None and fake_servers[1].stopped
    assert server.follow("10.77.0.13") is True
    server.stop()
    server.stop()
    assert all(s.stopped for s in fake_servers)


def test_bench_serve_waits_for_the_address_and_moves_with_it(
    monkeypatch: pytest.MonkeyPatch, fake_servers: list[FakeServer]
) -> None:
    monkeypatch.setattr(peer_serve, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(peer_serve, "ADDRESS_POLL_SECONDS", 0.01)
    answers = [
        BenchError("no p2pvpn client running for default"),
        snapshot(address=None),
        snapshot(),
        snapshot(),
        snapshot(address="10.77.0.21/24"),
    ]
    stop = threading.Event()

    def read(name: str | None, state_dir: Path) -> ClientView:
        answer = answers.pop(0) if answers else snapshot(address="10.77.0.21/24")
        if not answers:
            stop.set()
        if isinstance(answer, BenchError):
            raise answer
        return client_view(answer)

    monkeypatch.setattr(peer_serve, "read_client", read)
    assert peer_serve.serve_bench(None, Path("/x"), 5301, 5.0, stop=stop) == 0
    assert [s.address for s in fake_servers] == [("10.77.0.11", 5301), ("10.77.0.21", 5301)]
    assert all(s.stopped for s in fake_servers)


def test_bench_serve_gives_up_without_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_serve, "ADDRESS_POLL_SECONDS", 0.01)
    monkeypatch.setattr(peer_serve, "read_client", lambda name, state_dir: view(address=None))
    with pytest.raises(BenchError, match=r"no VPN address to serve on after 0\.05 s"):
        peer_serve.serve_bench(None, Path("/x"), 5301, 0.05, stop=threading.Event())


def test_bench_serve_is_not_needed_when_the_client_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serving = client_view({**snapshot(), "bench_server": "10.77.0.11:5301"})
    monkeypatch.setattr(peer_serve, "read_client", lambda name, state_dir: serving)
    with pytest.raises(BenchError, match=r"already answers benchmarks on 10\.77\.0\.11:5301"):
        peer_serve.serve_bench(None, Path("/x"), 5301, 1.0, stop=threading.Event())


def test_status_shows_the_bench_server() -> None:
    text = format_status({**snapshot(), "bench_server": "10.77.0.11:5301"}, now=0.0)
    assert "bench server: on 10.77.0.11:5301" in text.splitlines()
    assert "bench server" not in format_status(snapshot(), now=0.0)


def test_the_client_uses_the_bench_port() -> None:
    assert node.BENCH_PORT == DEFAULT_PORT


def test_progress_goes_to_stderr_not_into_the_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = Scenario(monkeypatch, snapshot(row()))
    report = peer.run(args_for(), connect=scenario.connect())
    captured = capsys.readouterr()
    assert "upload TCP" in captured.err
    assert captured.out == ""
    assert report.text.startswith(f"p2pvpn bench peer: {IPv4Interface(OWN).ip} -> {PEER}")


def test_the_real_traffic_over_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command against a real bench server, the client's status faked."""
    from p2pvpn.bench.traffic import BenchServer

    loopback = row("127.0.0.1", path="lan 127.0.0.1:1")
    scenario = Scenario(monkeypatch, snapshot(loopback, address="127.0.0.2/8"))
    with BenchServer("127.0.0.1", 0) as server:
        port = server.address[1]
        report = peer.run(args_for("127.0.0.1", port=port, seconds=0.5, udp_rate="20M"))
    results = report.to_json()["results"]
    assert report.ok, report.text
    for direction in ("upload", "download"):
        assert results[direction]["tcp"]["bits_per_second"] > 0
        assert results[direction]["udp"]["received_packets"] > 0
        assert results[direction]["loaded"]["rtt"]["received"] > 0
    assert results["rtt_idle"]["received"] > 0
    assert results["path"]["kind_before"] == "lan"
    assert scenario.benches == []  # the real BenchClient, not the fake
