"""Network namespaces, veth pairs, bridges, nftables and processes for `p2pvpn demo`.

A small helper of its own (the test bed in ``tests/netns.py`` is test code):
everything is done with the ``ip`` and ``nft`` commands, every command that
fails raises `CommandError` with the command line and its error output, and
nothing here is created on the host itself: veth pairs are created directly
between two namespaces (``ip link add ... netns A type veth peer ... netns B``).

Processes started with `Namespace.start` run in a session of their own, so a
Ctrl-C on the terminal reaches only the demo, which then stops them in order.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

__all__ = [
    "COMMAND_TIMEOUT",
    "IFNAME_MAX",
    "NETNS_DIR",
    "CommandError",
    "Namespace",
    "Process",
    "delete_namespace",
    "list_namespaces",
    "namespace_pids",
    "run",
    "terminate_all",
]

NETNS_DIR = Path("/run/netns")
IFNAME_MAX = 15
COMMAND_TIMEOUT = 30.0
TERMINATE_GRACE = 5.0


class CommandError(Exception):
    """A command failed or could not be run; ``str()`` is a message for the user."""

    def __init__(self, argv: Sequence[str], detail: str) -> None:
        self.argv = list(argv)
        self.detail = detail
        super().__init__(f"`{' '.join(argv)}` failed: {detail}")


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; raises `CommandError` unless it succeeds (or not ``check``)."""
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, f"no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise CommandError(argv, exc.strerror or str(exc)) from exc
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        detail = output[-1] if output else "no error message"
        raise CommandError(argv, f"exit status {result.returncode}: {detail}")
    return result


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


def delete_namespace(name: str, grace: float = 2.0) -> None:
    """Stop every process in ``name`` (SIGTERM, then SIGKILL after ``grace`` s) and delete it.

    A namespace lives on as long as a process runs in it, so the processes go
    first. Idempotent; raises `CommandError` when the namespace stays.
    """
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


def _ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAME_MAX or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r} is invalid (1..{IFNAME_MAX} characters)")
    return name


class Process:
    """A long-running process in a namespace; its stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signal the process and its children (it leads a session of its own)."""
        # poll() said it has not been reaped, so its pid is still its own group id.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def output(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> list[str]:
        return self.output().splitlines()[-lines:]


def terminate_all(processes: Iterable[Process], grace: float = TERMINATE_GRACE) -> None:
    """SIGTERM every running process at once, SIGKILL what still runs after ``grace`` s."""
    running = [process for process in processes if process.alive()]
    for process in running:
        process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.signal_group(signal.SIGKILL)
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(10)


class Namespace:
    """One named network namespace, driven with ``ip -n NAME`` and ``ip netns exec NAME``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    def __str__(self) -> str:
        return self.name

    def create(self) -> None:
        """``ip netns add``, loopback up, IPv6 off (keeps router solicitations off the links)."""
        run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        self.write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")
        self.write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def delete(self, grace: float = 2.0) -> None:
        delete_namespace(self.name, grace)

    # commands

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace."""
        return run(self.exec_argv(argv), input=input, timeout=timeout, check=check, env=env)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME args...``"""
        return run(["ip", "-n", self.name, *args])

    def write_sysctl(self, path: str, value: str) -> None:
        """Write ``value`` to ``/proc/sys/<path>`` as seen from inside the namespace.

        Through ``sh`` rather than the ``sysctl`` tool, which minimal systems lack.
        """
        self.run(["sh", "-c", 'echo "$1" > "/proc/sys/$2"', "sh", value, path])

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``)."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start a long-running ``argv`` in the namespace, in a session of its own."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            try:
                popen = subprocess.Popen(
                    self.exec_argv(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
            except OSError as exc:
                raise CommandError(self.exec_argv(argv), exc.strerror or str(exc)) from exc
        return Process(name, popen, log_path)

    # configuration

    def add_address(self, ifname: str, address: IPv4Interface) -> None:
        self.ip("addr", "add", str(address), "dev", ifname)

    def set_up(self, ifname: str) -> None:
        self.ip("link", "set", "dev", ifname, "up")

    def add_route(self, destination: IPv4Network | str, via: IPv4Address) -> None:
        self.ip("route", "replace", str(destination), "via", str(via))

    def add_bridge(self, ifname: str) -> None:
        """A bridge with STP and multicast snooping off: a plain switch."""
        self.ip("link", "add", "name", _ifname(ifname), "type", "bridge")
        self.ip("link", "set", ifname, "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        self.set_up(ifname)

    def add_veth(
        self, ifname: str, peer: "Namespace", peer_ifname: str, *, master: str | None = None
    ) -> None:
        """A veth pair: ``ifname`` here (plugged into bridge ``master``), ``peer_ifname`` in peer.

        Both ends are set up; addresses are the caller's business.
        """
        self.ip(
            "link", "add", "name", _ifname(ifname), "type", "veth",
            "peer", "name", _ifname(peer_ifname), "netns", peer.name,
        )  # fmt: skip
        if master is not None:
            self.ip("link", "set", "dev", ifname, "master", master)
        self.set_up(ifname)
        peer.set_up(peer_ifname)

    def enable_forwarding(self) -> None:
        self.write_sysctl("net/ipv4/ip_forward", "1")

    # state

    def listening(self, protocol: str, port: int) -> bool:
        """Whether a socket listens on ``port`` (``protocol`` "tcp" or "udp") in the namespace."""
        flag = "-ltnH" if protocol == "tcp" else "-lunH"
        result = self.run(["ss", flag, f"sport = :{port}"], check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    def pids(self) -> list[int]:
        return namespace_pids(self.name)
