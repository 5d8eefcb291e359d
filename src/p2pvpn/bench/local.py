"""`p2pvpn bench local` (being built: issue 14)."""

from __future__ import annotations

import argparse

from p2pvpn.bench.report import BenchError, Report

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def run(args: argparse.Namespace) -> Report:
    raise BenchError("not built yet")
