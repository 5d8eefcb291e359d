"""What measures `p2pvpn bench local`: a `Tool`, and the default one, p2pvpn's own traffic agents.

A tool has a server in c2's namespace and measures from c1's: TCP
throughput with its intervals, the highest UDP rate under 1 % loss, the
idle RTT and the RTT while a TCP run goes on. Its results are plain dicts
in the shapes of the JSON report (``bits_per_second``, ``intervals`` of
``start``/``end``/``bytes``; ``p50_ms``/``p99_ms``; the UDP search's
``best``/``trials``), so the rest of the bench does not care who measured.

`OwnTool` runs ``python -m p2pvpn.bench.traffic`` agents in the namespaces
(one JSON line per interval, then the result); RTT is its UDP echo. The
iperf3 + ping tool is `p2pvpn.bench.local_iperf3.Iperf3Tool`.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from p2pvpn.bench.local_net import LocalNet
from p2pvpn.bench.report import BenchError
from p2pvpn.netns import Namespace, Process, process_env, python_argv

__all__ = [
    "LOSS_LIMIT",
    "OWN_TOOL_LINE",
    "IntervalCallback",
    "OwnTool",
    "Tool",
    "TrialCallback",
    "interval_bps",
]

LOSS_LIMIT = 1.0  # percent: the UDP search's bound
AGENT_SLACK = 30.0  # seconds an agent may take beyond what it was asked to measure
AGENT_MODULE = "p2pvpn.bench.traffic"
OWN_TOOL_LINE = f"tool: own traffic generator ({AGENT_MODULE}; RTT: its UDP echo)"
"""The table's line that says who measured."""
IntervalCallback = Callable[[float, float], None]
"""Called with (seconds since the run's start, bits/s of that interval)."""
TrialCallback = Callable[[dict[str, Any]], None]
"""Called with each step of a UDP search (``target_bps``, ``loss_percent``, ...)."""


class Tool(Protocol):
    name: str

    def start_server(self, address: str) -> None: ...

    def stop_server(self) -> None: ...

    def tcp(self, dst: str, seconds: float, on_interval: IntervalCallback) -> dict[str, Any]: ...

    def udp_search(
        self,
        dst: str,
        start_bps: float,
        *,
        seconds: float,
        steps: int,
        length: int,
        on_trial: TrialCallback,
    ) -> dict[str, Any]: ...

    def rtt(self, dst: str, count: int) -> dict[str, Any]: ...

    def loaded_rtt(
        self, dst: str, seconds: float, on_interval: IntervalCallback
    ) -> dict[str, Any]: ...


def interval_bps(interval: dict[str, Any]) -> float:
    seconds = float(interval["end"]) - float(interval["start"])
    return float(interval["bytes"]) * 8 / seconds if seconds > 0 else 0.0


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


def run_agent(
    ns: Namespace,
    args: Sequence[str],
    timeout: float,
    on_message: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Run one ``p2pvpn.bench.traffic`` client command in ``ns``; its ``result``.

    Every other JSON line (``interval``, ...) goes to ``on_message(key,
    value)`` as it comes, for the live progress. The agent is killed after
    ``timeout`` seconds, and when we are interrupted.
    """
    argv = ns.exec_argv(python_argv("-m", AGENT_MODULE, *args))
    agent = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=process_env(),
    )
    timer = threading.Timer(timeout, agent.kill)
    timer.start()
    result: dict[str, Any] | None = None
    other: list[str] = []
    try:
        assert agent.stdout is not None
        for line in agent.stdout:
            message = _json_line(line)
            if message is None:
                other.append(line.rstrip())
            elif "error" in message:
                raise BenchError(f"traffic {args[0]}: {message['error']}")
            elif "result" in message:
                result = dict(message["result"])
            elif on_message is not None:
                for key, value in message.items():
                    on_message(key, value)
        agent.wait()
    finally:
        timer.cancel()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    if result is None:
        tail = "\n".join(other[-8:]) or "no output"
        raise BenchError(f"traffic {args[0]} gave no result (exit {agent.returncode}): {tail}")
    return result


def _interval_relay(on_interval: IntervalCallback) -> Callable[[str, Any], None]:
    def relay(key: str, value: Any) -> None:
        if key == "interval" and isinstance(value, dict):
            on_interval(float(value["end"]), interval_bps(value))

    return relay


def _rtt_row(result: dict[str, Any]) -> dict[str, Any]:
    """The summary of an echo run, without the list of every sample."""
    return {key: value for key, value in result.items() if key != "rtts_ms"}


class OwnTool:
    """p2pvpn's traffic agents: ``serve`` in c2's namespace, the client commands in c1's."""

    name = "own"

    def __init__(self, net: LocalNet) -> None:
        self.net = net
        self.server: Process | None = None

    def start_server(self, address: str) -> None:
        self.stop_server()
        # A TCP run of --duration 120 must not be refused as too long.
        argv = python_argv("-m", AGENT_MODULE, "serve", address, "--max-seconds", "150")
        self.server = self.net.bed.start(self.net.c2.ns, argv, self.net.name("traffic-server"))
        try:
            self.server.wait_for_log(r"listening", timeout=30)
        except AssertionError as exc:
            raise BenchError(f"the traffic server did not start: {exc}") from None

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server = None

    def tcp(self, dst: str, seconds: float, on_interval: IntervalCallback) -> dict[str, Any]:
        args = ["tcp", dst, "--seconds", f"{seconds:g}"]
        result = run_agent(
            self.net.c1.ns, args, seconds + AGENT_SLACK, _interval_relay(on_interval)
        )
        return {
            "bits_per_second": float(result["bits_per_second"]),
            "bytes": int(result["bytes"]),
            "seconds": float(result["seconds"]),
            "intervals": list(result.get("intervals") or []),
        }

    def udp_search(
        self,
        dst: str,
        start_bps: float,
        *,
        seconds: float,
        steps: int,
        length: int,
        on_trial: TrialCallback,
    ) -> dict[str, Any]:
        args = ["udp-search", dst, "--rate", str(int(max(start_bps, 1e6)))]
        args += ["--seconds", f"{seconds:g}", "--steps", str(steps), "--length", str(length)]

        def relay(key: str, value: Any) -> None:
            if key == "trial" and isinstance(value, dict):
                on_trial(value)

        timeout = steps * (seconds + AGENT_SLACK)
        return run_agent(self.net.c1.ns, args, timeout, relay)

    def rtt(self, dst: str, count: int) -> dict[str, Any]:
        args = ["rtt", dst, "--count", str(count)]
        return _rtt_row(run_agent(self.net.c1.ns, args, count * 0.05 + AGENT_SLACK))

    def loaded_rtt(self, dst: str, seconds: float, on_interval: IntervalCallback) -> dict[str, Any]:
        args = ["loaded-rtt", dst, "--seconds", f"{seconds:g}"]
        result = run_agent(
            self.net.c1.ns, args, seconds + AGENT_SLACK, _interval_relay(on_interval)
        )
        # The echo's summary; the TCP run under it is kept beside it.
        rtt = result.get("rtt", result)
        row = _rtt_row(rtt if isinstance(rtt, dict) else {})
        tcp = result.get("tcp")
        if isinstance(tcp, dict):
            row["load_bits_per_second"] = tcp.get("bits_per_second")
        return row
