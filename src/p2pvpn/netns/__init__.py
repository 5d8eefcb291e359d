"""Network namespaces for p2pvpn networks on one machine (needs root).

One package for everything that builds networks out of namespaces: the
product's ``p2pvpn demo``, the integration tests and the benchmarks.

* `Namespace`: one named namespace, its commands (``ip``, ``nft``, ``ping``,
  ``ss``), addresses, routes, bridges and veths; `delete_namespace` and
  `list_namespaces` for namespaces known only by name.
* `Link`, `Segment`: a veth pair between two namespaces; a bridged L2 segment.
* `nat_ruleset`, `make_nat_router`, `nat_site`, `NatSite`: THE NAT router.
* `Process`, `terminate_all`, `process_env`: long-running processes in a
  namespace, logging to a file, in a session of their own; their environment
  makes this very p2pvpn importable.
* `wait_for`, `wait_until`: polling with a deadline.
* `TestBed`, `run_namespace`, `cleanup_run`, `sweep_stale_namespaces`:
  namespaces named for this run (``p2t-<pid>-<n>-<name>``) and everything
  built in them, always cleaned up.

Every command that fails raises `CommandError` with the command line and
its error output.
"""

from p2pvpn.netns._commands import COMMAND_TIMEOUT, CommandError, run
from p2pvpn.netns._links import SEGMENT_BRIDGE, Link, Segment, make_link
from p2pvpn.netns._namespace import (
    NETNS_DIR,
    Namespace,
    delete_namespace,
    list_namespaces,
    ping_argv,
)
from p2pvpn.netns._nat import NAT_TABLE, NatMode, NatSite, make_nat_router, nat_ruleset, nat_site
from p2pvpn.netns._process import (
    Process,
    p2pvpn_argv,
    process_env,
    python_argv,
    terminate_all,
)
from p2pvpn.netns._requirements import TUN_DEVICE, missing_requirements
from p2pvpn.netns._testbed import (
    PREFIX,
    RUN_PREFIX,
    TestBed,
    cleanup_run,
    run_namespace,
    sweep_stale_namespaces,
)
from p2pvpn.netns._wait import Tick, WaitTimeoutError, wait_for, wait_until

__all__ = [
    "COMMAND_TIMEOUT",
    "NAT_TABLE",
    "NETNS_DIR",
    "PREFIX",
    "RUN_PREFIX",
    "SEGMENT_BRIDGE",
    "TUN_DEVICE",
    "CommandError",
    "Link",
    "Namespace",
    "NatMode",
    "NatSite",
    "Process",
    "Segment",
    "TestBed",
    "Tick",
    "WaitTimeoutError",
    "cleanup_run",
    "delete_namespace",
    "list_namespaces",
    "make_link",
    "make_nat_router",
    "missing_requirements",
    "nat_ruleset",
    "nat_site",
    "p2pvpn_argv",
    "ping_argv",
    "process_env",
    "python_argv",
    "run",
    "run_namespace",
    "sweep_stale_namespaces",
    "terminate_all",
    "wait_for",
    "wait_until",
]
