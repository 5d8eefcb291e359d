"""One demo run: network, server, clients, pings, direct connections, a name lookup, a ping
through the exit node, throughput, summary.

Everything it creates is recorded first (`p2pvpn.demo.state`) and removed at
the end, also on an error, Ctrl-C, SIGTERM or SIGHUP; with ``--keep`` it stays
until ``p2pvpn demo --cleanup``. Waits poll their condition with a deadline;
while they poll, the clients' peer states are polled too and every change is
printed.
"""

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType

from p2pvpn._format import format_ms, format_rate, format_seconds
from p2pvpn.demo.lookup import NameLookup, lookup
from p2pvpn.demo.measure import PingResult, ThroughputMeter, ping, ping_many
from p2pvpn.demo.monitor import StateChange, StateTracker, StatusPoller, peer_views
from p2pvpn.demo.network import DemoNetwork
from p2pvpn.demo.output import Console, DemoError, Step
from p2pvpn.demo.state import (
    WORKDIR_PREFIX,
    DemoLock,
    DemoRecord,
    StateFile,
    find_leftovers,
    remove_leftovers,
    remove_namespaces,
)
from p2pvpn.demo.summary import ExitPing, PairResult, PathResult, Results, summary_lines
from p2pvpn.demo.topology import (
    CLIENTS,
    DOMAIN,
    EXIT_NODE,
    EXIT_USER,
    INTERNET,
    INTERNET_HUB,
    NAMESPACE_PREFIX,
    ROUTERS,
    SERVER,
    STUN_PORT,
    VPN_NETWORK,
    WEB,
    WS_PORT,
    ClientSite,
    namespace_name,
    pairs,
)
from p2pvpn.netns import (
    CommandError,
    InternetHost,
    Namespace,
    Process,
    p2pvpn_argv,
    terminate_all,
    wait_for,
)
from p2pvpn.server.tls import make_self_signed_certificate, write_certificate

