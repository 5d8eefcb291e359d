"""One variant of `p2pvpn bench local`: what runs, the checks before and after, the measurements.

Variants: ``raw`` (c1 -> c2 over the veth/bridge, no VPN), ``pure`` and
``fast``/``fast-no-offload`` (direct path, the Python or the compiled data
plane with or without TUN offloads), ``relay`` (every packet through the
server), and ``fast-base`` (the fast variant run from another checkout, for
an A/B in the same run). Before measuring, both clients' ``status --json``
must show the expected path, data plane and TUN offloads: a variant that
measured another configuration would make the comparisons lie.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2pvpn.bench.local_net import (
    CLK_TCK,
    TUN2,
    LocalNet,
    UnavailableError,
    cpu_ticks,
    loadavg,
    path_matches,
    peak_rss_kib,
)
from p2pvpn.bench.local_tools import Tool
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import BenchError

__all__ = [
    "DEFAULT_VARIANTS",
    "RTT_INTERVAL",
    "VARIANTS",
    "VARIANT_SPECS",
    "Meter",
    "Options",
    "UnavailableError",
    "Variant",
    "run_variant",
]

QUICK_UDP_START_CAP = 400e6  # bits/s
RTT_INTERVAL = 0.05  # seconds between echo requests (own tool) or pings (iperf3 tool)


@dataclass(frozen=True)
class Options:
    variants: tuple[str, ...]
    tool: str  # "own" | "iperf3"
    quick: bool
    duration: float  # seconds per TCP run
    runs: int  # TCP runs per variant, median taken
    udp: bool
    udp_seconds: float
    udp_steps: int
    udp_len: int
    idle_rtts: int
    loaded_duration: float
    baseline_src: Path | None = None

    def planned_seconds(self) -> float:
        """The measuring seconds of one variant (start-up and checks come on top)."""
        udp = self.udp_steps * self.udp_seconds if self.udp else 0.0
        return (
            self.idle_rtts * RTT_INTERVAL + self.runs * self.duration + udp + self.loaded_duration
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["variants"] = list(self.variants)
        data["baseline_src"] = str(self.baseline_src) if self.baseline_src else None
        return data


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    dataplane: str | None  # None: no VPN
    path: str | None  # "direct" | "relay"
    baseline: bool = False  # run the code of --baseline-src
    offload: str | None = None  # the clients' --offload; None: their default (auto)
    # What `status --json` "tun_offloads" must say before measuring: True
    # non-empty, False empty, None not checked (the baseline code may not know it).
    tun_offloads: bool | None = None


VARIANT_SPECS = {
    "raw": Variant("raw", "raw veth", None, None),
    "pure": Variant("pure", "direct, pure", "pure", "direct", tun_offloads=False),
    "fast-no-offload": Variant(
        "fast-no-offload",
        "direct, fast, TUN offloads off",
        "fast",
        "direct",
        offload="off",
        tun_offloads=False,
    ),
    "fast": Variant("fast", "direct, fast, TUN offloads", "fast", "direct", tun_offloads=True),
    "fast-base": Variant("fast-base", "direct, fast, baseline code", "fast", "direct", True),
    "relay": Variant("relay", "relay server", "auto", "relay"),
}
VARIANTS = tuple(VARIANT_SPECS)
DEFAULT_VARIANTS = ("raw", "pure", "fast-no-offload", "fast", "relay")


class Meter:
    """The live progress over the planned measuring seconds of the whole run.

    Each phase (a TCP run, the UDP search, ...) owns its planned share of the
    total; what it reports moves the bar within that share only, so a phase
    that ends early or late never pushes the bar past the plan.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.variant = ""
        self._base = 0.0
        self._planned = 0.0

    def phase(self, planned: float, what: str) -> None:
        self._base += self._planned
        self._planned = planned
        self.progress.update(done=self._base)
        self.progress.step(f"{self.variant}: {what}")

    def at(self, seconds: float, detail: str | None = None) -> None:
        done = self._base + min(max(seconds, 0.0), self._planned)
        self.progress.update(done, f"{self.variant}: {detail}" if detail else None)

    def start_variant(self, name: str, done: float) -> None:
        """Where the variant ``name`` starts in the plan (whatever the last one measured)."""
        self.variant, self._base, self._planned = name, done, 0.0
        self.progress.update(done=done)


