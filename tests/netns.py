"""Network-namespace test bed for integration tests (needs root).

Everything a test builds lives inside namespaces that this module creates, so
nothing touches the host's interfaces: veth pairs are created directly between
two namespaces (``ip link add ... netns A type veth peer ... netns B``) and
never appear on the host, and a "segment" is a bridge in a hub namespace of
its own. Namespace names are ``p2t-<pid hex>-<n>-<name>``: unique per test run,
recognisable at cleanup, and independent of interface names (which stay short,
``eth0``, ``eth1``, ... per namespace, since Linux allows 15 characters).

Typical use, through the ``testbed`` fixture of ``tests/integration/conftest.py``::

    def test_two_clients(testbed: TestBed) -> None:
        server, c1, c2 = (testbed.namespace(n) for n in ("server", "c1", "c2"))
        wan = testbed.segment("wan", "10.10.0.0/24", [server, c1, c2])
        srv = testbed.start_p2pvpn(server, ["server", "-c", str(cfg)], "server")
        cli = testbed.start_p2pvpn(c1, ["run", "--websocket", f"ws://{wan.ip(server)}:80"], "c1")
        cli.wait_for_log("CONNECTED")
        assert testbed.ping(c1, "192.168.202.2")

The fixture stops every process (SIGTERM, 5 s grace, SIGKILL) and deletes
every namespace at teardown, also when the test fails, and attaches the last
lines of every process log to a failing test's report.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import pytest

__all__ = [
    "PREFIX",
    "REPO_ROOT",
    "RUN_PREFIX",
    "SRC_DIR",
    "UDP_ECHO_SERVER",
    "CommandFailed",
    "Link",
    "Namespace",
    "NatMode",
    "NatSite",
    "Process",
    "Segment",
    "TestBed",
    "cleanup_run",
    "list_namespaces",
    "missing_requirements",
    "nat_ruleset",
    "open_testbed",
    "p2pvpn_argv",
    "process_env",
    "python_argv",
    "require_netns",
    "require_tool",
    "sweep_stale_namespaces",
    "wait_until",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
SRC_DIR = REPO_ROOT / "src"

PREFIX = "p2t-"
RUN_PREFIX = f"{PREFIX}{os.getpid():x}-"
"""Prefix of every namespace this process creates."""
_NAME_RE = re.compile(r"^p2t-([0-9a-f]+)-")
_LOGICAL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")
_IFNAME_MAX = 15

DEFAULT_TIMEOUT = 30.0
"""Default timeout of one command run inside a namespace."""
TERMINATE_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL at teardown."""

_counter = itertools.count(1)

# Make a source checkout importable when p2pvpn is not installed (tests and the
# processes started by the bed both need it). An installed p2pvpn wins.
if importlib.util.find_spec("p2pvpn") is None and (SRC_DIR / "p2pvpn").is_dir():
    sys.path.append(str(SRC_DIR))


# --------------------------------------------------------------------------
# requirements, skipping and failing


@cache
def _netns_probe() -> str | None:
    name = f"{RUN_PREFIX}probe"
    try:
        created = _run(["ip", "netns", "add", name], check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc}"
    if created.returncode != 0:
        return f"`ip netns add` failed: {created.stderr.strip()}"
    _run(["ip", "netns", "delete", name], check=False)
    return None


