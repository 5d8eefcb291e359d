"""Network namespaces for p2pvpn networks on one machine (needs root).

One package for everything that builds networks out of namespaces: the
product's ``p2pvpn demo``, the integration tests and the benchmarks.

* `Namespace`: one named namespace, its commands (``ip``, ``nft``, ``ping``,
  ``ss``), addresses, routes, bridges and veths, its own resolv.conf
  (``/etc/netns/NAME``, removed with it); `delete_namespace` and
  `list_namespaces` for namespaces known only by name.
* `link_internet_host`, `InternetHost`: an "internet" host reachable only
  through one namespace, its default route (an exit node's uplink).
* `Link`, `Segment`: a veth pair between two namespaces; a bridged L2 segment.
* `nat_ruleset`, `make_nat_router`, `nat_site`, `NatSite`: THE NAT router.
* `Process`, `terminate_all`, `process_env`: long-running processes in a
  namespace, logging to a file, in a session of their own; their environment
  makes this very p2pvpn importable.
* `LocalNatsServer`, `nats_server_argv`: a JetStream nats-server for relay
  clusters, on loopback or in a namespace.
* `wait_for`, `wait_until`: polling with a deadline.
* `TestBed`, `run_namespace`, `cleanup_run`, `sweep_stale_namespaces`:
  namespaces named for this run (``p2t-<pid>-<n>-<name>``) and everything
  built in them, always cleaned up.

On a test bed, for the integration tests and the soak benchmark:

* `VpnNetwork`, `Client`, `nat_client`, `wait_state`, `wait_connected`: a
  ``p2pvpn server`` and ``p2pvpn run`` clients, directly on the "internet"
  or behind NAT sites; `block_udp_between` / `unblock` cut their direct path.
* `ClusterNetwork`, `ClusterServer`: a relay cluster - NATS and several
  ``p2pvpn server --cluster`` - with clients that list every server.
* `PingLog`, `BULK_RECEIVER`, `BULK_SENDER`: traffic through the tunnel.
* `state_changes`, `first_change`, `process_resources`: what the clients
  logged and how much they use.

Every command that fails raises `CommandError` with the command line and
its error output.
"""

from p2pvpn.netns._cluster import CLUSTER_TTL, ClusterNetwork, ClusterServer
from p2pvpn.netns._commands import COMMAND_TIMEOUT, CommandError, run
from p2pvpn.netns._internet import INTERNET_NETWORK, InternetHost, link_internet_host
from p2pvpn.netns._links import SEGMENT_BRIDGE, Link, Segment, make_link
from p2pvpn.netns._namespace import (
    ETC_NETNS_DIR,
    NETNS_DIR,
    Namespace,
    delete_namespace,
    list_namespaces,
    ping_argv,
    remove_namespace_etc,
)
from p2pvpn.netns._nat import (
    CUT_TABLE,
    NAT_TABLE,
    NatMode,
    NatSite,
    block_udp_between,
    make_nat_router,
    nat_ruleset,
    nat_site,
    unblock,
)
from p2pvpn.netns._nats import (
    NATS_PORT,
    NATS_SERVER,
    LocalNatsServer,
    free_tcp_port,
    nats_server_argv,
)
from p2pvpn.netns._observe import (
    Resources,
    Transition,
    first_change,
    process_resources,
    state_changes,
)
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
from p2pvpn.netns._traffic import BULK_PORT, BULK_RECEIVER, BULK_SENDER, PingLog
from p2pvpn.netns._vpn import (
    DHCP,
    STUN_PORT,
    WS_PORT,
    Client,
    VpnNetwork,
    nat_client,
    peer_state,
    wait_connected,
    wait_state,
)
from p2pvpn.netns._wait import Tick, WaitTimeoutError, wait_for, wait_until

__all__ = [
    "BULK_PORT",
    "BULK_RECEIVER",
    "BULK_SENDER",
    "CLUSTER_TTL",
    "COMMAND_TIMEOUT",
    "CUT_TABLE",
    "DHCP",
    "ETC_NETNS_DIR",
    "INTERNET_NETWORK",
    "NATS_PORT",
    "NATS_SERVER",
    "NAT_TABLE",
    "NETNS_DIR",
    "PREFIX",
    "RUN_PREFIX",
    "SEGMENT_BRIDGE",
    "STUN_PORT",
    "TUN_DEVICE",
    "WS_PORT",
    "Client",
    "ClusterNetwork",
    "ClusterServer",
    "CommandError",
    "InternetHost",
    "Link",
    "LocalNatsServer",
    "Namespace",
    "NatMode",
    "NatSite",
    "PingLog",
    "Process",
    "Resources",
    "Segment",
    "TestBed",
    "Tick",
    "Transition",
    "VpnNetwork",
    "WaitTimeoutError",
    "block_udp_between",
    "cleanup_run",
    "delete_namespace",
    "first_change",
    "free_tcp_port",
    "link_internet_host",
    "list_namespaces",
    "make_link",
    "make_nat_router",
    "missing_requirements",
    "nat_client",
    "nat_ruleset",
    "nat_site",
    "nats_server_argv",
    "p2pvpn_argv",
    "peer_state",
    "ping_argv",
    "process_env",
    "process_resources",
    "python_argv",
    "remove_namespace_etc",
    "run",
    "run_namespace",
    "state_changes",
    "sweep_stale_namespaces",
    "terminate_all",
    "unblock",
    "wait_connected",
    "wait_for",
    "wait_state",
    "wait_until",
]
