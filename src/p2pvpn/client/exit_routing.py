"""Using an exit node (`exit` key): all traffic through one member, underlay kept out.

Policy routing, set up once after login (`ExitRouting.start`):

* table 30326 holds, while an exit node is in use, ``0.0.0.0/0 dev <tun>``;
* rule 5271 ``not fwmark 0x7076 lookup 30326`` sends every packet that is not
  the client's own underlay there (the UDP and WebSocket sockets carry the mark,
  `EXIT_MARK`, so they keep the main table's default route: no loop);
* rule 5270 ``lookup main suppress_prefixlength 0`` (only with ``exit_allow_lan``)
  lets the main table's routes more specific than a default (the LAN, the VPN
  network) win before that.

While table 30326 is empty the lookup falls through to the main table: with no
exit node present the machine routes as if nothing were set up (no black hole).
The data plane sends what the TUN device reads to the exit node IPIP-wrapped,
through sysroutes entries covering everything outside the VPN network.

The state file (`STATE_FILE` in the state directory) is written before any
rule, so `remove_stale` undoes what a SIGKILLed run left. Netlink runs off the
loop, one call at a time. `ExitChooser` is the sans-I/O part: which member, if
any, to use now.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from p2pvpn.client import _pyroute2

if TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
else:
    IPRoute, NetlinkError = _pyroute2.load()

__all__ = [
    "EXIT_MARK",
    "EXIT_RULE_PRIORITY",
    "EXIT_TABLE",
    "LAN_RULE_PRIORITY",
    "SO_MARK",
    "STATE_FILE",
    "Change",
    "ExitChooser",
    "ExitNodeSource",
    "ExitRouting",
    "exit_entries",
    "remove_stale",
]

logger = logging.getLogger(__name__)

EXIT_MARK = 0x7076  # "pv": the client's own underlay sockets
EXIT_TABLE = 30326  # 0x7676
LAN_RULE_PRIORITY = 5270
EXIT_RULE_PRIORITY = 5271
SO_MARK = 36  # socket.SO_MARK, which Python's socket module does not always export
STATE_FILE = "exit-routing.json"
_FIB_RULE_INVERT = 2
_MAIN_TABLE = 254
_ALL = IPv4Network("0.0.0.0/0")

ExitState = Literal["active", "waiting", "off"]
Target = tuple[IPv4Address, str]  # the exit node's address and name


# -------------------------------------------------------------------- the decision


class ExitNodeSource(Protocol):
    """What the choice needs of the name table (client/names.py `NameTable`)."""

    @property
    def generation(self) -> int: ...  # +1 on every change

    def exit_nodes(self) -> dict[IPv4Address, str]: ...
    def lookup(self, name: str) -> IPv4Address | None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """What the routing must do now: ``activate`` (toward ``target``) or ``deactivate``."""

    action: Literal["activate", "deactivate"]
    target: Target | None = None


class ExitChooser:
    """Sans-I/O: follows the `exit` target through the name table's exit nodes.

    ``target`` is a member's name (compared without case) or its IPv4 address;
    it is usable while the member offers itself as an exit node.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.active: Target | None = None
        self.since: float | None = None
        self.fallbacks = 0

    @property
    def state(self) -> ExitState:
        if not self.target:
            return "off"
        return "active" if self.active is not None else "waiting"

    def available(
        self,
        exit_nodes: Mapping[IPv4Address, str],
        lookup: Callable[[str], IPv4Address | None],
    ) -> Target | None:
        """The target's (address, name) if it offers itself as an exit node now."""
        if not self.target:
            return None
        try:
            address = IPv4Address(self.target)
        except ValueError:
            found = lookup(self.target)
            if found is None or found not in exit_nodes:
                return None
            return found, exit_nodes[found] or self.target
        if address not in exit_nodes:
            return None
        return address, exit_nodes[address] or str(address)

    def decide(self, available: Target | None, now: float) -> Change | None:
        """The change that brings the routing to ``available``; None when none is due.

        The caller applies it; the chooser counts it as done (a failed activation
        is retried on the next call only if the caller calls `forget`).
        """
        if available is not None and self.active is not None and available[0] == self.active[0]:
            self.active = available  # a new name (a suffix, say) on the same member: no change
            return None
        if available is not None:
            self.active, self.since = available, now
            return Change("activate", available)
        if available is None and self.active is not None:
            gone, self.active, self.since = self.active, None, now
            self.fallbacks += 1
            return Change("deactivate", gone)
        return None

    def forget(self) -> None:
        """The last activation did not take: try again on the next decision."""
        self.active = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "target": self.target or None,
            "address": str(self.active[0]) if self.active is not None else None,
            "state": self.state,
            "since": self.since,
            "fallbacks": self.fallbacks,
        }


def exit_entries(
    exit_address: IPv4Address, vpn: IPv4Network
) -> list[tuple[IPv4Network, IPv4Address]]:
    """The data plane's entries toward the exit node: everything outside the VPN network."""
    return [(network, exit_address) for network in _ALL.address_exclude(vpn)]


# ---------------------------------------------------------------------- netlink


def _rule_specs(allow_lan: bool) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    if allow_lan:
        specs.append({"table": _MAIN_TABLE, "priority": LAN_RULE_PRIORITY, "suppress_prefixlen": 0})
    specs.append(
        {
            "table": EXIT_TABLE,
            "priority": EXIT_RULE_PRIORITY,
            "fwmark": EXIT_MARK,
            "fwmask": 0xFFFFFFFF,
            "flags": _FIB_RULE_INVERT,
        }
    )
    return specs