def missing_requirements() -> list[str]:
    """What this machine lacks for namespace tests (empty when all is there)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (run the tests as root)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (modprobe tun)")
    if shutil.which("ip") is None:
        missing.append("the ip command (apt-get install iproute2)")
    if not missing:
        problem = _netns_probe()
        if problem:
            missing.append(f"network namespaces ({problem})")
    return missing


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: namespace tests must run in CI)", pytrace=False)
    pytest.skip(reason)


def require_netns() -> None:
    """Skip the test (fail it when CI=true) unless namespace tests can run here."""
    missing = missing_requirements()
    if missing:
        _unavailable("network-namespace test needs " + ", ".join(missing))


def require_tool(tool: str, package: str | None = None) -> None:
    """Skip the test (fail it when CI=true) unless ``tool`` is on PATH."""
    if shutil.which(tool) is None:
        _unavailable(f"test needs the {tool} command (apt-get install {package or tool})")


# --------------------------------------------------------------------------
# commands and processes


class CommandFailed(subprocess.CalledProcessError):
    """A command failed; ``str()`` shows the command, exit status, stdout and stderr."""

    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else " ".join(map(str, self.cmd))
        text = f"command failed with exit status {self.returncode}: {cmd}"
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n{label}: {str(data).strip()}"
        return text


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, list(argv), result.stdout, result.stderr)
    return result


def process_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for processes in the bed: p2pvpn and ``tests`` importable, unbuffered."""
    env = dict(os.environ)
    paths: list[str] = []
    spec = importlib.util.find_spec("p2pvpn")
    if spec is not None and spec.origin is not None:
        paths.append(str(Path(spec.origin).resolve().parent.parent))
    elif SRC_DIR.is_dir():
        paths.append(str(SRC_DIR))
    paths.append(str(REPO_ROOT))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, *args]``: the interpreter running the tests."""
    return [sys.executable, *args]


def p2pvpn_argv(*args: str) -> list[str]:
    """``python -m p2pvpn *args`` with the interpreter running the tests."""
    return [sys.executable, "-m", "p2pvpn", *args]


def _tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read log: {exc}>"
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class Process:
    """A long-running process in a namespace, its stdout+stderr going to ``log_path``.

    It runs in a session of its own, so signals reach its children too.
    """

    def __init__(
        self,
        name: str,
        namespace: Namespace,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", namespace.name, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(env),
                cwd=cwd,
                start_new_session=True,
            )

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} in {self.namespace.name} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group) if it is still running."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def _signal_group(self, signum: int) -> None:
        # The process is a session (and group) leader that has not been reaped
        # yet (poll() said so), so its pid cannot have been reused as a pgid.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def terminate(self, grace: float = TERMINATE_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        self._signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            return self.popen.wait(30)

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 80) -> str:
        return _tail(self.log_path, lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex); fail early if the process dies."""
        __tracebackhide__ = True
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def check() -> re.Match[str] | None:
            match = regex.search(self.log_text())
            if match is None and not self.alive():
                raise AssertionError(
                    f"process {self.name} exited with status {self.returncode} before "
                    f"its log matched {regex.pattern!r}; last lines:\n{self.tail(40)}"
                )
            return match

        return wait_until(
            check,
            timeout=timeout,
            message=f"log of {self.name} never matched {regex.pattern!r}",
            logs=lambda: self.tail(40),
        )

    def describe(self, lines: int = 80) -> str:
        status = "running" if self.alive() else f"exit status {self.returncode}"
        head = (
            f"==== {self.name} in {self.namespace.name} (pid {self.pid}, {status})\n"
            f"     $ {shlex.join(self.argv)}\n"
            f"     log: {self.log_path}"
        )
        return f"{head}\n{self.tail(lines)}"


