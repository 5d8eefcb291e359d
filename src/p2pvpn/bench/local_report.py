"""The results of `p2pvpn bench local`: tables, ratios and targets; series and bars to plot.

Every throughput and RTT is also shown as a ratio to ``raw`` from the same
run; then the targets of issue 13 (the TUN offloads: fast against
fast-no-offload and raw veth), each with its bound and "met" or "MISSED".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pvpn._format import format_table
from p2pvpn.bench.report import Bar, Series
from p2pvpn.bench.traffic import Interval

__all__ = [
    "METRICS",
    "TARGETS",
    "Target",
    "compute_ratios",
    "format_results",
    "result_bars",
    "result_series",
]

UDP_HEADERS = 28  # IPv4 + UDP
_MEASURED = ("ok", "path changed")

METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tcp", ("tcp", "bits_per_second")),
    ("udp", ("udp", "bits_per_second")),
    ("rtt_idle_p50", ("rtt_idle", "p50_ms")),
    ("rtt_idle_p99", ("rtt_idle", "p99_ms")),
    ("rtt_loaded_p50", ("rtt_loaded", "p50_ms")),
    ("rtt_loaded_p99", ("rtt_loaded", "p99_ms")),
)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return float(value) / float(base)


def _get(result: dict[str, Any], *keys: str) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _measured(results: dict[str, dict[str, Any]], variant: str, metric: tuple[str, ...]) -> Any:
    """A variant's metric, or None when the variant did not run or failed."""
    result = results.get(variant, {})
    if result.get("status") not in _MEASURED:
        return None
    return _get(result, *metric)


@dataclass(frozen=True)
class Target:
    """Issue 13's targets: ``variant``'s metric over ``base``'s, against ``bound``."""

    key: str
    label: str
    metric: tuple[str, ...]
    variant: str
    base: str
    at_least: bool  # True: ratio >= bound; False: ratio <= bound
    bound: float

    def evaluate(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        value = ratio(
            _measured(results, self.variant, self.metric),
            _measured(results, self.base, self.metric),
        )
        met = None
        if value is not None:
            met = value >= self.bound if self.at_least else value <= self.bound
        return {
            "key": self.key,
            "label": self.label,
            "ratio": value,
            "target": f"{'>=' if self.at_least else '<='} {self.bound:g}",
            "met": met,
        }


_TCP = ("tcp", "bits_per_second")
TARGETS = (
    Target(
        "fast_vs_no_offload_tcp",
        "fast / fast-no-offload TCP throughput",
        _TCP,
        "fast",
        "fast-no-offload",
        True,
        2.0,
    ),
    Target(
        "fast_vs_no_offload_cpu_per_gb",
        "fast / fast-no-offload CPU s per GB",
        ("tcp", "cpu_seconds_per_gb"),
        "fast",
        "fast-no-offload",
        False,
        0.5,
    ),
    Target(
        "fast_vs_no_offload_loaded_rtt_p99",
        "fast / fast-no-offload loaded RTT p99 (no worse)",
        ("rtt_loaded", "p99_ms"),
        "fast",
        "fast-no-offload",
        False,
        1.0,
    ),
    Target("fast_vs_raw_tcp", "fast / raw veth TCP throughput", _TCP, "fast", "raw", True, 0.30),
)


def compute_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant its metrics over raw's; fast/pure, fast/fast-base; the targets."""
    raw = results.get("raw", {})
    ratios: dict[str, Any] = {}
    for name, result in results.items():
        if name == "raw" or result.get("status") not in _MEASURED:
            continue
        ratios[name] = {
            metric: ratio(_get(result, *keys), _get(raw, *keys)) for metric, keys in METRICS
        }
    fast = _get(results.get("fast", {}), *_TCP)
    ratios["fast_vs_pure_tcp"] = ratio(fast, _get(results.get("pure", {}), *_TCP))
    ratios["fast_vs_baseline_tcp"] = ratio(fast, _get(results.get("fast-base", {}), *_TCP))
    ratios["targets"] = [target.evaluate(results) for target in TARGETS]
    return ratios


# -- series and bars for the plot ------------------------------------------------------


def _median_run(tcp: dict[str, Any]) -> dict[str, Any] | None:
    """The TCP run closest to the median: the one the table's figure stands for."""
    runs = tcp.get("runs") or []
    if not runs:
        return None
    median = float(tcp.get("bits_per_second") or 0.0)
    return dict(min(runs, key=lambda run: abs(float(run["bits_per_second"]) - median)))


def result_series(results: dict[str, dict[str, Any]]) -> list[Series]:
    """TCP throughput over time per variant (its median run's intervals)."""
    series = []
    for name, result in results.items():
        run = _median_run(result.get("tcp") or {})
        if run is None:
            continue
        intervals = [
            Interval(float(item["start"]), float(item["end"]), int(item["bytes"]))
            for item in run.get("intervals") or []
        ]
        points = [
            (round(interval.end, 3), round(interval.bits_per_second / 1e6, 3))
            for interval in intervals
            if not interval.partial
        ]
        series.append(Series(f"{name} TCP", "Mbit/s", points))
    return series


def result_bars(results: dict[str, dict[str, Any]]) -> list[Bar]:
    """TCP and UDP Mbit/s per variant; None for a variant that did not measure it."""
    bars = []
    for group, keys in (("TCP Mbit/s", _TCP), ("UDP Mbit/s", ("udp", "bits_per_second"))):
        for name in results:
            value = _measured(results, name, keys)
            bars.append(Bar(group, name, None if value is None else value / 1e6, "Mbit/s"))
    return bars


# -- the table -------------------------------------------------------------------------


def _mbit(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:,.0f}" if bps >= 1e8 else f"{bps / 1e6:,.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], names: int = 1) -> str:
    """The first ``names`` columns (text) on the left, the numbers right-aligned."""
    return "\n".join(format_table(header, rows, right=range(names, len(header)), rule=True))