def _add_rules(allow_lan: bool) -> None:
    with IPRoute() as ipr:
        for spec in _rule_specs(allow_lan):
            try:
                ipr.rule("add", **spec)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # left by an earlier run of ours
                    raise


def _remove_rules() -> int:
    """Delete our rules (both priorities, whatever ``allow_lan`` was); how many went."""
    removed = 0
    with IPRoute() as ipr:
        for spec in _rule_specs(True):
            while True:  # a rule added twice (by two runs) is there twice
                try:
                    ipr.rule("del", **spec)
                except NetlinkError as exc:
                    if exc.code in (errno.ENOENT, errno.ESRCH):
                        break
                    raise
                removed += 1
    return removed


def _set_default_route(interface: str, source: IPv4Address | None) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise OSError(errno.ENODEV, f"no device {interface}")
        extra = {} if source is None else {"prefsrc": str(source)}
        ipr.route("replace", dst="0.0.0.0", dst_len=0, oif=found[0], table=EXIT_TABLE, **extra)


def _flush_table() -> int:
    """Delete every route of our table; how many went."""
    removed = 0
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2, table=EXIT_TABLE):
            if route.get_attr("RTA_TABLE") not in (None, EXIT_TABLE):
                continue
            try:
                ipr.route(
                    "del",
                    dst=route.get_attr("RTA_DST") or "0.0.0.0",
                    dst_len=route["dst_len"],
                    scope=route["scope"],  # a "scope link" route is not found without it
                    table=EXIT_TABLE,
                )
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
                continue
            removed += 1
    return removed


def _write_state(path: Path, interface: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "interface": interface,
        "table": EXIT_TABLE,
        "mark": EXIT_MARK,
        "priorities": [LAN_RULE_PRIORITY, EXIT_RULE_PRIORITY],
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(state) + "\n")
    os.replace(temporary, path)


def _as_os_error(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` with a netlink failure raised as OSError (what the node reports)."""
    try:
        return func(*args)
    except NetlinkError as exc:
        code = exc.code if isinstance(exc.code, int) else 0
        raise OSError(code, f"exit-node routing: {os.strerror(code) if code else exc}") from exc


def remove_stale(state_dir: Path) -> bool:
    """Undo the rules and table route of a run that could not (SIGKILL); True if any.

    Blocking (netlink): call it off the loop.
    """
    path = state_dir / STATE_FILE
    if not path.exists():
        return False
    removed: int = _as_os_error(_remove_rules) + _as_os_error(_flush_table)
    path.unlink(missing_ok=True)
    if removed:
        logger.info("removed %d exit-node routing entries left by an earlier run", removed)
    return removed > 0


class ExitRouting:
    """The kernel side of using an exit node; every call is made off the loop, in order.

    ``exit_routes`` receives the data plane's entries toward the exit node
    (`SystemRouteManager.set_exit_routes`); ``[]`` when none is in use.
    """

    def __init__(
        self,
        interface: str,
        state_dir: Path,
        allow_lan: bool,
        *,
        exit_routes: Callable[[list[tuple[IPv4Network, IPv4Address]]], None] | None = None,
    ) -> None:
        self.interface = interface
        self.state_path = state_dir / STATE_FILE
        self.allow_lan = allow_lan
        self._exit_routes = exit_routes
        self._lock = asyncio.Lock()
        self._started = False
        self._active: Target | None = None

    @property
    def started(self) -> bool:
        return self._started

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(_as_os_error, func, *args)

    async def start(self) -> None:
        """The rules (state file first). Idempotent: a second login changes nothing."""
        if self._started:
            return
        await self._call(_write_state, self.state_path, self.interface)
        self._started = True
        await self._call(_add_rules, self.allow_lan)
        lan = "the LAN stays direct" if self.allow_lan else "the LAN goes through it too"
        logger.info("exit-node routing ready (table %d, %s)", EXIT_TABLE, lan)

    async def activate(
        self, address: IPv4Address, name: str, local: IPv4Interface | None = None
    ) -> None:
        """All traffic outside the VPN network goes to the exit node at ``address``.

        ``local`` is our TUN address: the source the kernel picks for that traffic
        (without it, the underlay's address would be picked and the exit node's
        masquerade, which takes the VPN network only, would not answer it), and
        the VPN network the data plane keeps for itself.
        """
        # The data plane first: a packet the route sends into the TUN device finds its way.
        if self._exit_routes is not None and local is not None:
            self._exit_routes(exit_entries(address, local.network))
        await self._call(_set_default_route, self.interface, local.ip if local else None)
        self._active = (address, name)
        logger.info("using exit node %s (%s)", name, address)

    async def deactivate(self, reason: str = "") -> None:
        """Back to the main table's default route (the data plane's entries go too)."""
        await self._call(_flush_table)
        if self._exit_routes is not None:
            self._exit_routes([])
        gone, self._active = self._active, None
        if gone is not None:
            address, name = gone
            because = f" ({reason})" if reason else ""
            logger.warning(
                "exit node %s (%s) is gone: back to this machine's default route%s",
                name,
                address,
                because,
            )

    async def close(self) -> None:
        """Remove the route, the rules and the state file."""
        if self._exit_routes is not None:
            self._exit_routes([])
        self._active = None
        if not self._started and not self.state_path.exists():
            return
        await self._call(_flush_table)
        await self._call(_remove_rules)
        self.state_path.unlink(missing_ok=True)
        self._started = False
