"""Offering this machine as an exit node (``exit_node = true``).

Members that use us as their exit send their internet traffic into our TUN;
the kernel forwards it (net.ipv4.ip_forward) and an nftables table of ours
masquerades it out of whatever interface the default route names. The
replies come back into the TUN with an internet source, and the data plane
wraps them in IPIP toward their member (`DataPlane.set_forwarded_wrap`).

Everything we change is recorded in ``<state_dir>/exit-node.json`` BEFORE it
is changed, so a run killed with SIGKILL leaves a note that the next start's
`ExitNodeOffer.remove_stale` follows to undo it. The commands (nft, ip) run
on a worker thread: the event loop never waits for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from p2pvpn._files import write_atomically
from p2pvpn.dataplane.base import DataPlane

logger = logging.getLogger(__name__)

STATE_FILE = "exit-node.json"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TABLE_PREFIX = "p2pvpn_exit_"
NFT_MISSING = "exit_node = true needs nftables' nft command: apt install nftables"
COMMAND_TIMEOUT = 15.0

# argv and what goes to its stdin -> its stdout; raises ExitNodeError.
Runner = Callable[[Sequence[str], str | None], str]


class ExitNodeError(Exception):
    """Offering (or cleaning up after) an exit node failed; the message says why."""


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """The real `Runner`: one command, its failure as an ExitNodeError."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as error:
        if argv[0] == "nft":
            raise ExitNodeError(NFT_MISSING) from error
        raise ExitNodeError(f"{argv[0]} not found: {error}") from error
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExitNodeError(f"{' '.join(argv)} failed: {error}") from error
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit status {done.returncode}"
        raise ExitNodeError(f"{' '.join(argv)} failed: {message}")
    return done.stdout


def table_name(interface: str) -> str:
    """The nft table of the client on `interface` (nft names take no "-")."""
    return TABLE_PREFIX + interface.replace("-", "_")


def _table_gone_ruleset(table: str) -> str:
    # Creating an existing table is a no-op, so the delete never fails: idempotent.
    return f"table ip {table} {{}}\ndelete table ip {table}\n"


def masquerade_ruleset(table: str, network: IPv4Network, interface: str) -> str:
    """The table, replaced as a whole in one transaction (`nft -f -` applies all or nothing).

    VPN sources leaving by any interface but the TUN are masqueraded; VPN
    traffic between members stays untouched.
    """
    return _table_gone_ruleset(table) + (
        f"table ip {table} {{\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f'        ip saddr {network} oifname != "{interface}" masquerade\n'
        "    }\n"
        "}\n"
    )


@dataclass(frozen=True, slots=True)
class _State:
    """What exit-node.json records: enough to undo everything without us."""

    ip_forward: str
    table: str

    def to_json(self) -> str:
        return json.dumps({"ip_forward": self.ip_forward, "table": self.table}) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> _State | None:
        """The recorded state; None when there is no file. ValueError when it is unreadable."""
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is unreadable: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no JSON object")
        ip_forward, table = data.get("ip_forward"), data.get("table")
        if ip_forward not in ("0", "1") or not isinstance(table, str):
            raise ValueError(f"{path} has no valid ip_forward/table: {data!r}")
        if not table.startswith(TABLE_PREFIX) or not table.replace("_", "").isalnum():
            raise ValueError(f"{path} names a table that is not ours: {table!r}")
        return cls(ip_forward, table)


