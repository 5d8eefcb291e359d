"""The results of a demo run and the summary table printed at its end."""

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from p2pvpn._format import format_ms, format_rate, format_seconds, format_table
from p2pvpn.demo.lookup import NameLookup
from p2pvpn.demo.measure import PingResult, Throughput

__all__ = ["ExitPing", "PairResult", "PathResult", "Results", "summary_lines"]

_TABLE_INDENT = "  "


@dataclass
class PairResult:
    """One client's view of one peer, at the end of the connect phase."""

    source: str
    destination: str
    state: str | None = None
    path: str | None = None
    rtt_ms: float | None = None
    connected_after: float | None = None  # seconds after the clients started
    ping: PingResult | None = None

    @property
    def connected(self) -> bool:
        return self.state == "CONNECTED"

    @property
    def label(self) -> str:
        return f"{self.source} -> {self.destination}"


@dataclass
class PathResult:
    """A throughput run between the measured pair over one path ("direct" or "relay")."""

    kind: str
    ping: PingResult | None = None
    throughput: Throughput | None = None
    relay_bytes: int | None = None  # what went through the server during the run
    note: str | None = None  # why there is no number


@dataclass
class ExitPing:
    """``source`` pinged ``target``, which only ``exit_node`` routes to, through the tunnel."""

    source: str
    exit_node: str
    exit_address: IPv4Address
    target: IPv4Address
    state: str | None = None  # the source's exit state ("active" when it uses the exit)
    ping: PingResult | None = None
    note: str | None = None  # why it failed, when it did

    @property
    def ok(self) -> bool:
        return self.state == "active" and self.ping is not None and self.ping.ok


@dataclass
class Results:
    pairs: list[PairResult] = field(default_factory=list)
    paths: list[PathResult] = field(default_factory=list)
    name_lookup: NameLookup | None = None
    exit_ping: ExitPing | None = None
    measured_pair: tuple[str, str] = ("", "")
    connect_timeout: float = 0.0
    all_connected_after: float | None = None
    setup: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    total: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return bool(self.pairs) and all(pair.connected for pair in self.pairs)

    @property
    def ok(self) -> bool:
        return self.connected and not self.problems


def _ping(result: PingResult | None) -> str:
    if result is None:
        return "-"
    if not result.ok or result.avg_ms is None:
        return f"lost {result.transmitted}/{result.transmitted}"
    lost = result.transmitted - result.received
    text = format_ms(result.avg_ms)
    return f"{text} ({lost} lost)" if lost else text


def _pair_rows(pairs: list[PairResult]) -> list[list[str]]:
    rows = []
    for pair in pairs:
        rows.append(
            [
                pair.label,
                pair.state or "-",
                pair.path or "-",
                format_ms(pair.rtt_ms) if pair.rtt_ms is not None else "-",
                _ping(pair.ping),
                format_seconds(pair.connected_after) if pair.connected_after is not None else "-",
            ]
        )
    return rows


def _path_rows(paths: list[PathResult]) -> list[list[str]]:
    rows = []
    for path in paths:
        if path.throughput is not None:
            rate = format_rate(path.throughput.bits_per_second)
            tool = f"{path.throughput.tool}, {path.throughput.seconds:.0f} s"
        else:
            rate, tool = "-", path.note or "not measured"
        relay = "-" if path.relay_bytes is None else f"{path.relay_bytes / 1e6:.1f} MB"
        rows.append([path.kind, _ping(path.ping), rate, relay, tool])
    return rows


def _ratio(paths: list[PathResult]) -> str | None:
    rates = {p.kind: p.throughput.bits_per_second for p in paths if p.throughput is not None}
    if rates.get("direct") and rates.get("relay"):
        return f"direct/relay throughput ratio: {rates['direct'] / rates['relay']:.1f}x"
    return None


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def _feature_rows(results: Results) -> list[list[str]]:
    rows = []
    lookup = results.name_lookup
    if lookup is not None:
        how = f"dnspython, asking {lookup.asker}'s DNS at {lookup.server}:53"
        if not lookup.ok:
            how += f" (expected {lookup.expected})"
        rows.append(["name lookup", _mark(lookup.ok), lookup.describe(), how])
    exit_ping = results.exit_ping
    if exit_ping is not None:
        what = f"ping {exit_ping.source} -> {exit_ping.target}: {_ping(exit_ping.ping)}"
        how = f"through the exit node {exit_ping.exit_node} ({exit_ping.exit_address})"
        if not exit_ping.ok:
            state = exit_ping.state or "unknown"
            how += f"; {exit_ping.note or f'exit state {state}'}"
        rows.append(["exit node", _mark(exit_ping.ok), what, how])
    return rows


def _setup_line(results: Results) -> str:
    phases = ", ".join(f"{name} {format_seconds(sec)}" for name, sec in results.setup.items())
    total = sum(results.setup.values())
    text = f"setup: {phases} (total {format_seconds(total)})"
    if results.all_connected_after is not None:
        text += f"; all peers CONNECTED {format_seconds(results.all_connected_after)}"
        text += " after the clients started"
    if results.total is not None:
        text += f"; whole run {format_seconds(results.total)}"
    return text


def _verdict(results: Results) -> list[str]:
    count = len(results.pairs)
    connected = sum(pair.connected for pair in results.pairs)
    lines = []
    if results.connected:
        lines.append(f"result: all {count} peer pairs CONNECTED")
    else:
        missing = ", ".join(
            f"{pair.label} ({pair.state or 'no state'})"
            for pair in results.pairs
            if not pair.connected
        )
        lines.append(
            f"result: {connected} of {count} peer pairs CONNECTED within "
            f"{results.connect_timeout:g} s; not CONNECTED: {missing}"
        )
    lines += [f"problem: {problem}" for problem in results.problems]
    return lines


def summary_lines(results: Results) -> list[str]:
    """The summary: peers (state, path, RTT, ping), throughput direct vs relay, the name
    lookup and the exit-node ping (ok/FAIL), timings."""
    lines = ["peers (state and path at the end of the connect phase):"]
    lines += format_table(
        ["PEER", "STATE", "PATH", "RTT", "PING", "CONNECTED AFTER"],
        _pair_rows(results.pairs),
        indent=_TABLE_INDENT,
        right=(3, 4, 5),
    )
    if results.paths:
        source, destination = results.measured_pair
        lines += ["", f"throughput {source} -> {destination}:"]
        lines += format_table(
            ["PATH", "PING", "THROUGHPUT", "VIA SERVER", "TOOL"],
            _path_rows(results.paths),
            indent=_TABLE_INDENT,
            right=(1, 2, 3),
        )
        ratio = _ratio(results.paths)
        if ratio:
            lines.append(f"  {ratio}")
    features = _feature_rows(results)
    if features:
        lines += ["", "names and exit node:"]
        lines += format_table(["CHECK", "", "RESULT", "HOW"], features, indent=_TABLE_INDENT)
    lines += ["", _setup_line(results)]
    lines += _verdict(results)
    return lines
