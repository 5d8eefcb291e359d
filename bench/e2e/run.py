#!/usr/bin/env python3
"""The end-to-end benchmark from a checkout: ``p2pvpn bench local`` with this tree's code.

Kept for the commands in old notes and for the default JSON path beside this
file; everything else is `p2pvpn.bench.local` (see bench/e2e/README.md)::

    sudo python3 bench/e2e/run.py            # full run, about 5-6 minutes
    sudo python3 bench/e2e/run.py --quick    # all variants in about 90 s
    sudo python3 bench/e2e/run.py --tool iperf3 --only raw,fast-no-offload,fast

The flags are those of ``p2pvpn bench local`` (plus ``--json`` and
``--plot``); without ``--json`` the results go to
``bench/e2e/results-<timestamp>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This checkout's p2pvpn first, so the benchmark measures the code beside it.
sys.path.insert(0, str(HERE.parents[1] / "src"))

from p2pvpn.cli import main  # noqa: E402


def bench_argv(argv: list[str]) -> list[str]:
    """``bench local ARGV``, with the default JSON path unless asked otherwise."""
    wants_help = any(arg in ("-h", "--help") for arg in argv)
    has_json = any(arg == "--json" or arg.startswith("--json=") for arg in argv)
    if not (wants_help or has_json):
        argv = [*argv, "--json", str(HERE / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")]
    return ["bench", "local", *argv]


if __name__ == "__main__":
    sys.exit(main(bench_argv(sys.argv[1:])))