def _dataplane_cell(result: dict[str, Any]) -> str:
    """ "fast", or "fast tun csum+tso4+uso4" when c1's TUN offloads are on."""
    offloads = (result.get("tun_offloads") or {}).get("c1")
    dataplane = str(result.get("dataplane") or "-")
    return f"{dataplane} tun {'+'.join(offloads)}" if offloads else dataplane


def _rtt_cell(rtt: dict[str, Any] | None, fmt: str) -> str:
    rtt = rtt or {}
    return f"{_num(rtt.get('p50_ms'), fmt)}/{_num(rtt.get('p99_ms'), fmt)}"


def _absolute_row(name: str, result: dict[str, Any]) -> list[str]:
    status = result.get("status", "ok")
    if status not in _MEASURED:
        return [name, status, *["-"] * 9]
    rss = result.get("peak_rss_kib") or {}
    return [
        name + ("" if status == "ok" else " (!)"),
        _dataplane_cell(result),
        _mbit(_get(result, *_TCP)),
        _mbit(_get(result, "udp", "bits_per_second"))
        + ("*" if _get(result, "udp", "sender_limited") else ""),
        _num(_get(result, "udp", "loss_percent")),
        _rtt_cell(result.get("rtt_idle"), "{:.3f}"),
        _rtt_cell(result.get("rtt_loaded"), "{:.2f}"),
        _num(_get(result, "tcp", "cpu_seconds_per_gb"), "{:.1f}"),
        *(_num(rss[k] / 1024, "{:.1f}") if rss.get(k) else "-" for k in ("server", "c1", "c2")),
    ]


def _absolute_table(results: dict[str, dict[str, Any]]) -> str:
    header = ["variant", "dataplane", "TCP Mbit/s", "UDP Mbit/s", "loss %"]
    header += ["idle RTT p50/p99 ms", "loaded RTT p50/p99 ms", "CPU s/GB"]
    header += ["RSS MiB srv", "c1", "c2"]
    return _table(header, [_absolute_row(n, r) for n, r in results.items()], names=2)


def _ratio_lines(ratios: dict[str, Any]) -> list[str]:
    rows = [
        [name, *(_num(values.get(metric), "{:.3f}") for metric, _ in METRICS)]
        for name, values in ratios.items()
        if isinstance(values, dict)
    ]
    out = []
    if rows:
        header = ["variant", "TCP", "UDP", "idle p50", "idle p99", "loaded p50", "loaded p99"]
        out += ["", "ratio vs raw veth (same run; throughput: higher is better, RTT: lower)"]
        out.append(_table(header, rows))
    if ratios.get("fast_vs_pure_tcp") is not None:
        out.append(f"\nfast / pure TCP throughput: {ratios['fast_vs_pure_tcp']:.2f}x")
    if ratios.get("fast_vs_baseline_tcp") is not None:
        out.append(
            "fast / fast on the baseline code TCP throughput: "
            f"{ratios['fast_vs_baseline_tcp']:.3f}x"
        )
    return out


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            target["label"],
            _num(target["ratio"], "{:.3f}"),
            target["target"],
            "-" if target["met"] is None else "met" if target["met"] else "MISSED",
        ]
        for target in targets
    ]
    if all(row[1] == "-" for row in rows):
        return []
    title = "targets of issue 13 (same run; '-': a variant of the pair did not run or failed)"
    return ["", title, _table(["ratio", "value", "target", "verdict"], rows)]


def _fragment_note(options: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    if not options.get("udp"):
        return []
    length = int(options["udp_len"])
    mtus = {r["tun_mtu"] for r in results.values() if r.get("tun_mtu")}
    small = sorted(m for m in mtus if length + UDP_HEADERS > m)
    if not small:
        return []
    return [
        f"note: {length}-byte UDP payloads make {length + UDP_HEADERS}-byte IP packets, more "
        f"than the TUN MTU ({small[0]}): each datagram crosses the tunnel as 2 IP fragments "
        f"(use --udp-len {small[0] - UDP_HEADERS} for unfragmented datagrams)"
    ]


def _notes(results: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for name, result in results.items():
        if result.get("status") != "ok":
            notes.append(f"{name}: {result.get('status')}: {result.get('error', '')}".rstrip())
        if name != "raw" and result.get("path"):
            notes.append(f"{name}: path {result['path']} ({result.get('peer_state')})")
    if any(_get(r, "udp", "sender_limited") for r in results.values()):
        notes.append(
            "*: the sender's own limit, with no loss (the path was not the bottleneck; "
            "that ratio understates the path's headroom)"
        )
    return ["", *notes] if notes else []


def format_results(
    head: Sequence[str],
    options: dict[str, Any],
    results: dict[str, dict[str, Any]],
    ratios: dict[str, Any],
) -> str:
    """The final text: ``head`` (machine, tool, options), the tables, the notes."""
    out = [*head, "", _absolute_table(results)]
    out += _ratio_lines(ratios)
    out += _target_lines(ratios.get("targets", []))
    out += _notes(results)
    out += _fragment_note(options, results)
    return "\n".join(out)