# -- measuring -------------------------------------------------------------------------


def _mbit(bps: float) -> str:
    return f"{bps / 1e6:,.0f} Mbit/s"


def measure_tcp(
    net: LocalNet, tool: Tool, dst: str, options: Options, meter: Meter
) -> dict[str, Any]:
    """``options.runs`` TCP runs, the median; CPU seconds of the VPN processes per GB moved."""
    runs, per_process = [], dict.fromkeys(net.vpn_pids(), 0)
    for index in range(options.runs):
        meter.phase(options.duration, f"TCP run {index + 1}/{options.runs}")
        before = {name: cpu_ticks(pid) for name, pid in net.vpn_pids().items()}
        run = tool.tcp(dst, options.duration, lambda t, bps: meter.at(t, f"TCP {_mbit(bps)}"))
        for name, pid in net.vpn_pids().items():
            per_process[name] += cpu_ticks(pid) - before[name]
        runs.append(run)
        meter.at(options.duration, f"TCP run {index + 1}: {_mbit(run['bits_per_second'])}")
    moved = sum(int(run["bytes"]) for run in runs)
    result: dict[str, Any] = {
        "bits_per_second": statistics.median(float(r["bits_per_second"]) for r in runs),
        "runs": runs,
        "bytes_total": moved,
    }
    if per_process:
        seconds = sum(per_process.values()) / CLK_TCK
        result["cpu_seconds"] = seconds
        result["cpu_seconds_by_process"] = {k: v / CLK_TCK for k, v in per_process.items()}
        result["cpu_seconds_per_gb"] = seconds / (moved / 1e9) if moved else None
    return result


def measure_udp(
    tool: Tool, dst: str, start_bps: float, options: Options, meter: Meter
) -> dict[str, Any]:
    meter.phase(options.udp_steps * options.udp_seconds, "UDP search")
    trials = 0

    def on_trial(trial: dict[str, Any]) -> None:
        nonlocal trials
        trials += 1
        target, loss = trial.get("target_bps"), trial.get("loss_percent")
        detail = f"UDP {_mbit(float(target or 0))}: loss {float(loss or 0):.2f} %"
        meter.at(trials * options.udp_seconds, detail)

    return tool.udp_search(
        dst,
        start_bps,
        seconds=options.udp_seconds,
        steps=options.udp_steps,
        length=options.udp_len,
        on_trial=on_trial,
    )


def udp_start_rate(options: Options, tcp_bps: float) -> float:
    """Where the UDP search starts: at the TCP figure, or (--quick) well below it.

    Two steps from the TCP rate rarely find a rate without loss (UDP through
    the tunnel goes far slower than TCP with offloads); from a quarter of it,
    capped, the first step usually passes and the second doubles it.
    """
    if options.quick:
        return min(tcp_bps / 4, QUICK_UDP_START_CAP)
    return tcp_bps


def measure(net: LocalNet, tool: Tool, dst: str, options: Options, meter: Meter) -> dict[str, Any]:
    """Idle RTT, TCP, the UDP search, RTT under TCP load: c1 -> c2 (``dst``)."""
    result: dict[str, Any] = {}
    meter.phase(options.idle_rtts * RTT_INTERVAL, "idle RTT")
    result["rtt_idle"] = tool.rtt(dst, options.idle_rtts)
    result["tcp"] = measure_tcp(net, tool, dst, options, meter)
    if options.udp:
        start = udp_start_rate(options, float(result["tcp"]["bits_per_second"]))
        result["udp"] = measure_udp(tool, dst, start, options, meter)
    meter.phase(options.loaded_duration, "RTT under TCP load")
    result["rtt_loaded"] = tool.loaded_rtt(
        dst, options.loaded_duration, lambda t, _bps: meter.at(t, "RTT under TCP load")
    )
    return result