def _read_forward(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as error:
        raise ExitNodeError(f"cannot read {path}: {error}") from error


def _write_forward(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n", encoding="ascii")
    except OSError as error:
        raise ExitNodeError(f"cannot set {path} to {value}: {error}") from error


def default_interface(runner: Runner) -> str | None:
    """The interface of the IPv4 default route (the first, as the kernel lists them)."""
    try:
        routes = json.loads(runner(["ip", "-j", "-4", "route", "show", "default"], None) or "[]")
    except (ExitNodeError, json.JSONDecodeError) as error:
        logger.debug("reading the default route failed: %s", error)
        return None
    for route in routes if isinstance(routes, list) else []:
        if isinstance(route, dict) and isinstance(route.get("dev"), str):
            return str(route["dev"])
    return None


class ExitNodeOffer:
    """Forwarding and masquerade for the VPN network while this client offers itself."""

    def __init__(
        self,
        interface: str,
        state_dir: Path,
        *,
        runner: Runner = run_command,
        ip_forward: Path = IP_FORWARD,
    ) -> None:
        self.interface = interface
        self.state_dir = Path(state_dir)
        self.table = table_name(interface)
        self._runner = runner
        self._ip_forward = ip_forward
        self._state: _State | None = None  # set while our changes are in place
        self.network: IPv4Network | None = None
        self.default_interface: str | None = None

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def offering(self) -> bool:
        return self._state is not None and self.network is not None

    async def start(self, network: IPv4Network, data_plane: DataPlane) -> None:
        """Forward and masquerade `network` (after login; again with a new address)."""
        await asyncio.to_thread(self._apply, network)
        data_plane.set_forwarded_wrap(network)
        self.network = network
        out = self.default_interface or "(no default route yet)"
        logger.info("offering this machine as an exit node: %s masqueraded out of %s", network, out)

    async def close(self) -> None:
        """Undo everything start() did; idempotent."""
        if self._state is None:
            return
        self.network = None
        await asyncio.to_thread(self._undo)
        logger.info("exit node withdrawn: table %s removed, ip_forward restored", self.table)

    def snapshot(self) -> dict[str, Any]:
        """``status --json``'s "exit_node"."""
        if not self.offering:
            return {"offering": False, "masquerade": None}
        out = self.default_interface or "(no default route)"
        return {"offering": True, "masquerade": f"{self.network} out of {out}"}

    def check_tools(self) -> None:
        """Fail early and clearly when nft is missing (before the TUN is opened)."""
        self._runner(["nft", "--version"], None)

    # -- worker thread ---------------------------------------------------------

    def _apply(self, network: IPv4Network) -> None:
        state = self._state or self._recorded_or_current()
        # The note first: from here on, a kill leaves enough behind to undo us.
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.state_path, state.to_json())
        self._state = state
        try:
            _write_forward(self._ip_forward, "1")
            self._runner(
                ["nft", "-f", "-"], masquerade_ruleset(self.table, network, self.interface)
            )
        except ExitNodeError:
            try:
                self._undo()
            except ExitNodeError as error:
                logger.warning("undoing the half-made exit node failed too: %s", error)
            raise
        self.default_interface = default_interface(self._runner)
        if self.default_interface is None:
            logger.warning(
                "exit node: this machine has no IPv4 default route; members' internet "
                "traffic cannot leave until it has one"
            )

    def _recorded_or_current(self) -> _State:
        """A note left by an earlier run holds the ip_forward from before any of us."""
        try:
            recorded = _State.from_file(self.state_path)
        except ValueError:
            recorded = None
        if recorded is not None and recorded.table == self.table:
            return recorded
        return _State(_read_forward(self._ip_forward), self.table)

    def _undo(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            _undo_state(state, self.state_path, self._runner, self._ip_forward)

    @staticmethod
    def remove_stale(
        state_dir: Path, *, runner: Runner = run_command, ip_forward: Path = IP_FORWARD
    ) -> bool:
        """Undo what a killed run left (its note in `state_dir`); True when there was one."""
        path = Path(state_dir) / STATE_FILE
        try:
            state = _State.from_file(path)
        except ValueError as error:
            logger.warning("ignoring a broken exit-node note: %s", error)
            path.unlink(missing_ok=True)
            return False
        if state is None:
            return False
        _undo_state(state, path, runner, ip_forward)
        logger.info(
            "removed what an earlier exit-node run left: table %s, ip_forward back to %s",
            state.table,
            state.ip_forward,
        )
        return True


def _undo_state(state: _State, path: Path, runner: Runner, ip_forward: Path) -> None:
    """Table gone, ip_forward as it was, note removed; every step tried, the first error raised."""
    problems: list[str] = []
    try:
        runner(["nft", "-f", "-"], _table_gone_ruleset(state.table))
    except ExitNodeError as error:
        # Without nft no table can have been made: nothing to remove there.
        if str(error) != NFT_MISSING:
            problems.append(str(error))
    try:
        _write_forward(ip_forward, state.ip_forward)
    except ExitNodeError as error:
        problems.append(str(error))
    if problems:
        # The note stays: the next start tries again.
        raise ExitNodeError("; ".join(problems))
    path.unlink(missing_ok=True)
