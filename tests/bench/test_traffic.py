"""The bench traffic tool on loopback: results, the receiver's counting, a hostile client.

Every run moves at most about half a second of traffic, so the module takes a
few seconds. Loss accounting is tested on the sans-I/O counter with gaps made
on purpose: how much loopback drops at a high rate depends on the machine.
"""

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvpn.bench import _traffic_server, traffic
from p2pvpn.bench._traffic_wire import (
    ECHO,
    HELLO,
    INTERVAL,
    MAX_LENGTH,
    MIN_LENGTH,
    UDP_DATA,
    Datagram,
    Interval,
    IntervalMeter,
    RequestError,
    UdpCounter,
    decode_line,
    pack_datagram,
    parse_datagram,
    parse_request,
)
from p2pvpn.bench.report import BenchError
from p2pvpn.bench.traffic import BenchClient, BenchRefusedError, BenchServer
from p2pvpn.netns import process_env, wait_for

LOCAL = "127.0.0.1"
OTHER = "127.0.0.2"  # another loopback address: "a different member"


@pytest.fixture
def server() -> Iterator[BenchServer]:
    bench = BenchServer(LOCAL, 0, max_seconds=5.0)
    bench.start()
    yield bench
    bench.stop()


@pytest.fixture
def client(server: BenchServer) -> BenchClient:
    return BenchClient(LOCAL, server.address[1], timeout=5.0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCAL, 0))
        port: int = probe.getsockname()[1]
        return port