def run_variant(
    net: LocalNet, tool: Tool, spec: Variant, options: Options, meter: Meter
) -> dict[str, Any]:
    """One variant's JSON row; raises BenchError (UnavailableError) when it cannot run."""
    result: dict[str, Any] = {"label": spec.label, "status": "ok", "loadavg_before": loadavg()}
    dst = net.c2.segment_ip
    if spec.dataplane is not None:
        dst = TUN2
        start_vpn_variant(net, spec, options, result, meter)
    tool.start_server(dst)
    try:
        result.update(measure(net, tool, dst, options, meter))
    finally:
        tool.stop_server()
    if spec.dataplane is not None:
        finish_vpn_variant(net, spec, result)
    return result


# -- the checks before and after -------------------------------------------------------


def start_vpn_variant(
    net: LocalNet, spec: Variant, options: Options, result: dict[str, Any], meter: Meter
) -> None:
    """Server and clients up, the path settled, and the data plane and TUN
    offloads the ones asked for, before anything is measured."""
    assert spec.dataplane is not None
    flags = f"--dataplane {spec.dataplane}" + (f" --offload {spec.offload}" if spec.offload else "")
    meter.phase(0.0, f"starting server and clients ({flags})")
    source = options.baseline_src if spec.baseline else None
    net.start_vpn(spec.dataplane, stun=spec.path == "direct", source=source, offload=spec.offload)
    meter.phase(0.0, "waiting for the path")
    rows = net.wait_path("direct" if spec.path == "direct" else "relay")
    status = net.status(net.c1)
    result["dataplane"] = status.get("dataplane")
    result["path"] = rows["c1"]["path"]
    result["peer_state"] = rows["c1"]["state"]
    result["counters_before"] = {"relay": status.get("relay"), "direct": status.get("direct")}
    result["udp_offloads"] = status.get("udp_offloads")
    result["tun_offloads"] = {n.name: net.status(n).get("tun_offloads") for n in (net.c1, net.c2)}
    offloads = "+".join(result["tun_offloads"].get("c1") or []) or "none"
    meter.phase(
        0.0,
        f"path {result['path']} ({result['peer_state']}), {result['dataplane']} data plane, "
        f"TUN offloads {offloads}",
    )
    if spec.dataplane != "auto" and result["dataplane"] != spec.dataplane:
        raise BenchError(f"asked for {spec.dataplane}, status says {result['dataplane']}")
    check_tun_offloads(spec, result["tun_offloads"])


def check_tun_offloads(spec: Variant, offloads: dict[str, Any]) -> None:
    """Both clients' `status --json` "tun_offloads" as the variant needs them: a
    variant that measured the other configuration would make the targets lie."""
    if spec.tun_offloads is None:
        return
    for name, value in offloads.items():
        if not isinstance(value, list):
            raise BenchError(f"{name}: status --json has no tun_offloads list (got {value!r})")
        if spec.tun_offloads and not value:
            raise BenchError(
                f"{name}: TUN offloads are off (status tun_offloads []); "
                "the kernel refused them, see the client log"
            )
        if not spec.tun_offloads and value:
            raise BenchError(f"{name}: TUN offloads are on ({'+'.join(value)}), asked for off")


def finish_vpn_variant(net: LocalNet, spec: Variant, result: dict[str, Any]) -> None:
    """Peak RSS, the path after the load (it must not have changed), counters."""
    result["peak_rss_kib"] = {name: peak_rss_kib(pid) for name, pid in net.vpn_pids().items()}
    row = net.peer_row(net.c1, TUN2) or {}
    status = net.status(net.c1)
    result["path_after"] = row.get("path")
    result["counters_after"] = {"relay": status.get("relay"), "direct": status.get("direct")}
    result["tun_mtu"] = net.tun_mtu()
    if not path_matches(row, "direct" if spec.path == "direct" else "relay"):
        result["status"] = "path changed"
        result["error"] = f"path after the measurements: {row.get('state')} {row.get('path')}"
    net.stop_vpn()
