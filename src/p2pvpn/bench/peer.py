"""`p2pvpn bench peer NAME|ADDRESS` and `p2pvpn bench serve`: the link to another member.

``bench peer`` measures through the running tunnel: the local client's status
says who the peer is and which path it takes; the traffic (TCP, UDP with
loss, RTT, both directions) goes to the peer's bench server on its VPN
address. The peer answers only when it agreed to (``bench serve`` or
``bench_server = true``): nobody is measured by surprise.

Split by job: `peer_status` (the client's status, the peer row, CPU time),
`peer_run` (the tests and their order), `peer_table` (table, JSON, bars),
`peer_serve` (the serving side).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from p2pvpn.bench.machine import describe_machine, machine_facts
from p2pvpn.bench.peer_run import PeerOptions, measure_peer, planned_seconds
from p2pvpn.bench.peer_serve import serve_bench
from p2pvpn.bench.peer_status import (
    ClientView,
    PeerTarget,
    cpu_seconds,
    find_peer,
    not_member_error,
    read_client,
    resolve_target,
)
from p2pvpn.bench.peer_table import PeerSummary, peer_bars, peer_results, peer_text
from p2pvpn.bench.progress import Progress
from p2pvpn.bench.report import BenchError, Report
from p2pvpn.bench.traffic import DEFAULT_PORT, BenchClient, BenchRefusedError
from p2pvpn.config import DEFAULT_STATE_ROOT

__all__ = ["configure_parser", "configure_serve_parser", "run", "run_serve"]

logger = logging.getLogger(__name__)

DEFAULT_SECONDS = 5.0
MAX_SECONDS = 60.0  # the bench server refuses longer tests
SERVE_WAIT = 60.0
# A direct path being set up (hole punching) settles within seconds; measuring
# during it would mix the relay and the direct path.
SETTLING_STATES = frozenset({"INIT", "PREPARING", "SYNCHRONIZING", "CONNECTING"})
SETTLE_SECONDS = 10.0
_RATE_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    """The options of `p2pvpn status` that say which local client to ask."""
    parser.add_argument("-n", "--name", help="the local client's name (as given to run)")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_STATE_ROOT,
        help="the client's state directory, as given to run --state-dir, or the directory "
        f"of the clients' state directories, one per NAME (default {DEFAULT_STATE_ROOT})",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"the bench server's TCP and UDP port (default {DEFAULT_PORT})",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="NAME|ADDRESS", help="the member to measure")
    _add_client_options(parser)
    parser.add_argument(
        "--seconds",
        type=_seconds,
        default=DEFAULT_SECONDS,
        help=f"length of each test (default {DEFAULT_SECONDS:g}); 6 tests and an idle RTT run",
    )
    parser.add_argument(
        "--udp-rate",
        metavar="BPS|search",
        type=_udp_rate,
        default=None,
        help="UDP sending rate in bit/s (100M, 1.5G) or `search` for the highest rate with "
        "little loss (3 trials); default: 90%% of the TCP figure of the same direction, and "
        "when over 5%% was lost, again at 90%% of what arrived",
    )


def configure_serve_parser(parser: argparse.ArgumentParser) -> None:
    _add_client_options(parser)
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=SERVE_WAIT,
        help=f"how long to wait for the client's VPN address (default {SERVE_WAIT:g})",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1..65535: {port}")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"seconds out of range 0.5..{MAX_SECONDS:g}: {text}")
    return seconds


def _udp_rate(text: str) -> float | str:
    """Bits per second ("250M", "1.5g", "8000000") or "search"."""
    cleaned = text.strip().lower()
    if cleaned == "search":
        return "search"
    factor = _RATE_SUFFIXES.get(cleaned[-1:], 1.0)
    number = cleaned[:-1] if cleaned[-1:] in _RATE_SUFFIXES else cleaned
    try:
        rate = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (bits per second: 100M, 1.5G, or search)"
        ) from None
    if not 1e5 <= rate <= 100e9:
        raise argparse.ArgumentTypeError(f"rate out of range 100k..100G: {text}")
    return rate


def options_from(args: argparse.Namespace) -> PeerOptions:
    rate = args.udp_rate
    return PeerOptions(
        seconds=float(args.seconds),
        udp_rate=rate if isinstance(rate, float) else None,
        udp_search=rate == "search",
    )


# --------------------------------------------------------------------------- bench peer


def refused_error(target: PeerTarget, port: int) -> BenchError:
    return BenchError(
        f"{target.address} does not answer benchmarks on port {port}: run `p2pvpn bench serve` "
        "there (or set bench_server = true in its config)"
    )


def greet(
    bench: BenchClient, target: PeerTarget, port: int, read: Callable[[], ClientView]
) -> dict[str, Any]:
    """The peer's hello; a refused peer or a stranger becomes a BenchError that says which.

    An address the client had no row for gets one from the hello's packets.
    A member that refuses sends something back (a TCP reset); a stranger does
    not, so nothing came in from it.
    """
    try:
        return bench.hello()
    except BenchRefusedError:
        if target.row is None:
            client = read()
            row = find_peer(client, target.address)
            if row is None or not row.get("bytes_in"):
                raise not_member_error(target.address, client) from None
        raise refused_error(target, port) from None


def settle_path(read: Callable[[], ClientView], address: str, progress: Progress) -> ClientView:
    """The client's status once the peer's path is not being set up (or after a deadline)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    client = read()
    while time.monotonic() < deadline:
        row = find_peer(client, address)
        if row is None or row.get("state") not in SETTLING_STATES:
            break
        progress.update(detail=f"waiting for the path to settle ({row.get('state')})")
        time.sleep(0.5)
        client = read()
    return client


def _path(client: ClientView, address: str) -> str | None:
    row = find_peer(client, address)
    path = row.get("path") if row is not None else None
    return path if isinstance(path, str) else None


def _machine() -> tuple[dict[str, Any], tuple[str, ...]]:
    """The machine facts every report carries, and their lines for the table."""
    facts = machine_facts()
    return facts, tuple(describe_machine(facts))


def run(
    args: argparse.Namespace, *, connect: Callable[[str, int], BenchClient] = BenchClient
) -> Report:
    """``p2pvpn bench peer``: ``connect`` makes the traffic client (a fake in tests)."""
    options = options_from(args)

    def read() -> ClientView:
        return read_client(args.name, args.state_dir)

    client = read()
    target = resolve_target(client, args.target)
    bench = connect(target.address, args.port)
    hello = greet(bench, target, args.port, read)
    facts, machine_lines = _machine()
    report = Report("peer", facts, {"target": args.target, "port": args.port, **asdict(options)})
    with Progress(f"bench peer {target.address}", total=planned_seconds(options)) as progress:
        before = settle_path(read, target.address, progress)
        measurement = measure_peer(bench, options, progress, lambda: cpu_seconds(before.pid))
        after = read()
    if after.pid != before.pid:
        measurement.errors.append(f"the client restarted during the run (pid {after.pid})")
    summary = PeerSummary(
        target=target,
        hello=hello,
        local=before,
        port=args.port,
        options=options,
        path_before=_path(before, target.address),
        path_after=_path(after, target.address),
        measurement=measurement,
        machine_lines=machine_lines,
    )
    report.results = peer_results(summary)
    report.series = measurement.series
    report.bars = peer_bars(measurement)
    return report.finish(peer_text(summary), ok=summary.ok)


# --------------------------------------------------------------------------- bench serve


def run_serve(args: argparse.Namespace) -> int:
    """``p2pvpn bench serve``: until SIGINT/SIGTERM, then 0."""
    return serve_bench(args.name, args.state_dir, args.port, args.wait)