__all__ = ["Demo", "DemoOptions", "Interrupted", "Timeouts"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_NAMES = tuple(client.name for client in CLIENTS)
# The pair whose throughput is measured: across both NATs.
MEASURED_PAIR = ("alice", "bob")
# Who asks (its own DNS, on its VPN address) for whose name.
NAME_LOOKUP = ("alice", "bob")
LOG_TAIL = 12


@dataclass(frozen=True)
class DemoOptions:
    keep: bool = False
    cleanup: bool = False
    duration: int | None = None  # throughput seconds; None: 3 (1 with quick)
    quick: bool = False
    dataplane: str | None = None
    no_color: bool = False
    debug: bool = False

    @property
    def throughput_seconds(self) -> int:
        if self.duration is not None:
            return self.duration
        return 1 if self.quick else 3


@dataclass(frozen=True)
class Timeouts:
    """Generous deadlines (a noisy 2-core VM is the reference); nothing is a fixed sleep."""

    server: float = 30.0
    login: float = 45.0
    first_ping: float = 30.0
    connect: float = 30.0
    leave_connected: float = 30.0
    name_lookup: float = 30.0
    exit_active: float = 30.0
    pings: int = 5

    @classmethod
    def for_options(cls, options: DemoOptions) -> "Timeouts":
        return cls(pings=3) if options.quick else cls()


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop and clean up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _plural(count: int, noun: str) -> str:
    suffix = "" if count == 1 else ("es" if noun.endswith("s") else "s")
    return f"{count} {noun}{suffix}"


def p2pvpn_command() -> str:
    """How the user runs p2pvpn here (for the instructions printed with ``--keep``)."""
    return "p2pvpn" if shutil.which("p2pvpn") else f"{sys.executable} -m p2pvpn"


class Demo:
    """One run; `run` returns the exit code. Not reusable."""

    def __init__(
        self,
        options: DemoOptions,
        console: Console,
        *,
        state_file: StateFile | None = None,
        lock: DemoLock | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.options = options
        self.console = console
        self.state_file = state_file or StateFile()
        self.lock = lock or DemoLock()
        self.timeouts = timeouts or Timeouts.for_options(options)
        self.record = DemoRecord(pid=os.getpid())
        self.network = DemoNetwork(self._creating)
        self.password = secrets.token_hex(16)  # never starts with "-" (argparse)
        self.workdir: Path | None = None
        self.tls_files: tuple[Path, Path] | None = None  # the run's certificate and key
        self.web: InternetHost | None = None  # the host behind the exit node
        self.watched: dict[str, Process] = {}  # server and clients: they must not exit
        self.processes: list[Process] = []  # everything started, for the teardown
        self.clients = {client.name: client for client in CLIENTS}
        self.tracker = StateTracker({str(client.vpn.ip): client.name for client in CLIENTS})
        self.poller: StatusPoller | None = None
        self.clients_started = 0.0
        self.results = Results(measured_pair=MEASURED_PAIR, connect_timeout=self.timeouts.connect)
        self._reported: BaseException | None = None

    # -- the run --------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        self.console.heading(
            "p2pvpn demo: a VPN server, two NAT routers, three clients (one an exit node "
            f"with a web host behind it) in network namespaces ({NAMESPACE_PREFIX}*)"
        )
        if not self.lock.acquire():
            pid = self.lock.holder()
            self.console.fail(
                f"another p2pvpn demo is running (pid {pid or '?'}): stop it first "
                "(Ctrl-C in its terminal)"
            )
            return 1
        try:
            return self._run_locked(started)
        except Interrupted as exc:  # arrived while an error was being reported
            return 128 + exc.signum
        finally:
            self.lock.release()

    def _run_locked(self, started: float) -> int:
        code = 1
        kept = False
        previous = self._handle_signals(self._raise_interrupted)
        try:
            code = self._run_phases(started)
            if self.options.keep:
                self._keep()
                kept = True
        except Interrupted as exc:
            self.console.line(f"interrupted ({exc}): removing the demo")
            code = 128 + exc.signum
        except (DemoError, CommandError) as exc:
            self._report(exc)
            code = 1
        except Exception as exc:  # a bug: still clean up, and say what happened
            self.console.fail(f"internal error: {exc!r}")
            if self.options.debug:
                self.console.line(traceback.format_exc().rstrip())
            else:
                self.console.detail("run with --debug for the traceback")
            code = 1
        finally:
            self._defer_signals()
            try:
                if not kept and not self._teardown():
                    code = code or 1
            finally:
                self._restore_signals(previous)
        return code

    def _run_phases(self, started: float) -> int:
        self._prepare()
        self._timed("network", self._build_network)
        self._timed("server", self._start_server)
        self._timed("clients", self._start_clients)
        self._ping_across()
        self._wait_connected()
        self._ping_paths()
        self._look_up_name()
        self._ping_through_exit()
        self._measure_throughput()
        self.results.total = time.monotonic() - started
        self.console.line()
        self.console.heading("Summary")
        for line in summary_lines(self.results):
            self.console.line(line)
        self.console.line()
        return 0 if self.results.ok else 1

    def _timed(self, phase: str, body: Callable[[], None]) -> None:
        started = time.monotonic()
        body()
        self.results.setup[phase] = time.monotonic() - started

    def _report(self, exc: BaseException) -> None:
        if exc is self._reported:
            return
        self.console.fail(str(exc))
        for line in getattr(exc, "details", []):
            self.console.detail(line)

    @contextlib.contextmanager
    def _step(self, doing: str) -> Iterator[Step]:
        with self.console.step(doing) as step:
            try:
                yield step
            except Exception as exc:
                self._reported = exc  # the step prints it
                raise

    # -- signals ------------------------------------------------------------------

    def _raise_interrupted(self, signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        self.console.line(f"{signal.Signals(signum).name}: still cleaning up, one moment")

    def _handle_signals(
        self, handler: Callable[[int, FrameType | None], None]
    ) -> dict[int, object]:
        previous: dict[int, object] = {}
        for signum in _SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave them alone
                previous[signum] = signal.signal(signum, handler)
        return previous

    def _defer_signals(self) -> None:
        # A signal between the end of the body and this call raises once more: retry.
        while True:
            try:
                self._handle_signals(self._note_signal)
                return
            except Interrupted:
                continue

    def _restore_signals(self, previous: dict[int, object]) -> None:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)  # type: ignore[arg-type]

    # -- bookkeeping --------------------------------------------------------------

    def _creating(self, namespace: str) -> None:
        self.record.namespaces.append(namespace)
        self.state_file.save(self.record)

    def _start(self, ns: Namespace, name: str, argv: list[str], *, watch: bool) -> Process:
        assert self.workdir is not None
        process = ns.start(argv, self.workdir / "logs" / f"{name}.log", name=name)
        self.processes.append(process)
        if watch:
            self.watched[name] = process
        return process

    def _log_tail(self, process: Process) -> list[str]:
        lines = process.tail(LOG_TAIL)
        if not lines:
            return [f"({process.name} printed nothing)"]
        return [f"last lines of {process.name}'s log:", *(f"  {line}" for line in lines)]

    def _check_processes(self) -> None:
        for process in self.watched.values():
            if not process.alive():
                raise DemoError(
                    f"{process.name} exited with status {process.returncode}",
                    self._log_tail(process),
                )

    def tick(self) -> None:
        """Run between the tries of every wait: print peer state changes, check processes."""
        if self.poller is not None:
            self.poller.poll()
        self._check_processes()

    def _on_change(self, change: StateChange) -> None:
        since = change.at - self.clients_started
        self.console.dim(f"{change.describe()}   (+{since:.1f} s)")

    # -- phases -------------------------------------------------------------------

    def _prepare(self) -> None:
        leftovers = find_leftovers(self.state_file)
        if leftovers:
            with self._step("removing a demo left over from an earlier run") as step:
                problems = remove_leftovers(leftovers, self.state_file)
                if problems:
                    raise DemoError("it could not be removed completely", problems)
                step.done(f"removed a demo left over from an earlier run ({leftovers.describe()})")
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        self.record.workdir = str(self.workdir)
        self.state_file.save(self.record)
        password_file = self.workdir / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(self.password + "\n", encoding="utf-8")
        # The recommended set-up: wss://, clients verifying the server against a CA they
        # were given. Made for this run; it goes with the work directory.
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(mode=0o700)
        certificate = make_self_signed_certificate(
            [str(SERVER.address.ip)], common_name="p2pvpn demo server"
        )
        self.tls_files = write_certificate(certificate, tls_dir)

    def _build_network(self) -> None:
        with self._step("building the internet segment") as step:
            self.network.build_internet()
            routers = ", ".join(f"{router.name} {router.wan.ip}" for router in ROUTERS)
            step.done(
                f"internet {INTERNET} (a bridge in {namespace_name(INTERNET_HUB)}): "
                f"server {SERVER.address.ip}, NAT routers {routers}"
            )
        for router in ROUTERS:
            with self._step(f"building {router.name} and its LAN") as step:
                clients = self.network.build_site(router)
                hosts = ", ".join(f"{client.name} {client.lan.ip}" for client in clients)
                step.done(
                    f"{router.name}: NAT {router.wan.ip} (masquerade, port-preserving) "
                    f"for LAN {router.lan.network}: {hosts}"
                )
        exit_node = self.clients[EXIT_NODE]
        with self._step(f"building {WEB}, reachable only through {exit_node.name}") as step:
            self.web = self.network.build_web(exit_node)
            step.done(
                f"{WEB} {self.web.address}: linked to {exit_node.name} alone, her default "
                f"route; {exit_node.name} offers herself as an exit node, {EXIT_USER} uses her"
            )

    def _p2pvpn_argv(self, *args: str) -> list[str]:
        debug = ["-d"] if self.options.debug else []
        return p2pvpn_argv(*args, *debug)

    def _start_server(self) -> None:
        ns = self.network[SERVER.name]
        assert self.tls_files is not None
        cert_file, key_file = self.tls_files
        assert self.workdir is not None
        with self._step("starting the server") as step:
            # The password from the demo's file: never on a command line (ps).
            argv = self._p2pvpn_argv(
                "server", "-w", f"wss://0.0.0.0:{WS_PORT}/",
                "--password-file", str(self.workdir / "password"),
                "--stun-port", str(STUN_PORT), "--dhcp", str(VPN_NETWORK),
                "--tls-cert", str(cert_file), "--tls-key", str(key_file),
            )  # fmt: skip
            server = self._start(ns, "server", argv, watch=True)

            def listening() -> bool:
                return ns.listening("tcp", WS_PORT) and ns.listening("udp", STUN_PORT)

            if not wait_for(listening, self.timeouts.server, tick=self._check_processes):
                raise DemoError(
                    f"the server did not listen on port {WS_PORT} within "
                    f"{self.timeouts.server:g} s",
                    self._log_tail(server),
                )
            ip = SERVER.address.ip
            step.done(
                f"server listening on {ip}:{WS_PORT} (wss://, TLS with a certificate made for "
                f"this run), STUN on {ip}:{STUN_PORT}/udp"
            )

    def _client_config(self, client: ClientSite) -> Path:
        """The client's TOML file: its name, and its part as an exit node or its user."""
        assert self.workdir is not None
        values: dict[str, str | bool] = {"hostname": client.name}
        if client.exit_node:
            values["exit_node"] = True
        if client.exit:
            values["exit"] = client.exit
        path = self.workdir / "config" / f"{client.name}.toml"
        path.parent.mkdir(exist_ok=True)
        lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def _client_argv(self, client: ClientSite) -> list[str]:
        assert self.workdir is not None and self.tls_files is not None
        argv = [
            "run", "-c", str(self._client_config(client)),
            "-w", SERVER.ws_url, "--password-file", str(self.workdir / "password"),
            "-n", client.name,
            "--state-dir", str(self.workdir / "state" / client.name),
            "-t", str(client.vpn), "-s", SERVER.stun_url,
            "--tls-ca", str(self.tls_files[0]),
        ]  # fmt: skip
        if self.options.dataplane:
            argv += ["--dataplane", self.options.dataplane]
        return self._p2pvpn_argv(*argv)

    def _start_clients(self) -> None:
        assert self.workdir is not None
        state_root = self.workdir / "state"
        self.clients_started = time.monotonic()
        for client in CLIENTS:
            self._start(
                self.network[client.name], client.name, self._client_argv(client), watch=True
            )
        self.poller = StatusPoller(
            {client.name: state_root / client.name for client in CLIENTS},
            self.tracker,
            self._on_change,
        )
        for client in CLIENTS:
            with self._step(f"starting {client.name}") as step:
                snapshot = wait_for(
                    lambda client=client: self._logged_in(client),  # type: ignore[misc]
                    self.timeouts.login,
                    tick=self.tick,
                )
                if snapshot is None:
                    details = self._log_tail(self.watched[client.name])
                    raise DemoError(
                        f"{client.name} did not log in within {self.timeouts.login:g} s", details
                    )
                step.done(
                    f"{client.name}: {client.vpn} on {client.interface}, logged in over wss:// "
                    f"(dataplane {snapshot.get('dataplane') or '?'})"
                )

    def _logged_in(self, client: ClientSite) -> dict[str, object] | None:
        assert self.poller is not None
        snapshot = self.poller.snapshot(client.name)
        if snapshot is None:
            return None
        server = snapshot.get("server")
        address = str(snapshot.get("address") or "").split("/")[0]
        connected = isinstance(server, dict) and server.get("state") == "connected"
        return dict(snapshot) if connected and address == str(client.vpn.ip) else None

    def _ip(self, name: str) -> IPv4Address:
        return self.clients[name].vpn.ip

    def _ping_across(self) -> None:
        for source, destination in pairs(_NAMES):
            address = self._ip(destination)
            with self._step(f"ping {source} -> {destination} ({address})") as step:
                ns = self.network[source]

                def reply(ns: Namespace = ns, address: IPv4Address = address) -> PingResult | None:
                    result = ping(ns, address, 1, wait=1)
                    return result if result.ok else None

                result = wait_for(reply, self.timeouts.first_ping, tick=self.tick, interval=0.2)
                if result is None or result.avg_ms is None:
                    raise DemoError(
                        f"no reply from {destination} ({address}) within "
                        f"{self.timeouts.first_ping:g} s"
                    )
                rtt = format_ms(result.avg_ms)
                step.done(f"ping {source} -> {destination} ({address}): reply in {rtt}")

    def _wait_connected(self) -> None:
        timeout = self.timeouts.connect
        all_pairs = list(pairs(_NAMES))
        with self._step("waiting for direct connections") as step:

            def all_connected() -> bool:
                return all(self.tracker.connected(a, b) for a, b in all_pairs)

            done = wait_for(all_connected, timeout, tick=self.tick, interval=0.2)
            for source, destination in all_pairs:
                view = self.tracker.view(source, destination)
                first = self.tracker.first_connected(source, destination)
                self.results.pairs.append(
                    PairResult(
                        source,
                        destination,
                        state=view.state if view else None,
                        path=view.path if view else None,
                        rtt_ms=view.rtt_ms if view else None,
                        connected_after=first - self.clients_started if first else None,
                    )
                )
                step.detail(f"{source} -> {destination}: {self.tracker.chain(source, destination)}")
            if done:
                after = max(pair.connected_after or 0.0 for pair in self.results.pairs)
                self.results.all_connected_after = after
                step.done(
                    f"all {len(all_pairs)} peer pairs CONNECTED, "
                    f"{format_seconds(after)} after the clients started"
                )
            else:
                count = sum(pair.connected for pair in self.results.pairs)
                step.warn(
                    f"only {count} of {len(all_pairs)} peer pairs CONNECTED within {timeout:g} s "
                    "(the others stay on the relay); going on"
                )

    def _ping_paths(self) -> None:
        count = self.timeouts.pings
        with self._step("pinging over the peers' paths") as step:
            jobs = [(self.network[p.source], self._ip(p.destination)) for p in self.results.pairs]
            results = ping_many(jobs, count)
            self.tick()
            for pair, result in zip(self.results.pairs, results, strict=True):
                pair.ping = result
            averages = [r.avg_ms for r in results if r.avg_ms is not None]
            lost = [p.label for p, r in zip(self.results.pairs, results, strict=True) if not r.ok]
            text = f"{len(jobs)} pairs, {count} pings each"
            if averages:
                text += f": average {format_ms(min(averages))} .. {format_ms(max(averages))}"
            if lost:
                self.results.problems.append(f"no ping replies: {', '.join(lost)}")
                step.warn(f"{text}; no replies for {', '.join(lost)}")
            else:
                step.done(text)

    # -- names and the exit node -----------------------------------------------------

    def _look_up_name(self) -> None:
        asker, target = NAME_LOOKUP
        name, server = f"{target}.{DOMAIN}", self._ip(asker)
        doing = f"looking up {name} at {asker}'s DNS ({server}:53)"
        with self._step(doing) as step:
            answers: list[NameLookup] = []

            def answered() -> NameLookup | None:
                answer = lookup(self.network[asker], asker, server, name, self._ip(target))
                answers.append(answer)
                return answer if answer.ok else None

            found = wait_for(answered, self.timeouts.name_lookup, tick=self.tick, interval=0.5)
            result = found or answers[-1]
            self.results.name_lookup = result
            if found is not None:
                step.done(f"{asker} looked up {found.describe()} (dnspython, {server}:53)")
                return
            wanted = self.timeouts.name_lookup
            self.results.problems.append(
                f"{asker}'s DNS did not answer {name} with {result.expected} within "
                f"{wanted:g} s (last: {result.describe()})"
            )
            step.warn(f"{doing}: {result.describe()} after {wanted:g} s")

    def _exit_state(self, client: str) -> str | None:
        assert self.poller is not None
        snapshot = self.poller.snapshot(client)
        exit_status = snapshot.get("exit") if snapshot is not None else None
        return str(exit_status.get("state")) if isinstance(exit_status, dict) else None

    def _ping_through_exit(self) -> None:
        assert self.web is not None
        source, exit_node = EXIT_USER, self.clients[EXIT_NODE]
        result = ExitPing(source, exit_node.name, exit_node.vpn.ip, self.web.address)
        self.results.exit_ping = result
        doing = f"ping {source} -> {WEB} {result.target} through the exit node {exit_node.name}"
        with self._step(doing) as step:
            active = wait_for(
                lambda: self._exit_state(source) == "active",
                self.timeouts.exit_active,
                tick=self.tick,
                interval=0.2,
            )
            result.state = self._exit_state(source)
            if not active:
                result.note = f"{source}'s exit state stayed {result.state or 'unknown'}"
                self.results.problems.append(
                    f"{source} did not use the exit node {exit_node.name} within "
                    f"{self.timeouts.exit_active:g} s ({result.note})"
                )
                step.warn(f"{doing}: {result.note}")
                return
            ns = self.network[source]
            wait_for(
                lambda: ping(ns, result.target, 1, wait=1).ok,
                self.timeouts.first_ping,
                tick=self.tick,
                interval=0.2,
            )
            result.ping = ping(ns, result.target, self.timeouts.pings)
            if not result.ok:
                result.note = "no reply"
                self.results.problems.append(f"{doing}: no reply")
                step.warn(f"{doing}: no reply")
                return
            avg = format_ms(result.ping.avg_ms) if result.ping.avg_ms is not None else "?"
            step.done(f"{doing}: average {avg} ({source}'s exit state {result.state})")

    # -- throughput -----------------------------------------------------------------

    def _relay_bytes_out(self, source: str, destination: str) -> int | None:
        assert self.poller is not None
        snapshot = self.poller.snapshot(source)
        if snapshot is None:
            return None
        view = peer_views(snapshot, {str(self._ip(destination)): destination}).get(destination)
        return view.relay_bytes_out if view else None

    def _throughput(self, path: PathResult, meter: ThroughputMeter) -> None:
        source, destination = MEASURED_PAIR
        duration = self.options.throughput_seconds
        doing = f"throughput {source} -> {destination} over the {path.kind} path"
        try:
            with self._step(doing) as step:
                before = self._relay_bytes_out(source, destination)
                path.throughput = meter.measure(
                    self.network[destination],
                    self.network[source],
                    self._ip(destination),
                    duration,
                    label=path.kind,
                    tick=self.tick,
                )
                after = self._relay_bytes_out(source, destination)
                if before is not None and after is not None:
                    path.relay_bytes = after - before
                rate = format_rate(path.throughput.bits_per_second)
                self._check_direct(path)
                via = (
                    f", {path.relay_bytes / 1e6:.1f} MB of it through the server"
                    if path.relay_bytes is not None
                    else ""
                )
                step.done(f"{doing}: {rate} ({meter.tool}, {duration} s{via})")
        except DemoError as exc:
            path.note = f"failed: {exc}"
            self.results.problems.append(f"{doing}: {exc}")

    def _check_direct(self, path: PathResult) -> None:
        """A "direct" number is only honest when (almost) nothing went through the server."""
        if path.kind != "direct" or path.throughput is None or path.relay_bytes is None:
            return
        sent = path.throughput.bits_per_second * path.throughput.seconds / 8
        if path.relay_bytes > 0.1 * sent:
            source, destination = MEASURED_PAIR
            self.results.problems.append(
                f"{path.relay_bytes / 1e6:.1f} MB of the direct run {source} -> {destination} "
                "went through the server"
            )

    def _measure_throughput(self) -> None:
        source, destination = MEASURED_PAIR
        iperf3 = shutil.which("iperf3") is not None
        assert self.workdir is not None
        meter = ThroughputMeter(
            iperf3=iperf3,
            log_dir=self.workdir / "logs",
            on_start=self.processes.append,
        )
        if not iperf3:
            self.console.dim(
                "iperf3 is not installed (apt-get install iperf3): "
                "measuring with the built-in traffic tool (p2pvpn.bench.traffic) instead"
            )
        direct = PathResult("direct")
        self.results.paths.append(direct)
        connected = self.tracker.connected(source, destination) and self.tracker.connected(
            destination, source
        )
        if connected:
            direct.ping = self._pair(source, destination).ping
            self._throughput(direct, meter)
        else:
            direct.note = f"skipped: {source} <-> {destination} not CONNECTED"
            self.console.warn(f"throughput over the direct path skipped: {direct.note[9:]}")
        relay = PathResult("relay")
        self.results.paths.append(relay)
        if self._force_relay(relay):
            with self._step(f"ping {source} -> {destination} through the server") as step:
                relay.ping = ping(self.network[source], self._ip(destination), self.timeouts.pings)
                avg = relay.ping.avg_ms
                step.done(
                    f"ping {source} -> {destination} through the server: "
                    + (f"average {format_ms(avg)}" if avg is not None else "no reply")
                )
            self._throughput(relay, meter)

    def _pair(self, source: str, destination: str) -> PairResult:
        for pair in self.results.pairs:
            if (pair.source, pair.destination) == (source, destination):
                return pair
        raise KeyError((source, destination))

    def _force_relay(self, relay: PathResult) -> bool:
        source, destination = MEASURED_PAIR
        near = self.clients[source].router
        far = self.clients[destination].router
        routers = {router.name: router for router in ROUTERS}
        for line in (
            f"for the relay path, {near} now drops UDP to and from {far} ({routers[far].wan.ip})",
            "(an nftables rule); the server stays reachable, so "
            f"{source} and {destination} lose their",
            "direct path and fall back to the relay through the server's WebSocket",
        ):
            self.console.dim(line)
        with self._step(f"blocking UDP between {near} and {far}") as step:
            self.network.block_udp(routers[near], routers[far])

            def left() -> bool:
                return not self.tracker.connected(
                    source, destination
                ) and not self.tracker.connected(destination, source)

            if not wait_for(left, self.timeouts.leave_connected, tick=self.tick, interval=0.2):
                relay.note = "skipped: the peers stayed CONNECTED"
                self.results.problems.append(
                    f"{source} <-> {destination} stayed CONNECTED with UDP blocked "
                    f"for {self.timeouts.leave_connected:g} s"
                )
                step.warn(f"{source} <-> {destination} stayed CONNECTED: relay path not measured")
                return False
            states = (
                f"{self.tracker.state(source, destination)}/"
                f"{self.tracker.state(destination, source)}"
            )
            step.done(
                f"blocked UDP between {near} and {far}: {source} <-> {destination} "
                f"not CONNECTED ({states}), their traffic goes through the server"
            )
        return True

    # -- the end --------------------------------------------------------------------

    def _keep(self) -> None:
        source, destination = MEASURED_PAIR
        near = self.clients[source].router
        routers = {router.name: router for router in ROUTERS}
        with self._step(f"removing the UDP block on {near}") as step:
            self.network.unblock_udp(routers[near])
            step.done(f"removed the UDP block on {near}: direct paths can come back")
        self.record.kept = True
        self.state_file.save(self.record)
        assert self.workdir is not None
        command = p2pvpn_command()
        ns = namespace_name(source)
        state_root = self.workdir / "state"
        self.console.heading("The demo network stays up (--keep):")
        lines = [
            f"namespaces:   {', '.join(self.record.namespaces)}",
            f"a shell:      sudo ip netns exec {ns} bash",
            f"ping:         sudo ip netns exec {ns} ping {self._ip(destination)}",
            f"by name:      sudo ip netns exec {ns} ping {destination}.{DOMAIN}",
            f"exit node:    sudo ip netns exec {namespace_name(EXIT_USER)} ping "
            f"{self.web.address if self.web else WEB} (through {EXIT_NODE})",
            f"peer status:  sudo ip netns exec {ns} {command} status "
            f"--state-dir {state_root} -n {source}",
            f"logs:         {self.workdir / 'logs'}",
            f"certificate:  {self.workdir / 'tls'} (the clients trust it with --tls-ca)",
            f"password:     in {self.workdir / 'password'}",
            f"remove it:    sudo {command} demo --cleanup",
        ]
        for line in lines:
            self.console.line("  " + line)

    def _teardown(self) -> bool:
        """Remove everything; False (after saying what is left) when something stays."""
        started = time.monotonic()
        self.poller = None
        problems: list[str] = []
        try:
            terminate_all(self.processes)
        except Exception as exc:  # keep going: the namespaces must go anyway
            problems.append(f"stopping processes: {exc}")
        names = list(dict.fromkeys(reversed(self.record.namespaces)))
        problems += remove_namespaces(names)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"could not remove {self.workdir}")
        elapsed = time.monotonic() - started
        if problems:
            self.console.fail("some of the demo could not be removed", elapsed)
            for problem in problems:
                self.console.detail(problem)
            self.console.detail("try: sudo p2pvpn demo --cleanup")
            return False
        with contextlib.suppress(OSError):
            self.state_file.remove()
        what = f"{_plural(len(names), 'namespace')}, {_plural(len(self.processes), 'process')}"
        if self.workdir is not None:
            what += f" and {self.workdir}"
        self.console.ok(f"removed {what}", elapsed)
        return True