class _Control:
    """A hand-made control connection, as a hostile or odd client would open one."""

    def __init__(self, server: BenchServer) -> None:
        self.sock = socket.create_connection(server.address, timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        return self.answer()

    def answer(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the server hung up without an answer"
        return decode_line(line.rstrip(b"\n"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- TCP --------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_tcp_measures_at_the_receiver_with_intervals(client: BenchClient, reverse: bool) -> None:
    seen: list[Interval] = []
    result = client.tcp(0.6, reverse=reverse, on_interval=seen.append)
    assert result.sender == ("server" if reverse else "client")
    assert result.bytes > 0
    assert result.seconds > 0
    assert result.bits_per_second == pytest.approx(result.bytes * 8 / result.seconds)
    assert sum(interval.bytes for interval in result.intervals) == result.bytes
    assert list(result.intervals) == seen  # every interval, also the last, partial one
    assert result.intervals[0].start == 0.0
    assert all(i.end - i.start <= INTERVAL + 1e-9 for i in result.intervals)
    json.dumps(result.to_json())


def test_tests_run_back_to_back(client: BenchClient) -> None:
    """A client returns only when the server has ended the test: the next is not busy."""
    for _ in range(3):
        assert client.tcp(0.05).bytes > 0
        assert client.rtt(1, interval=0.01).received == 1


# -- UDP --------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_udp_at_a_low_rate_sends_the_right_count_and_loses_nothing(
    client: BenchClient, reverse: bool
) -> None:
    seen: list[Interval] = []
    result = client.udp(2e6, 0.5, length=500, reverse=reverse, on_interval=seen.append)
    expected = 2e6 * 0.5 / (8 * 500)  # 250 datagrams
    assert abs(result.sent_packets - expected) <= 2
    assert result.received_packets == result.sent_packets
    assert result.lost_packets == 0
    assert result.loss_percent == 0.0
    assert result.length == 500
    assert result.target_bps == 2e6
    assert result.sent_bps == pytest.approx(2e6, rel=0.1)
    assert result.jitter_ms is not None
    assert sum(i.bytes for i in result.intervals) == result.received_packets * 500
    assert list(result.intervals) == seen
    json.dumps(result.to_json())


def test_udp_counter_counts_gaps_as_loss_and_jitter_as_rfc3550() -> None:
    counter = UdpCounter(session=7)
    transit = [0.010, 0.012, 0.010, 0.012, 0.010, 0.012]
    for step, seq in enumerate([0, 1, 2, 5, 6, 9]):
        sent = step * 0.1
        assert counter.feed(Datagram(UDP_DATA, 7, seq, sent), 100, sent + transit[step])
    assert not counter.feed(Datagram(UDP_DATA, 8, 10, 0.0), 100, 1.0)  # another session
    assert not counter.feed(Datagram(ECHO, 7, 11, 0.0), 100, 1.0)  # not data
    assert counter.received == 6
    assert counter.lost() == 4  # 10 expected by sequence number
    assert counter.lost(sent=12) == 6  # the last two never came
    jitter = 0.0
    for _ in range(5):
        jitter += (0.002 - jitter) / 16
    assert counter.jitter_ms == pytest.approx(jitter * 1000)
    summary = counter.summary()
    assert summary["received_bytes"] == 600
    assert summary["max_seq"] == 9


def test_udp_result_from_a_summary_with_loss() -> None:
    counter = UdpCounter(session=1)
    for seq in (0, 2, 3):
        counter.feed(Datagram(UDP_DATA, 1, seq, 0.0), 1000, seq * 0.3)
    request = parse_request(
        {"test": "udp", "seconds": 1, "rate": 32000, "length": 1000}, max_seconds=5
    )
    result = traffic._udp_result(request, "client", 4, 1.0, counter.summary())
    assert (result.sent_packets, result.received_packets, result.lost_packets) == (4, 3, 1)
    assert result.loss_percent == 25.0
    assert result.sent_bps == 32000
    assert result.received_bps == 24000


def test_interval_meter_sums_to_the_total_and_keeps_quiet_intervals() -> None:
    meter = IntervalMeter()
    for now, count in [(10.0, 5), (10.2, 5), (10.6, 7), (11.7, 3)]:
        meter.add(now, count)
    intervals = meter.finish()
    assert [i.bytes for i in intervals] == [10, 7, 0, 3]
    assert intervals[-1] == Interval(1.5, pytest.approx(1.7), 3)
    assert meter.total == 20
    assert meter.seconds == pytest.approx(1.7)


def test_datagram_header_round_trip_and_foreign_datagrams() -> None:
    buffer = bytearray(MIN_LENGTH)
    pack_datagram(buffer, HELLO, 0xDEADBEEF, 2**40, 12.5)
    assert parse_datagram(buffer) == Datagram(HELLO, 0xDEADBEEF, 2**40, 12.5)
    assert parse_datagram(buffer[:-1]) is None  # shorter than any of ours
    assert parse_datagram(b"X" + bytes(buffer[1:])) is None
    buffer[4] = 99
    assert parse_datagram(buffer) is None


# -- RTT --------------------------------------------------------------------------


def test_rtt_on_loopback(client: BenchClient) -> None:
    result = client.rtt(5, interval=0.01)
    assert result.sent == 5
    assert result.received == 5
    assert len(result.rtts_ms) == 5
    assert result.p50_ms is not None and result.p50_ms > 0
    assert result.max_ms == max(result.rtts_ms)
    json.dumps(result.to_json())


def test_loaded_rtt_runs_echo_during_tcp(client: BenchClient) -> None:
    rtt, tcp = client.loaded_rtt(0.8, interval=0.02)
    assert tcp.bytes > 0
    assert rtt.sent >= 1
    assert rtt.received >= 1


def test_echo_answers_the_same_bytes(server: BenchServer) -> None:
    control = _Control(server)
    try:
        session = control.ask({"test": "rtt", "seconds": 2})["session"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            udp.connect(server.address)
            request = bytearray(300)
            pack_datagram(request, ECHO, session, 1, 0.0)
            request[-5:] = b"hello"
            udp.send(request)
            assert udp.recv(70000) == request
    finally:
        control.close()


# -- the server's rules -----------------------------------------------------------


def test_a_second_test_is_refused_as_busy(server: BenchServer, client: BenchClient) -> None:
    first = _Control(server)
    try:
        assert first.ask({"test": "rtt", "seconds": 4})["ok"] is True
        with pytest.raises(BenchError, match="busy"):
            client.tcp(0.1)
        assert client.hello()["version"]  # hello is no test: answered while busy
    finally:
        first.close()
    assert wait_for(lambda: _tcp_runs(client), timeout=10)


def _tcp_runs(client: BenchClient) -> bool:
    try:
        return client.tcp(0.05).bytes > 0
    except BenchError:
        return False


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "not a JSON line"),
        (b"[1, 2]\n", "not a JSON object"),
        (b"[" * 3000 + b"\n", "not a JSON line"),
        (b"x" * 5000, "longer than 4096"),
        (b'{"test": "flood"}\n', "unknown test"),
        (b'{"test": "tcp", "seconds": 600}\n', "seconds 600 out of range"),
        (b'{"test": "tcp", "seconds": "10"}\n', "seconds must be a number"),
        (b'{"test": "tcp", "seconds": 1, "reverse": 1}\n', "reverse must be true or false"),
        (b'{"test": "udp", "seconds": 1, "rate": 1e12, "length": 100}\n', "rate"),
        (b'{"test": "udp", "seconds": 1, "rate": 1e6, "length": 10}\n', "length 10 out of"),
        (b'{"test": "udp", "seconds": 1, "rate": 1e6, "length": 70000}\n', "length 70000"),
        (b'{"test": "udp", "seconds": 1, "rate": NaN, "length": 100}\n', "rate"),
    ],
)
def test_bad_requests_get_an_error_and_the_server_keeps_serving(
    server: BenchServer, client: BenchClient, line: bytes, error: str
) -> None:
    control = _Control(server)
    try:
        control.send(line)
        answer = control.answer()
        assert error in answer["error"]
        assert control.file.readline() == b""  # that connection is closed
    finally:
        control.close()
    assert client.rtt(1, interval=0.01).received == 1


def test_request_bounds() -> None:
    assert parse_request({"test": "tcp", "seconds": 5}, max_seconds=5).seconds == 5
    with pytest.raises(RequestError, match="out of range"):
        parse_request({"test": "tcp", "seconds": 5.1}, max_seconds=5)
    udp = {"test": "udp", "seconds": 1, "rate": 100e9, "length": MAX_LENGTH}
    assert parse_request(udp, max_seconds=5).length == MAX_LENGTH
    with pytest.raises(RequestError, match="whole number"):
        parse_request({**udp, "length": 100.5}, max_seconds=5)
    with pytest.raises(RequestError, match="must be a number"):
        parse_request({**udp, "rate": True}, max_seconds=5)


def test_reverse_udp_and_echo_go_only_to_the_control_connections_ip(
    server: BenchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hello and echo from another address are ignored: nothing is sent there."""
    monkeypatch.setattr(_traffic_server, "GRACE", 0.5)
    control = _Control(server)  # from 127.0.0.1
    try:
        request = {"test": "udp", "seconds": 0.3, "rate": 1e6, "length": 100, "reverse": True}
        session = control.ask(request)["session"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind((OTHER, 0))
            for kind in (HELLO, ECHO):
                datagram = bytearray(MIN_LENGTH)
                pack_datagram(datagram, kind, session, 0, 0.0)
                stranger.sendto(datagram, server.address)
            assert "no UDP hello" in control.answer()["error"]
            stranger.settimeout(0.2)
            with pytest.raises(TimeoutError):
                stranger.recv(70000)
    finally:
        control.close()


def test_a_closed_port_is_a_refusal_naming_address_and_port() -> None:
    port = _free_port()
    with pytest.raises(BenchRefusedError, match=rf"127\.0\.0\.1:{port} \(connection refused\)"):
        BenchClient(LOCAL, port, timeout=2).hello()


def test_a_taken_port_names_address_and_port(server: BenchServer) -> None:
    port = server.address[1]
    with pytest.raises(BenchError, match=rf"127\.0\.0\.1:{port}"):
        BenchServer(LOCAL, port).start()


def test_stop_is_bounded_and_idempotent(server: BenchServer) -> None:
    control = _Control(server)
    control.ask({"test": "rtt", "seconds": 4})  # a test in progress
    started = time.monotonic()
    server.stop()
    server.stop()
    assert time.monotonic() - started < traffic.JOIN_TIMEOUT + 1
    assert control.file.readline() == b""
    control.close()


# -- the agent --------------------------------------------------------------------


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pvpn.bench.traffic", *args]


def test_agent_serves_and_measures_with_json_lines() -> None:
    serve = subprocess.Popen(
        _agent("serve", LOCAL, "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(),
    )
    try:
        assert serve.stdout is not None
        words = serve.stdout.readline().split()
        assert words[:2] == ["listening", LOCAL], words
        port = words[2]
        done = subprocess.run(
            _agent("tcp", LOCAL, "--port", port, "--seconds", "0.6"),
            capture_output=True, text=True, timeout=30, check=False, env=process_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        messages = [json.loads(line) for line in done.stdout.splitlines()]
        assert all("interval" in message for message in messages[:-1])
        result = messages[-1]["result"]
        assert result["bytes"] > 0
        assert sum(i["bytes"] for i in result["intervals"]) == result["bytes"]
    finally:
        serve.terminate()
        _, log = serve.communicate(timeout=10)
    assert serve.returncode == 0
    assert "asked for tcp" in log


def test_agent_prints_an_error_line_when_nobody_answers() -> None:
    done = subprocess.run(
        _agent("udp", LOCAL, "--port", str(_free_port()), "--seconds", "0.2"),
        capture_output=True, text=True, timeout=30, check=False, env=process_env(),
    )  # fmt: skip
    assert done.returncode == 1
    assert "nobody answers benchmarks at 127.0.0.1:" in json.loads(done.stdout)["error"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_request_line_is_a_request_or_a_request_error(line: bytes) -> None:
    with contextlib.suppress(RequestError):
        parse_request(decode_line(line), max_seconds=5)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["test", "seconds", "rate", "length", "reverse"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    )
)
def test_any_json_request_is_bounded_or_refused(message: dict[str, Any]) -> None:
    try:
        request = parse_request(message, max_seconds=5)
    except RequestError:
        return
    assert request.test in ("hello", "tcp", "udp", "rtt")
    if request.test != "hello":
        assert 0 < request.seconds <= 5
    if request.test == "udp":
        assert MIN_LENGTH <= request.length <= MAX_LENGTH
        assert 1 <= request.rate <= 100e9


class _MadeUpPath(BenchClient):
    """`udp_search` against a made-up path: ``capacity`` bit/s, a sender that tops out at 900M."""

    capacity = 300e6

    def udp(self, rate_bps: float, seconds: float, **kwargs: Any) -> traffic.UdpResult:
        sent_bps = min(rate_bps, 900e6)
        received_bps = min(sent_bps, self.capacity)
        loss = 100 * (1 - received_bps / sent_bps)
        return traffic.UdpResult(
            "client", rate_bps, 1400, 100, 100, 0, loss, sent_bps, received_bps, seconds, None, ()
        )


def test_udp_search_doubles_then_bisects() -> None:
    trials: list[traffic.UdpResult] = []
    found = _MadeUpPath(LOCAL).udp_search(100e6, seconds=1, steps=6, on_trial=trials.append)
    rates = [round(trial.target_bps / 1e6) for trial in found.trials]
    assert rates == [100, 200, 400, 300, 350, 325]  # doubling, then bisecting 300..400
    assert trials == list(found.trials)
    assert found.bits_per_second == 300e6
    assert found.loss_percent == 0
    assert found.sender_limited is False
    json.dumps(found.to_json())


def test_udp_search_lowers_the_rate_until_one_passes() -> None:
    found = _MadeUpPath(LOCAL).udp_search(1000e6, seconds=1, steps=4)
    # each loss halves (90 % of what was sent, at most half) until 250 passes; then bisects
    assert [round(t.target_bps / 1e6) for t in found.trials] == [1000, 500, 250, 375]
    assert found.bits_per_second == 250e6
    assert found.sender_limited is False


def test_udp_search_says_when_the_sender_was_the_limit() -> None:
    path = _MadeUpPath(LOCAL)
    path.capacity = 2e9
    found = path.udp_search(500e6, seconds=1, steps=4)
    assert [round(t.target_bps / 1e6) for t in found.trials] == [500, 1000, 700, 800]
    assert found.bits_per_second == 900e6  # the step at 1000 that sent only 900, lossless
    assert found.sender_limited is True
