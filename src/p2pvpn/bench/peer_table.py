"""What `p2pvpn bench peer` shows and writes: the table (both directions side by side),
the JSON results and the bars of ``--plot``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pvpn._format import format_ms, format_rate, format_table
from p2pvpn.bench.peer_run import DIRECTIONS, DirectionResult, PeerMeasurement, PeerOptions
from p2pvpn.bench.peer_status import ClientView, PeerTarget, describe_path, path_kind
from p2pvpn.bench.report import Bar
from p2pvpn.bench.traffic import RttResult

__all__ = ["PeerSummary", "cpu_per_gb", "peer_bars", "peer_results", "peer_text"]

GB = 1e9
_DASH = "-"


@dataclass(frozen=True)
class PeerSummary:
    """Everything one run found out, for the table and the JSON."""

    target: PeerTarget
    hello: dict[str, Any]
    local: ClientView
    port: int
    options: PeerOptions
    path_before: str | None
    path_after: str | None
    measurement: PeerMeasurement
    machine_lines: tuple[str, ...] = ()

    @property
    def path_changed(self) -> bool:
        return self.path_before != self.path_after

    @property
    def ok(self) -> bool:
        return not self.measurement.errors


def cpu_per_gb(cpu_seconds: float | None, bytes_moved: int) -> float | None:
    """CPU seconds per 10^9 bytes moved; None when either is unknown or nothing moved."""
    if cpu_seconds is None or bytes_moved <= 0:
        return None
    return cpu_seconds / (bytes_moved / GB)


def _totals(measurement: PeerMeasurement) -> tuple[float | None, int]:
    results = list(measurement.directions.values())
    cpu = [result.cpu_seconds for result in results]
    seconds = None if not cpu or None in cpu else sum(c for c in cpu if c is not None)
    return seconds, sum(result.bytes_moved for result in results)


# --------------------------------------------------------------------------- JSON


def _rtt_json(rtt: RttResult | None) -> dict[str, Any] | None:
    return None if rtt is None else rtt.to_json()


def _direction_json(result: DirectionResult, options: PeerOptions) -> dict[str, Any]:
    return {
        "tcp": None if result.tcp is None else result.tcp.to_json(),
        "udp": None if result.udp is None else result.udp.to_json(),
        "udp_rate_bps": result.udp_rate_bps,
        "udp_rate_source": options.udp_rate_source(),
        "udp_first_try": None if result.udp_first_try is None else result.udp_first_try.to_json(),
        "udp_search": None if result.search is None else result.search.to_json(),
        "loaded": {
            "rtt": _rtt_json(result.loaded_rtt),
            "tcp": None if result.loaded_tcp is None else result.loaded_tcp.to_json(),
        },
        "cpu_seconds": result.cpu_seconds,
        "bytes_moved": result.bytes_moved,
        "cpu_seconds_per_gb": cpu_per_gb(result.cpu_seconds, result.bytes_moved),
    }


def peer_results(summary: PeerSummary) -> dict[str, Any]:
    measurement = summary.measurement
    cpu_seconds, bytes_moved = _totals(measurement)
    local = summary.local
    return {
        "peer": {
            "address": summary.target.address,
            "name": summary.target.name,
            "port": summary.port,
            "hello": summary.hello,
        },
        "local": {
            "name": local.name,
            "address": None if local.address is None else str(local.address),
            "pid": local.pid,
            "dataplane": local.dataplane,
        },
        "path": {
            "before": summary.path_before,
            "after": summary.path_after,
            "kind_before": path_kind(summary.path_before),
            "kind_after": path_kind(summary.path_after),
            "changed": summary.path_changed,
        },
        "rtt_idle": _rtt_json(measurement.rtt_idle),
        **{
            direction: _direction_json(result, summary.options)
            for direction, result in measurement.directions.items()
        },
        "cpu": {
            "pid": local.pid,
            "seconds": cpu_seconds,
            "bytes_moved": bytes_moved,
            "seconds_per_gb": cpu_per_gb(cpu_seconds, bytes_moved),
        },
        "errors": list(measurement.errors),
    }


def peer_bars(measurement: PeerMeasurement) -> list[Bar]:
    """TCP and UDP (received) throughput per direction, in Mbit/s."""
    bars = []
    for direction in DIRECTIONS:
        result = measurement.directions.get(direction)
        tcp = result.tcp if result is not None else None
        udp = result.udp if result is not None else None
        bars.append(
            Bar("TCP Mbit/s", direction, _mbit(tcp.bits_per_second if tcp else None), "Mbit/s")
        )
        bars.append(
            Bar("UDP Mbit/s", direction, _mbit(udp.received_bps if udp else None), "Mbit/s")
        )
    return bars


def _mbit(bps: float | None) -> float | None:
    return None if bps is None else round(bps / 1e6, 3)


# --------------------------------------------------------------------------- text


def _rate(bps: float | None) -> str:
    return _DASH if bps is None else format_rate(bps)


def _rtt(rtt: RttResult | None) -> str:
    if rtt is None or rtt.p50_ms is None:
        return _DASH
    p99 = _DASH if rtt.p99_ms is None else format_ms(rtt.p99_ms)
    lost = rtt.sent - rtt.received
    text = f"{format_ms(rtt.p50_ms)} / {p99}"
    return f"{text} ({lost} lost)" if lost else text


def _cells(result: DirectionResult | None) -> list[str]:
    if result is None:
        return [_DASH] * 7
    udp = result.udp
    per_gb = cpu_per_gb(result.cpu_seconds, result.bytes_moved)
    return [
        _rate(result.tcp.bits_per_second if result.tcp else None),
        _rate(result.udp_rate_bps),
        _rate(udp.received_bps if udp else None),
        _DASH if udp is None else f"{udp.loss_percent:.2f} %",
        _DASH if udp is None or udp.jitter_ms is None else format_ms(udp.jitter_ms),
        _rtt(result.loaded_rtt),
        _DASH if per_gb is None else f"{per_gb:.2f} s/GB",
    ]


_ROW_LABELS = (
    "TCP",
    "UDP sent at",
    "UDP received",
    "UDP loss",
    "UDP jitter",
    "RTT loaded p50 / p99",
    "client CPU",
)


def _figures(measurement: PeerMeasurement) -> list[str]:
    columns = [_cells(measurement.directions.get(direction)) for direction in DIRECTIONS]
    rows = [
        [label, *(column[index] for column in columns)] for index, label in enumerate(_ROW_LABELS)
    ]
    rows.append(["RTT idle p50 / p99", _rtt(measurement.rtt_idle)])
    return format_table(["", *DIRECTIONS], rows, right=(1, 2), rule=True)


def _heading(summary: PeerSummary) -> list[str]:
    target = summary.target
    peer = target.address if target.name is None else f"{target.name} ({target.address})"
    host = summary.hello.get("hostname")
    local = summary.local.address.ip if summary.local.address is not None else "?"
    lines = [
        f"p2pvpn bench peer: {local} -> {peer}"
        + (f" (host {host})" if isinstance(host, str) and host else "")
        + f", port {summary.port}, {summary.options.seconds:g} s per test",
        *summary.machine_lines,
        f"path: {describe_path(summary.path_before)}",
    ]
    if summary.path_changed:
        lines.append(
            f"WARNING: the path changed during the run, to {describe_path(summary.path_after)}: "
            "the figures mix both paths"
        )
    return lines


def _notes(summary: PeerSummary) -> list[str]:
    cpu_seconds, bytes_moved = _totals(summary.measurement)
    per_gb = cpu_per_gb(cpu_seconds, bytes_moved)
    pid = summary.local.pid
    cpu = (
        f"client CPU: process {pid} (user + system, all threads) per GB through it"
        + (f", {per_gb:.2f} s/GB overall" if per_gb is not None else "")
        if per_gb is not None
        else f"client CPU: not readable (/proc/{pid if pid is not None else '?'}/stat)"
    )
    lines = [f"UDP rate: {summary.options.udp_rate_source()}"]
    for direction, result in summary.measurement.directions.items():
        first = result.udp_first_try
        if first is not None:
            lines.append(
                f"  {direction}: first try at {format_rate(first.target_bps)} "
                f"lost {first.loss_percent:.2f} %"
            )
    lines.append(cpu)
    lines += [f"failed: {error}" for error in summary.measurement.errors]
    return lines


def peer_text(summary: PeerSummary) -> str:
    return "\n".join([*_heading(summary), "", *_figures(summary.measurement), "", *_notes(summary)])
