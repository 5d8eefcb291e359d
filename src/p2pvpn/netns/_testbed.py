"""A test bed: namespaces named for this run, links, segments, NAT sites and processes.

Namespace names are ``p2t-<pid hex>-<n>-<name>``: unique per run,
recognisable at cleanup, and independent of interface names (which stay
short, ``eth0``, ``eth1``, ... per namespace). `TestBed.close` (or leaving its
``with`` block) stops every process (SIGTERM, grace, SIGKILL) and deletes
every namespace, also after a failure; what a crashed run left behind is
removed by `sweep_stale_namespaces`, and at interpreter exit by `cleanup_run`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from p2pvpn.netns._internet import INTERNET_NETWORK, InternetHost, link_internet_host
from p2pvpn.netns._links import Segment, make_link
from p2pvpn.netns._namespace import Namespace, delete_namespace, list_namespaces
from p2pvpn.netns._nat import NatMode, NatSite, nat_site
from p2pvpn.netns._process import (
    TERMINATE_GRACE,
    Process,
    p2pvpn_argv,
    python_argv,
    terminate_all,
)
from p2pvpn.netns._wait import wait_until

__all__ = [
    "PREFIX",
    "RUN_PREFIX",
    "TestBed",
    "cleanup_run",
    "run_namespace",
    "sweep_stale_namespaces",
]

T = TypeVar("T")

PREFIX = "p2t-"
RUN_PREFIX = f"{PREFIX}{os.getpid():x}-"
"""Prefix of every namespace this process creates."""
_NAME_RE = re.compile(r"^p2t-([0-9a-f]+)-")
_LOGICAL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")

_counter = itertools.count(1)
_live_namespaces: dict[str, Namespace] = {}


def run_namespace(logical: str, *, ipv6: bool = False) -> Namespace:
    """Create ``p2t-<run>-<n>-<logical>``; `cleanup_run` deletes it at exit at the latest."""
    if not _LOGICAL_NAME_RE.match(logical):
        raise ValueError(
            f"namespace name {logical!r}: use 1-24 characters a-z, 0-9, '-' or '_' "
            "(starting with a letter or digit)"
        )
    name = f"{RUN_PREFIX}{next(_counter)}-{logical}"
    _live_namespaces[name] = Namespace(name, logical)  # before it exists: no gap at exit
    try:
        namespace = Namespace.create(name, logical=logical, ipv6=ipv6)
    except BaseException:
        _live_namespaces.pop(name, None)
        raise
    _live_namespaces[name] = namespace
    return namespace


def _delete(name: str) -> None:
    namespace = _live_namespaces.pop(name, None)
    if namespace is not None:
        namespace.delete(grace=1.0)
    else:
        delete_namespace(name, grace=1.0)


def cleanup_run(prefix: str = RUN_PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (this run's by default)."""
    leftovers = list_namespaces(prefix)
    for name in leftovers:
        with contextlib.suppress(Exception):
            _delete(name)
    return leftovers


def _pid_running(pid: int) -> bool:
    """False when ``pid`` does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def sweep_stale_namespaces() -> list[str]:
    """Delete ``p2t-`` namespaces left by runs whose process no longer exists."""
    stale: list[str] = []
    for name in list_namespaces(PREFIX):
        match = _NAME_RE.match(name)
        if match and not _pid_running(int(match.group(1), 16)):
            with contextlib.suppress(Exception):
                _delete(name)
                stale.append(name)
    return stale


def _atexit_cleanup() -> None:
    if any(namespace.exists() for namespace in _live_namespaces.values()):
        cleanup_run()


atexit.register(_atexit_cleanup)


class TestBed:
    """Namespaces, links, segments, NAT sites and processes of one test or benchmark run."""

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
        ns = run_namespace(name, ipv6=ipv6)
        self.namespaces.append(ns)
        return ns

    link = staticmethod(make_link)
    """A veth pair between two namespaces (`make_link`)."""

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
        members = list(members)
        if addresses is not None and len(addresses) != len(members):
            raise ValueError("give one address per member")
        segment = Segment.create(name, cidr, self.namespace(f"seg-{name}"), mtu)
        self.segments[name] = segment
        for index, ns in enumerate(members):
            segment.attach(ns, addresses[index] if addresses is not None else None)
        return segment

    def route(
        self, ns: Namespace, dst: IPv4Network | str, via: IPv4Address | IPv4Interface | str
    ) -> None:
        ns.add_route(dst, via=via)

    def nat_site(
        self,
        name: str,
        wan: Segment,
        lan_cidr: IPv4Network | str,
        mode: NatMode = "port-preserving",
        *,
        wan_address: IPv4Interface | IPv4Address | str | None = None,
    ) -> NatSite:
        """A NAT router ``<name>-nat`` on segment ``wan`` with host ``<name>`` behind it
        (see `p2pvpn.netns.nat_site`)."""
        router = self.namespace(f"{name}-nat")
        host = self.namespace(name)
        wan_iface = wan.attach(router, wan_address)
        return nat_site(router, host, wan.ifname(router), wan_iface, lan_cidr, mode=mode)

    def internet_host(
        self,
        gateway: Namespace,
        network: IPv4Network | str = INTERNET_NETWORK,
        *,
        name: str = "inet",
    ) -> InternetHost:
        """A namespace ``name`` linked only to ``gateway``, which routes everything it has no
        other route for to it (see `p2pvpn.netns.link_internet_host`)."""
        return link_internet_host(self.namespace(name), gateway, network)

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
        process = ns.start(argv, self.log_dir / f"{unique}.log", name=unique, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def start_python(self, ns: Namespace, args: Sequence[str], name: str, **kwargs: Any) -> Process:
        """Start ``python args...`` (``["-c", code]`` or ``["-m", module, ...]``)."""
        return self.start(ns, python_argv(*args), name, **kwargs)

    def start_p2pvpn(self, ns: Namespace, args: Sequence[str], name: str, **kwargs: Any) -> Process:
        """Start ``python -m p2pvpn args...``."""
        return self.start(ns, p2pvpn_argv(*args), name, **kwargs)

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
            predicate, timeout, interval, message, logs=lambda: self.logs(30), ignore=ignore
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
            terminate_all(self.processes, grace)
        except Exception as exc:  # keep going: namespaces must go anyway
            errors.append(f"stopping processes: {exc!r}")
        for ns in reversed(self.namespaces):
            try:
                ns.delete(grace)
                _live_namespaces.pop(ns.name, None)
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
