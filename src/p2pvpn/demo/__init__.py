"""`p2pvpn demo`: a complete p2pvpn network on this machine, in network namespaces.

A server (with its STUN responder) on an "internet" segment, two NAT routers,
and three clients: alice and carol on one LAN behind nat1, bob behind nat2.
The demo pings across, shows every peer going CONNECTED, measures throughput
over the direct path and over the relay, prints a summary and removes
everything again (also on Ctrl-C). Needs root; see `run_demo`.
"""

import sys
from typing import TextIO

from p2pvpn.demo.checks import missing_requirements
from p2pvpn.demo.output import Console, use_color
from p2pvpn.demo.runner import Demo, DemoOptions
from p2pvpn.demo.state import DemoLock, StateFile, find_leftovers, remove_leftovers
from p2pvpn.netns import list_namespaces

__all__ = ["DemoOptions", "cleanup_demo", "run_demo"]


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> int:
    """Run the demo (or remove a kept one with ``options.cleanup``); returns the exit code.

    Progress goes to ``stream`` (stdout); requirement problems go to stderr.
    """
    stream = stream if stream is not None else sys.stdout
    console = Console(stream, color=use_color(stream, options.no_color))
    problems = missing_requirements(cleanup_only=options.cleanup)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    if options.cleanup:
        return cleanup_demo(console)
    return Demo(options, console).run()


def cleanup_demo(
    console: Console, state_file: StateFile | None = None, lock: DemoLock | None = None
) -> int:
    """``p2pvpn demo --cleanup``: remove a demo kept with ``--keep`` (or left over)."""
    state_file = state_file or StateFile()
    lock = lock or DemoLock()
    if not lock.acquire():
        pid = lock.holder()
        console.fail(
            f"a p2pvpn demo is running (pid {pid or '?'}): it removes everything itself "
            "when it ends (Ctrl-C in its terminal)"
        )
        return 1
    try:
        return _cleanup_locked(console, state_file)
    finally:
        lock.release()


def _cleanup_locked(console: Console, state_file: StateFile) -> int:
    leftovers = find_leftovers(state_file)
    if not leftovers:
        console.ok("no demo to remove")
        return 0
    problems = remove_leftovers(leftovers, state_file)
    left = list_namespaces("p2pdemo-")
    if problems or left:
        console.fail("the demo could not be removed completely")
        for problem in problems + [f"namespace {name} is still there" for name in left]:
            console.detail(problem)
        return 1
    console.ok(f"removed the demo: {leftovers.describe()}")
    return 0
