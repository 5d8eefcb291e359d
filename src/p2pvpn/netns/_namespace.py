"""Named network namespaces, driven with ``ip -n NAME`` and ``ip netns exec NAME``.

Nothing here touches the host's own interfaces: veth pairs are created
directly between two namespaces (``ip link add ... netns B``), and deleting
a namespace first stops every process in it (a namespace lives as long as
a process runs in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from p2pvpn.netns._commands import COMMAND_TIMEOUT, run
from p2pvpn.netns._process import (
    TERMINATE_GRACE,
    Process,
    process_env,
    python_argv,
    start_process,
    terminate_all,
)

__all__ = [
    "ETC_NETNS_DIR",
    "IFNAME_MAX",
    "NETNS_DIR",
    "Namespace",
    "delete_namespace",
    "interface_name",
    "list_namespaces",
    "namespace_pids",
    "ping_argv",
    "remove_namespace_etc",
]

NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
"""``ip netns exec NAME`` bind-mounts each file of ``/etc/netns/NAME/`` over its ``/etc`` twin."""
IFNAME_MAX = 15
"""Linux interface names have at most 15 characters."""


def list_namespaces(prefix: str = "") -> list[str]:
    """The named network namespaces (``ip netns list``) whose name starts with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name for name in names if name.startswith(prefix))


def namespace_pids(name: str) -> list[int]:
    """Processes running in namespace ``name`` (empty when it does not exist)."""
    result = run(["ip", "netns", "pids", name], check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _kill_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def remove_namespace_etc(name: str) -> None:
    """Remove ``/etc/netns/NAME`` (a resolv.conf of `Namespace.write_resolv_conf`), and
    ``/etc/netns`` itself when that leaves it empty (the test beds and the demo made it).
    Idempotent; touches nothing when there is no ``/etc/netns/NAME``."""
    directory = ETC_NETNS_DIR / name
    if directory.is_symlink():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    else:
        return
    with contextlib.suppress(OSError):  # not empty: another namespace still has files
        ETC_NETNS_DIR.rmdir()


def delete_namespace(name: str, grace: float = 2.0) -> None:
    """Stop every process in ``name`` (SIGTERM, then SIGKILL after ``grace`` s) and delete it,
    with its files in ``/etc/netns/NAME``.

    Idempotent; raises `CommandError` when the namespace stays.
    """
    remove_namespace_etc(name)
    if not (NETNS_DIR / name).exists():
        return
    pids = namespace_pids(name)
    if pids:
        _kill_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = namespace_pids(name)
        _kill_all(pids, signal.SIGKILL)
    run(["ip", "netns", "delete", name], check=False)
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "delete", name])


def interface_name(name: str) -> str:
    """``name`` if Linux accepts it as an interface name, else ValueError."""
    if not 0 < len(name) <= IFNAME_MAX or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r} is invalid (1..{IFNAME_MAX} characters)")
    return name


def ping_argv(
    address: IPv4Address | str, count: int, *, interval: float = 0.2, wait: int = 1
) -> list[str]:
    """``ping`` numeric and quiet: ``count`` echo requests, ``wait`` s for each reply."""
    return [
        "ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", str(wait), str(address),
    ]  # fmt: skip