# --------------------------------------------------------------------------
# polling


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 15.0,
    interval: float = 0.1,
    message: str = "condition not met",
    *,
    logs: Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError with ``message`` (plus ``logs()`` when given) after
    ``timeout`` seconds. Exceptions of the types in ``ignore`` count as "not yet".
    """
    __tracebackhide__ = True  # failures point at the test, not here
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            text = f"timed out after {timeout:g} s: {message}"
            if last_error is not None:
                text += f"\nlast error: {last_error!r}"
            if logs is not None:
                text += f"\n{logs()}"
            raise AssertionError(text) from last_error
        time.sleep(interval)


# --------------------------------------------------------------------------
# namespaces


_live_namespaces: dict[str, Namespace] = {}


def _logical(name: str) -> str:
    if not _LOGICAL_NAME_RE.match(name):
        raise ValueError(
            f"namespace name {name!r}: use 1-24 characters a-z, 0-9, '-' or '_' "
            "(starting with a letter or digit)"
        )
    return name


def _ifname(name: str) -> str:
    if not 0 < len(name) <= _IFNAME_MAX or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r} is invalid (1..{_IFNAME_MAX} characters)")
    return name


class Namespace:
    """One network namespace, created by `Namespace.create` (or `TestBed.namespace`)."""

    def __init__(self, name: str, logical: str | None = None) -> None:
        self.name = name
        self.logical = logical or name
        self.processes: list[Process] = []
        self._next_eth = 0
        self._deleted = False

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def create(cls, logical: str, *, ipv6: bool = False) -> Namespace:
        """Create ``p2t-<run>-<n>-<logical>`` with ``lo`` up (and IPv6 off unless asked)."""
        name = f"{RUN_PREFIX}{next(_counter)}-{_logical(logical)}"
        _run(["ip", "netns", "add", name])
        ns = cls(name, logical)
        _live_namespaces[name] = ns
        try:
            ns.ip("link", "set", "lo", "up")
            if not ipv6:
                # Keeps IPv6 link-local chatter (router solicitations, MLD) off
                # veths and TUN devices; /proc/sys/net is per namespace.
                ns.run(
                    [
                        "sysctl",
                        "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1",
                    ]
                )
        except BaseException:
            ns.delete()
            raise
        return ns

    def next_ifname(self) -> str:
        """The next free ``ethN`` name in this namespace."""
        name = f"eth{self._next_eth}"
        self._next_eth += 1
        return name

    # commands

    def exec_argv(self, cmd: Sequence[str] | str) -> list[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (an argv list, or a shell command string) in the namespace."""
        return _run(
            self.exec_argv(cmd), check=check, timeout=timeout, input=input, env=process_env(env)
        )

    def python(
        self, code: str, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (``python -c``) in the namespace with p2pvpn importable."""
        return self.run(python_argv("-c", code, *args), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> args...``"""
        return _run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n <ns> args...`` decoded."""
        out = _run(["ip", "-j", "-n", self.name, *args]).stdout
        return json.loads(out) if out.strip() else []

    def popen(
        self,
        cmd: Sequence[str],
        log_path: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Process:
        """Start a long-running process; it is stopped when the namespace is deleted."""
        process = Process(name or Path(cmd[0]).name, self, cmd, log_path, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    # state

    def exists(self) -> bool:
        return os.path.exists(f"/run/netns/{self.name}")

    def interfaces(self) -> list[str]:
        return [link["ifname"] for link in self.ip_json("link", "show")]

    def link_info(self, ifname: str) -> dict[str, Any] | None:
        """``ip -j -d link show dev ifname`` (None when there is no such interface)."""
        result = _run(
            ["ip", "-j", "-d", "-n", self.name, "link", "show", "dev", ifname], check=False
        )
        if result.returncode != 0:
            return None
        links = json.loads(result.stdout)
        return links[0] if links else None

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

    def pids(self) -> list[int]:
        result = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(pid) for pid in result.stdout.split() if pid.isdigit()]

    # configuration

    def add_address(self, ifname: str, address: IPv4Interface | str) -> IPv4Interface:
        address = IPv4Interface(address)
        self.ip("addr", "add", str(address), "dev", ifname)
        return address

    def set_up(self, ifname: str, mtu: int | None = None) -> None:
        extra = ["mtu", str(mtu)] if mtu else []
        self.ip("link", "set", "dev", ifname, *extra, "up")

    def add_route(
        self, dst: IPv4Network | str, via: IPv4Address | str | None = None, dev: str | None = None
    ) -> None:
        args = ["route", "replace", str(dst)]
        if via is not None:
            args += ["via", str(IPv4Interface(via).ip)]
        if dev is not None:
            args += ["dev", dev]
        self.ip(*args)

    def default_route(self, via: IPv4Address | IPv4Interface | str) -> None:
        self.add_route("default", via=str(IPv4Interface(via).ip))

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def enable_forwarding(self) -> None:
        self.sysctl("net.ipv4.ip_forward", 1)

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into this namespace."""
        require_tool("nft", "nftables")
        self.run(["nft", "-f", "-"], input=ruleset)

    def ping(self, address: IPv4Address | str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``count`` echo requests got replies within ``timeout`` s each."""
        host = str(IPv4Interface(address).ip)
        wait = max(1, round(timeout))
        result = self.run(
            ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), host],
            check=False,
            timeout=count * (wait + 1) + 10,
        )
        return result.returncode == 0

    # teardown

    def stop_processes(self, grace: float = TERMINATE_GRACE) -> None:
        _terminate_all(self.processes, grace)

    def delete(self, grace: float = TERMINATE_GRACE) -> None:
        """Stop its processes, kill anything else left inside, delete it. Idempotent."""
        self.stop_processes(grace)
        if self.exists():
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _run(["ip", "netns", "delete", self.name], check=False)
        if self.exists():
            raise RuntimeError(f"namespace {self.name} could not be deleted")
        self._deleted = True
        _live_namespaces.pop(self.name, None)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


def _terminate_all(processes: Iterable[Process], grace: float) -> None:
    """SIGTERM every running process at once, wait ``grace`` s in all, SIGKILL the rest."""
    running = [p for p in processes if p.alive()]
    for process in running:
        process._signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process._signal_group(signal.SIGKILL)
    for process in running:
        process.popen.wait(30)


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _delete_namespace_by_name(name: str) -> None:
    ns = _live_namespaces.get(name) or Namespace(name)
    ns.delete(grace=1.0)


def cleanup_run(prefix: str = RUN_PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (this run's by default)."""
    leftovers = [name for name in list_namespaces() if name.startswith(prefix)]
    for name in leftovers:
        with contextlib.suppress(Exception):
            _delete_namespace_by_name(name)
    return leftovers


def _pid_running(pid: int) -> bool:
    """False when ``pid`` does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def sweep_stale_namespaces() -> list[str]:
    """Delete ``p2t-`` namespaces left by test runs whose process no longer exists."""
    stale: list[str] = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_running(int(match.group(1), 16)):
            with contextlib.suppress(Exception):
                _delete_namespace_by_name(name)
                stale.append(name)
    return stale


def _atexit_cleanup() -> None:
    if _live_namespaces:
        cleanup_run()


atexit.register(_atexit_cleanup)


# --------------------------------------------------------------------------
# topology


@dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces."""

    a: Namespace
    b: Namespace
    ifname_a: str
    ifname_b: str
    address_a: IPv4Interface | None
    address_b: IPv4Interface | None

    def ifname(self, ns: Namespace) -> str:
        return self.ifname_a if ns is self.a else self.ifname_b

    def address(self, ns: Namespace) -> IPv4Interface:
        address = self.address_a if ns is self.a else self.address_b
        if address is None:
            raise ValueError(f"no address on the {ns.logical} side of this link")
        return address

    def ip(self, ns: Namespace) -> IPv4Address:
        return self.address(ns).ip


@dataclass
class Segment:
    """A switched L2 segment: a bridge ``br0`` in a hub namespace, one veth per member."""

    name: str
    network: IPv4Network
    hub: Namespace
    mtu: int | None = None
    members: dict[str, tuple[Namespace, str, IPv4Interface]] = field(default_factory=dict)
    _ports: int = 0

    def attach(
        self,
        ns: Namespace,
        address: IPv4Interface | IPv4Address | str | None = None,
        ifname: str | None = None,
    ) -> IPv4Interface:
        """Plug ``ns`` into the segment; returns its address (next free host when None)."""
        if ns.name in self.members:
            raise ValueError(f"{ns.logical} is already on segment {self.name}")
        if address is None:
            iface = self._next_free()
        else:
            text = str(address)
            iface = IPv4Interface(text if "/" in text else f"{text}/{self.network.prefixlen}")
            if iface.ip not in self.network:
                raise ValueError(f"{iface} is not in segment {self.name} ({self.network})")
        ifname = _ifname(ifname or ns.next_ifname())
        self._ports += 1
        port = f"p{self._ports}"
        self.hub.ip(*f"link add name {port} type veth peer name {ifname} netns {ns.name}".split())
        self.hub.ip("link", "set", "dev", port, "master", "br0", "up")
        if self.mtu:
            self.hub.ip("link", "set", "dev", port, "mtu", str(self.mtu))
        ns.add_address(ifname, iface)
        ns.set_up(ifname, self.mtu)
        self.members[ns.name] = (ns, ifname, iface)
        return iface

    def _next_free(self) -> IPv4Interface:
        used = {iface.ip for _, _, iface in self.members.values()}
        for host in self.network.hosts():
            if host not in used:
                return IPv4Interface(f"{host}/{self.network.prefixlen}")
        raise ValueError(f"segment {self.name} ({self.network}) is full")

    def address(self, ns: Namespace) -> IPv4Interface:
        return self.members[ns.name][2]

    def ip(self, ns: Namespace) -> IPv4Address:
        return self.address(ns).ip

    def ifname(self, ns: Namespace) -> str:
        return self.members[ns.name][1]


@dataclass(frozen=True)
class NatSite:
    """A host behind a NAT router (see `TestBed.nat_site`)."""

    router: Namespace
    host: Namespace
    wan_ifname: str
    wan_address: IPv4Interface
    lan: Link
    ruleset: str

    @property
    def public_ip(self) -> IPv4Address:
        return self.wan_address.ip

    @property
    def host_ip(self) -> IPv4Address:
        return self.lan.ip(self.host)


NatMode = Literal["port-preserving", "random"]


def nat_ruleset(wan_ifname: str, mode: NatMode = "port-preserving") -> str:
    """The nftables ruleset of `TestBed.nat_router`."""
    if mode == "port-preserving":
        masquerade = "masquerade"
    elif mode == "random":
        masquerade = "masquerade random,fully-random"
    else:
        raise ValueError(f"unknown NAT mode {mode!r}")
    wan = json.dumps(wan_ifname)
    return f"""\
table ip p2t_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname {wan} {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {wan} ct state new drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {wan} ct state new drop
    }}
}}
"""


UDP_ECHO_SERVER = """\
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("udp echo listening on", sock.getsockname(), flush=True)
while True:
    data, peer = sock.recvfrom(65535)
    print("from", peer, flush=True)
    sock.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
"""
"""Python source of a UDP server that answers every datagram with "ip:port" of its sender."""

_UDP_PROBE = """\
import json, socket, sys
server = (sys.argv[1], int(sys.argv[2]))
result = []
for port in json.loads(sys.argv[3]):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.5)
    for _ in range(20):
        sock.sendto(b"probe", server)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        ip, observed = data.decode().rsplit(":", 1)
        result.append([sock.getsockname()[1], ip, int(observed)])
        break
    else:
        sys.exit(f"no answer from {server} to local port {port}")
    sock.close()
print(json.dumps(result))
"""


class TestBed:
    """Namespaces, links, segments, NAT routers and processes of one test; see module doc."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, log_dir: Path | str) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.namespaces: list[Namespace] = []
        self.processes: list[Process] = []
        self.segments: dict[str, Segment] = {}
        self.closed = False

    # building

    def namespace(self, name: str, *, ipv6: bool = False) -> Namespace:
        """Create a namespace; ``name`` is a short logical name ("server", "c1", ...)."""
        ns = Namespace.create(name, ipv6=ipv6)
        self.namespaces.append(ns)
        return ns

    def link(
        self,
        a: Namespace,
        b: Namespace,
        addr_a: IPv4Interface | str | None = None,
        addr_b: IPv4Interface | str | None = None,
        *,
        ifname_a: str | None = None,
        ifname_b: str | None = None,
        mtu: int | None = None,
    ) -> Link:
        """A veth pair between ``a`` and ``b`` (``ethN`` on each side), addressed and up."""
        ifname_a = _ifname(ifname_a or a.next_ifname())
        ifname_b = _ifname(ifname_b or b.next_ifname())
        a.ip(*f"link add name {ifname_a} type veth peer name {ifname_b} netns {b.name}".split())
        link = Link(
            a,
            b,
            ifname_a,
            ifname_b,
            IPv4Interface(addr_a) if addr_a is not None else None,
            IPv4Interface(addr_b) if addr_b is not None else None,
        )
        for ns, ifname, address in ((a, ifname_a, link.address_a), (b, ifname_b, link.address_b)):
            if address is not None:
                ns.add_address(ifname, address)
            ns.set_up(ifname, mtu)
        return link

    def segment(
        self,
        name: str,
        cidr: IPv4Network | str,
        members: Iterable[Namespace] = (),
        *,
        addresses: Sequence[IPv4Interface | IPv4Address | str] | None = None,
        mtu: int | None = None,
    ) -> Segment:
        """A bridge segment on ``cidr``; members get the first hosts (.1, .2, ...) in order,
        or ``addresses`` when given. More members can join with ``segment.attach(ns)``."""
        if name in self.segments:
            raise ValueError(f"segment {name} exists already")
        hub = self.namespace(f"seg-{name}")
        hub.ip("link", "add", "name", "br0", "type", "bridge")
        hub.ip("link", "set", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        hub.set_up("br0")
        segment = Segment(name, IPv4Network(cidr), hub, mtu)
        self.segments[name] = segment
        members = list(members)
        if addresses is not None and len(addresses) != len(members):
            raise ValueError("give one address per member")
        for index, ns in enumerate(members):
            segment.attach(ns, addresses[index] if addresses is not None else None)
        return segment

    def default_route(self, ns: Namespace, via: IPv4Address | IPv4Interface | str) -> None:
        ns.default_route(via)

    def route(
        self, ns: Namespace, dst: IPv4Network | str, via: IPv4Address | IPv4Interface | str
    ) -> None:
        ns.add_route(dst, via=str(IPv4Interface(via).ip))

    def enable_forwarding(self, ns: Namespace) -> None:
        ns.enable_forwarding()

    def nft(self, ns: Namespace, ruleset: str) -> None:
        ns.nft(ruleset)

    def nat_router(
        self, router: Namespace, wan_ifname: str, mode: NatMode = "port-preserving"
    ) -> str:
        """Make ``router`` a NAT box towards ``wan_ifname``; returns the ruleset loaded.

        Both modes masquerade what leaves through the WAN interface and drop
        packets that come in on it without a conntrack entry (unsolicited, to
        the router itself or to the LAN). ``"port-preserving"`` keeps the
        source port when it is free (plain ``masquerade``: an
        endpoint-independent mapping, good for hole punching);
        ``"random"`` uses ``masquerade random,fully-random`` (a new random port
        per connection, like a symmetric NAT).
        """
        ruleset = nat_ruleset(wan_ifname, mode)
        router.enable_forwarding()
        router.nft(ruleset)
        return ruleset

    def nat_site(
        self,
        name: str,
        wan: Segment,
        lan_cidr: IPv4Network | str,
        mode: NatMode = "port-preserving",
        *,
        wan_address: IPv4Interface | IPv4Address | str | None = None,
    ) -> NatSite:
        """A NAT router ``<name>-nat`` on segment ``wan`` with host ``<name>`` behind it.

        The LAN is a veth link on ``lan_cidr``: router .1, host .2; the host's
        default route goes through the router.
        """
        lan_net = IPv4Network(lan_cidr)
        router = self.namespace(f"{name}-nat")
        host = self.namespace(name)
        wan_iface = wan.attach(router, wan_address)
        router_lan = IPv4Interface(f"{lan_net.network_address + 1}/{lan_net.prefixlen}")
        host_lan = IPv4Interface(f"{lan_net.network_address + 2}/{lan_net.prefixlen}")
        lan = self.link(router, host, router_lan, host_lan)
        host.default_route(router_lan)
        ruleset = self.nat_router(router, wan.ifname(router), mode)
        return NatSite(router, host, wan.ifname(router), wan_iface, lan, ruleset)

    # processes

    def start(
        self,
        ns: Namespace,
        argv: Sequence[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Process:
        """Start ``argv`` in ``ns``; stdout+stderr go to ``<log_dir>/<name>.log``."""
        if self.closed:
            raise RuntimeError("test bed is closed")
        taken = {p.name for p in self.processes}
        unique = name
        for n in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{name}-{n}"
        process = ns.popen(argv, self.log_dir / f"{unique}.log", name=unique, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def start_python(self, ns: Namespace, args: Sequence[str], name: str, **kwargs: Any) -> Process:
        """Start ``python args...`` (``["-c", code]`` or ``["-m", module, ...]``)."""
        return self.start(ns, python_argv(*args), name, **kwargs)

    def start_p2pvpn(self, ns: Namespace, args: Sequence[str], name: str, **kwargs: Any) -> Process:
        """Start ``python -m p2pvpn args...``."""
        return self.start(ns, p2pvpn_argv(*args), name, **kwargs)

    def start_udp_echo(self, ns: Namespace, port: int, name: str = "udp-echo") -> Process:
        """Start `UDP_ECHO_SERVER` on ``port`` and wait until it listens."""
        process = self.start_python(ns, ["-c", UDP_ECHO_SERVER, str(port)], name)
        process.wait_for_log("listening")
        return process

    def udp_observed_sources(
        self,
        ns: Namespace,
        server: IPv4Address | str,
        port: int,
        local_ports: Sequence[int] = (0,),
    ) -> list[tuple[int, IPv4Address, int]]:
        """From ``ns``, ask a `start_udp_echo` server which source it sees.

        One socket per entry of ``local_ports`` (0: any port); returns
        ``(local port, observed ip, observed port)`` per socket.
        """
        result = ns.python(_UDP_PROBE, str(server), str(port), json.dumps(list(local_ports)))
        return [(local, IPv4Address(ip), seen) for local, ip, seen in json.loads(result.stdout)]

    # checks

    def ping(
        self, ns: Namespace, address: IPv4Address | str, count: int = 1, timeout: float = 2.0
    ) -> bool:
        return ns.ping(address, count, timeout)

    def logs(self, lines: int = 80) -> str:
        """The last ``lines`` lines of every process log, with a header each."""
        if not self.processes:
            return "(no processes were started)"
        return "\n".join(p.describe(lines) for p in self.processes)

    def wait_until(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 15.0,
        interval: float = 0.1,
        message: str = "condition not met",
        *,
        ignore: tuple[type[BaseException], ...] = (),
    ) -> T:
        """`wait_until` whose failure message includes the last 30 lines of every log."""
        __tracebackhide__ = True
        return wait_until(
            predicate,
            timeout,
            interval,
            message,
            logs=lambda: self.logs(30),
            ignore=ignore,
        )

    # teardown

    def close(self, grace: float = TERMINATE_GRACE) -> None:
        """Stop all processes (SIGTERM, ``grace`` s, SIGKILL) and delete all namespaces.

        Idempotent. Tries everything, then raises RuntimeError if something
        could not be removed.
        """
        self.closed = True
        errors: list[str] = []
        try:
            _terminate_all(self.processes, grace)
        except Exception as exc:  # keep going: namespaces must go anyway
            errors.append(f"stopping processes: {exc!r}")
        for ns in reversed(self.namespaces):
            try:
                ns.delete(grace)
            except Exception as exc:
                errors.append(f"deleting {ns.name}: {exc!r}")
        if errors:
            raise RuntimeError("test bed cleanup failed:\n" + "\n".join(errors))

    def __enter__(self) -> TestBed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def open_testbed(log_dir: Path | str) -> Iterator[TestBed]:
    """What the ``testbed`` fixture does: check requirements, build, always clean up."""
    require_netns()
    bed = TestBed(log_dir)
    try:
        yield bed
    finally:
        bed.close()
