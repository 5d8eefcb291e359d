"""``p2pvpn bench crypto|local|peer|serve``: the parsers and what every command shares.

Each command's module gives ``configure_parser(parser)`` and ``run(args) ->
Report`` (``serve``: ``run_serve(args) -> int``, it runs until stopped). Here:
``--json FILE`` and ``--plot FILE.png`` for the three that measure, the table
printed at the end, and a `BenchError` turned into one clear line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeAlias

from p2pvpn.bench.report import BenchError, Report

__all__ = ["add_bench_command", "run_bench_command"]

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_MEASURING = (
    ("crypto", "AES-256-GCM seal/open throughput per core, compiled and pure (no root)"),
    ("local", "raw veth against the tunnel in network namespaces on this machine (root)"),
    ("peer", "throughput and latency through the running tunnel to another member"),
)


def _module(name: str) -> ModuleType:
    from importlib import import_module

    return import_module(f"p2pvpn.bench.{name}")


def add_bench_command(commands: _Commands, handler: Callable[[argparse.Namespace], int]) -> None:
    """``p2pvpn bench ...``; ``handler`` is what the top-level CLI calls (it wraps errors)."""
    bench = commands.add_parser(
        "bench",
        help="measure what this machine and a link to another member can do",
        description="Benchmarks that need only the installed package: crypto (no root), "
        "local (namespaces, root), peer and serve (through a running client).",
    )
    kinds = bench.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    for name, help_text in _MEASURING:
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        _module(name).configure_parser(parser)
        parser.add_argument("--json", metavar="FILE", type=Path, help="write the results as JSON")
        parser.add_argument(
            "--plot",
            metavar="FILE.png",
            type=Path,
            help="draw throughput over time and the per-variant bars (pip install p2pvpn[plot])",
        )
        parser.set_defaults(handler=handler)
    serve = kinds.add_parser(
        "serve",
        help="answer `p2pvpn bench peer` from other members, on this client's VPN address only",
    )
    _module("peer").configure_serve_parser(serve)
    serve.set_defaults(handler=handler)


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; 0 when everything was measured, 1 otherwise."""
    try:
        if args.bench_command == "serve":
            code: int = _module("peer").run_serve(args)
            return code
        report: Report = _module(args.bench_command).run(args)
        print(report.text, flush=True)
        if args.json is not None:
            report.write_json(args.json)
            print(f"JSON: {args.json}")
        if args.plot is not None:
            from p2pvpn.bench.plot import plot_report

            plot_report(report.to_json(), args.plot)
            print(f"plot: {args.plot}")
    except BenchError as exc:
        print(f"p2pvpn bench {args.bench_command}: error: {exc}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1