class Namespace:
    """One named network namespace; `create` makes it, `delete` (or ``with``) removes it."""

    def __init__(self, name: str, logical: str | None = None) -> None:
        self.name = name
        self.logical = logical or name
        self.processes: list[Process] = []
        self._next_eth = 0

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def create(cls, name: str, *, logical: str | None = None, ipv6: bool = False) -> Namespace:
        """``ip netns add``, loopback up, IPv6 off unless asked; deleted again on failure.

        IPv6 off keeps link-local chatter (router solicitations, MLD) off the
        links and TUN devices; /proc/sys/net is per namespace.
        """
        run(["ip", "netns", "add", name])
        namespace = cls(name, logical)
        try:
            namespace.ip("link", "set", "lo", "up")
            if not ipv6:
                namespace.write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")
                namespace.write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")
        except BaseException:
            namespace.delete()
            raise
        return namespace

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def next_ifname(self) -> str:
        """The next ``ethN`` name in this namespace."""
        name = f"eth{self._next_eth}"
        self._next_eth += 1
        return name

    # commands

    def exec_argv(self, cmd: Sequence[str] | str) -> list[str]:
        """``ip netns exec NAME`` and ``cmd`` (an argv, or a shell command string)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace with `process_env` (plus ``env``)."""
        return run(
            self.exec_argv(cmd), input=input, timeout=timeout, check=check, env=process_env(env)
        )

    def python(
        self, code: str, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (``python -c``) in the namespace with p2pvpn importable."""
        return self.run(python_argv("-c", code, *args), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME args...``"""
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n NAME args...`` decoded."""
        out = run(["ip", "-j", "-n", self.name, *args]).stdout
        return json.loads(out) if out.strip() else []

    def write_sysctl(self, path: str, value: str) -> None:
        """Write ``value`` to ``/proc/sys/<path>`` as seen from inside the namespace.

        Through ``sh`` rather than the ``sysctl`` tool, which minimal systems lack.
        """
        self.run(["sh", "-c", 'echo "$1" > "/proc/sys/$2"', "sh", value, path])

    def write_resolv_conf(self, nameservers: Iterable[IPv4Address | str]) -> Path:
        """The resolv.conf that commands run here see (``/etc/netns/NAME/resolv.conf``, which
        ``ip netns exec`` mounts over /etc/resolv.conf); deleting the namespace removes it."""
        directory = ETC_NETNS_DIR / self.name
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        lines = [f"nameserver {IPv4Address(str(address))}" for address in nameservers]
        # Short timeouts: a lookup that fails says so in seconds, not in 30.
        lines.append("options timeout:2 attempts:2")
        path = directory / "resolv.conf"
        path.write_text("\n".join(lines) + "\n", encoding="ascii")
        return path

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``)."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def start(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Process:
        """Start a long-running ``argv`` here; it is stopped when the namespace is deleted."""
        process = start_process(self.name, argv, log_path, name=name, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    # configuration

    def add_address(self, ifname: str, address: IPv4Interface | str) -> IPv4Interface:
        address = IPv4Interface(address)
        self.ip("addr", "add", str(address), "dev", ifname)
        return address

    def set_up(self, ifname: str, mtu: int | None = None) -> None:
        extra = ["mtu", str(mtu)] if mtu else []
        self.ip("link", "set", "dev", ifname, *extra, "up")

    def add_route(
        self,
        destination: IPv4Network | str,
        via: IPv4Address | IPv4Interface | str | None = None,
        dev: str | None = None,
    ) -> None:
        args = ["route", "replace", str(destination)]
        if via is not None:
            args += ["via", str(IPv4Interface(via).ip)]
        if dev is not None:
            args += ["dev", dev]
        self.ip(*args)

    def default_route(self, via: IPv4Address | IPv4Interface | str) -> None:
        self.add_route("default", via=via)

    def enable_forwarding(self) -> None:
        self.write_sysctl("net/ipv4/ip_forward", "1")

    def add_bridge(self, ifname: str) -> None:
        """A bridge with STP and multicast snooping off: a plain switch, up."""
        self.ip("link", "add", "name", interface_name(ifname), "type", "bridge")
        self.ip("link", "set", ifname, "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        self.set_up(ifname)

    def add_veth(
        self,
        ifname: str,
        peer: Namespace,
        peer_ifname: str,
        *,
        master: str | None = None,
        mtu: int | None = None,
    ) -> None:
        """A veth pair: ``ifname`` here (plugged into bridge ``master``), ``peer_ifname`` in peer.

        Both ends are set up; addresses are the caller's business.
        """
        self.ip(
            "link", "add", "name", interface_name(ifname), "type", "veth",
            "peer", "name", interface_name(peer_ifname), "netns", peer.name,
        )  # fmt: skip
        if master is not None:
            self.ip("link", "set", "dev", ifname, "master", master)
        self.set_up(ifname, mtu)
        peer.set_up(peer_ifname, mtu)

    # state

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def interfaces(self) -> list[str]:
        return [link["ifname"] for link in self.ip_json("link", "show")]

    def link_info(self, ifname: str) -> dict[str, Any] | None:
        """``ip -j -d link show dev ifname`` (None when there is no such interface)."""
        result = run(
            ["ip", "-j", "-d", "-n", self.name, "link", "show", "dev", ifname], check=False
        )
        if result.returncode != 0:
            return None
        links = json.loads(result.stdout)
        return dict(links[0]) if links else None

    def addresses(self, ifname: str | None = None) -> list[IPv4Interface]:
        """The IPv4 addresses with prefix, of one interface or all of them."""
        args = ["-4", "addr", "show"] + (["dev", ifname] if ifname else [])
        return [
            IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            for link in self.ip_json(*args)
            for info in link.get("addr_info", [])
            if info.get("family") == "inet"
        ]

    def routes(self) -> list[dict[str, Any]]:
        """``ip -j -4 route show`` (main table)."""
        routes: list[dict[str, Any]] = self.ip_json("-4", "route", "show")
        return routes

    def listening(self, protocol: str, port: int) -> bool:
        """Whether a socket listens on ``port`` (``protocol`` "tcp" or "udp") in the namespace."""
        flag = "-ltnH" if protocol == "tcp" else "-lunH"
        result = self.run(["ss", flag, f"sport = :{port}"], check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    def ping(self, address: IPv4Address | str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``count`` echo requests got replies within ``timeout`` s each."""
        wait = max(1, round(timeout))
        result = self.run(
            ping_argv(IPv4Interface(address).ip, count, wait=wait),
            check=False,
            timeout=count * (wait + 1) + 10,
        )
        return result.returncode == 0

    # teardown

    def delete(self, grace: float = TERMINATE_GRACE) -> None:
        """Stop its processes, then anything else left inside, and delete it. Idempotent."""
        terminate_all(self.processes, grace)
        delete_namespace(self.name, grace=min(grace, 2.0))

    def __enter__(self) -> Namespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
