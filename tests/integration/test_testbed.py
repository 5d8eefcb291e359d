"""Self-tests of the namespace test bed (`p2pvpn.netns` and the ``testbed`` fixture)."""

import json
import subprocess
import sys
import textwrap
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

import tests.integration.conftest as bed_conftest
from p2pvpn.netns import (
    ETC_NETNS_DIR,
    NAT_TABLE,
    RUN_PREFIX,
    CommandError,
    Namespace,
    NatMode,
    Process,
    TestBed,
    list_namespaces,
    nat_ruleset,
    process_env,
    run_namespace,
    sweep_stale_namespaces,
    wait_until,
)
from tests import REPO_ROOT
from tests.integration.conftest import open_testbed, require_netns, require_tool

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

UDP_PROBE = """\
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


def start_udp_echo(bed: TestBed, ns: Namespace, port: int) -> Process:
    """Start `UDP_ECHO_SERVER` on ``port`` and wait until it listens."""
    process = bed.start_python(ns, ["-c", UDP_ECHO_SERVER, str(port)], "udp-echo")
    process.wait_for_log("listening")
    return process


def udp_observed_sources(
    ns: Namespace, server: IPv4Address | str, port: int, local_ports: list[int]
) -> list[tuple[int, IPv4Address, int]]:
    """From ``ns``, ask a `start_udp_echo` server which source it sees, one socket per
    entry of ``local_ports``: ``(local port, observed ip, observed port)`` each."""
    result = ns.python(UDP_PROBE, str(server), str(port), json.dumps(local_ports))
    return [(local, IPv4Address(ip), seen) for local, ip, seen in json.loads(result.stdout)]


def _pid_alive(pid: int) -> bool:
    """True for a running process; False when gone or a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _all_dead(pids: list[int]) -> bool:
    return not any(_pid_alive(pid) for pid in pids)


def _ns_exists(name: str) -> bool:
    return name in list_namespaces()


# -- no root needed ----------------------------------------------------------


def test_wait_until_returns_the_truthy_value() -> None:
    values = iter([0, None, "", "ready"])
    assert wait_until(lambda: next(values), timeout=30, interval=0.01) == "ready"


def test_wait_until_failure_names_the_condition_and_shows_logs() -> None:
    with pytest.raises(AssertionError) as info:
        wait_until(
            lambda: False,
            timeout=0.2,
            interval=0.05,
            message="peer never came up",
            logs=lambda: "LOG",
        )
    assert "peer never came up" in str(info.value)
    assert "LOG" in str(info.value)


def test_wait_until_ignores_listed_exceptions_and_reports_the_last() -> None:
    def predicate() -> bool:
        raise ConnectionRefusedError("not listening yet")

    with pytest.raises(AssertionError, match="not listening yet"):
        wait_until(predicate, timeout=0.2, interval=0.05, ignore=(ConnectionRefusedError,))


def test_require_netns_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bed_conftest, "missing_requirements", lambda: ["root (run as root)"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="root"):
        require_netns()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="root"):
        require_netns()


def test_require_tool_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-p2t"):
        require_tool("no-such-tool-p2t")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install pkg"):
        require_tool("no-such-tool-p2t", "pkg")


def test_nat_ruleset_variants() -> None:
    plain = nat_ruleset("eth1", "port-preserving")
    assert 'oifname "eth1" masquerade\n' in plain
    assert 'iifname "eth1" ct state new drop' in plain
    assert "masquerade random,fully-random" in nat_ruleset("eth1", "random")
    with pytest.raises(ValueError):
        nat_ruleset("eth1", "cone")  # type: ignore[arg-type]


# -- namespaces and cleanup (root) ---------------------------------------------


@pytest.mark.netns
def test_namespaces_are_created_unique_and_removed(tmp_path: Path) -> None:
    bed = TestBed(tmp_path)
    a = bed.namespace("a")
    b = bed.namespace("b")
    assert a.name != b.name
    assert a.name.startswith(RUN_PREFIX)
    assert _ns_exists(a.name)
    assert _ns_exists(b.name)
    assert a.interfaces() == ["lo"]
    bed.close()
    assert not _ns_exists(a.name)
    assert not _ns_exists(b.name)
    bed.close()  # idempotent


@pytest.mark.netns
def test_cleanup_runs_when_the_test_body_raises(tmp_path: Path) -> None:
    """The fixture's context manager (`open_testbed`) cleans up on an exception."""
    with pytest.raises(RuntimeError, match="boom"), open_testbed(tmp_path) as bed:
        ns = bed.namespace("boom")
        other = bed.namespace("other")
        bed.link(ns, other, "10.9.9.1/30", "10.9.9.2/30")
        proc = bed.start_python(ns, ["-c", "import time; time.sleep(600)"], "sleeper")
        raise RuntimeError("boom")
    assert not _ns_exists(ns.name)
    assert not _ns_exists(other.name)
    assert proc.returncode is not None
    assert not _pid_alive(proc.pid)


@pytest.mark.netns
def test_process_is_killed_at_teardown_and_its_log_kept(tmp_path: Path) -> None:
    with open_testbed(tmp_path) as bed:
        ns = bed.namespace("procs")
        polite = bed.start_python(
            ns, ["-c", "import time; print('started', flush=True); time.sleep(600)"], "polite"
        )
        # Ignores SIGTERM and has a child: needs the SIGKILL after the grace period.
        stubborn = bed.start(
            ns, ["sh", "-c", "trap '' TERM; echo stubborn up; sleep 600 & wait"], "stubborn"
        )
        polite.wait_for_log("started")
        stubborn.wait_for_log("stubborn up")
        pids = ns.pids()
        assert polite.pid in pids
        assert len(pids) >= 3  # python, sh and its sleep child
        bed.close(grace=0.5)
    assert polite.returncode == -15  # SIGTERM
    assert stubborn.returncode == -9  # SIGKILL after the grace period
    wait_until(lambda: _all_dead(pids), message=f"processes {pids} still alive")
    assert polite.log_path.read_text() == "started\n"
    assert "stubborn up" in stubborn.tail()
    assert "polite" in bed.logs() and "started" in bed.logs()


@pytest.mark.netns
def test_wait_for_log_fails_early_when_the_process_dies(testbed: TestBed) -> None:
    ns = testbed.namespace("dies")
    proc = testbed.start(ns, ["sh", "-c", "echo about to exit; exit 3"], "dies")
    with pytest.raises(AssertionError, match="exited with status 3"):
        proc.wait_for_log("never printed", timeout=60)


@pytest.mark.netns
def test_failing_test_gets_process_logs_and_still_cleans_up(tmp_path: Path) -> None:
    """Run a failing test that uses the real fixture and hook in a child pytest."""
    require_netns()
    state = tmp_path / "state.json"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text("from tests.integration.conftest import *  # noqa\n")
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import json, os
            from pathlib import Path

            def test_inner(testbed):
                ns = testbed.namespace("inner")
                code = "import time; print('inner process says hello', flush=True); time.sleep(600)"
                proc = testbed.start_python(ns, ["-c", code], "sleeper")
                proc.wait_for_log("says hello")
                state = {"ns": ns.name, "pid": proc.pid}
                Path(os.environ["P2T_INNER_STATE"]).write_text(json.dumps(state))
                raise AssertionError("deliberate failure")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "pytest.ini"],
        cwd=tmp_path,
        env=process_env({"P2T_INNER_STATE": str(state)}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "deliberate failure" in output
    assert "test bed logs" in output
    assert "inner process says hello" in output
    inner = json.loads(state.read_text())
    assert not _ns_exists(inner["ns"])
    assert not _pid_alive(inner["pid"])


@pytest.mark.netns
def test_sweep_removes_namespaces_of_dead_runs() -> None:
    require_netns()
    dead = subprocess.run(["true"], check=True)
    del dead
    probe = subprocess.Popen(["true"])
    probe.wait()
    name = f"p2t-{probe.pid:x}-1-stale"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in sweep_stale_namespaces()
        assert not _ns_exists(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


# -- topology ----------------------------------------------------------------------


def test_veth_link_ping(testbed: TestBed) -> None:
    a = testbed.namespace("a")
    b = testbed.namespace("b")
    link = testbed.link(a, b, "10.0.0.1/30", "10.0.0.2/30")
    assert (link.ifname_a, link.ifname_b) == ("eth0", "eth0")
    assert a.addresses(link.ifname_a) == [IPv4Interface("10.0.0.1/30")]
    assert b.addresses() == [IPv4Interface("127.0.0.1/8"), IPv4Interface("10.0.0.2/30")]
    assert testbed.ping(a, link.ip(b))
    assert testbed.ping(b, "10.0.0.1", count=2)
    assert not testbed.ping(a, "10.0.0.3", timeout=1)  # nobody there


def test_segment_connects_three_members(testbed: TestBed) -> None:
    members = [testbed.namespace(name) for name in ("m1", "m2", "m3")]
    seg = testbed.segment("lan", "10.5.0.0/24", members)
    assert [seg.ip(ns) for ns in members] == [IPv4Address(f"10.5.0.{i}") for i in (1, 2, 3)]
    for ns in members:
        for other in members:
            if other is not ns:
                assert testbed.ping(ns, seg.ip(other)), f"{ns.logical} -> {other.logical}"
    late = testbed.namespace("m4")
    assert seg.attach(late, "10.5.0.40") == IPv4Interface("10.5.0.40/24")
    assert testbed.ping(late, seg.ip(members[0]))


def test_routing_through_a_router(testbed: TestBed) -> None:
    left, router, right = (testbed.namespace(n) for n in ("left", "router", "right"))
    l_link = testbed.link(left, router, "10.1.0.2/24", "10.1.0.1/24")
    r_link = testbed.link(router, right, "10.2.0.1/24", "10.2.0.2/24")
    left.default_route(l_link.ip(router))
    right.default_route(r_link.ip(router))
    assert not testbed.ping(left, "10.2.0.2", timeout=1)  # forwarding is off by default
    router.enable_forwarding()
    assert testbed.ping(left, "10.2.0.2")
    assert left.routes()[0]["dst"] == "default"


def test_processes_in_two_namespaces_talk_over_a_segment(testbed: TestBed) -> None:
    server, client = testbed.namespace("srv"), testbed.namespace("cli")
    seg = testbed.segment("wan", "10.7.0.0/24", [server, client])
    echo = start_udp_echo(testbed, server, 3478)
    seen = udp_observed_sources(client, seg.ip(server), 3478, [40000])
    assert seen == [(40000, seg.ip(client), 40000)]
    assert "from ('10.7.0.2', 40000)" in echo.log_text()
    out = client.run("echo $((6 * 7)) from $(hostname -I 2>/dev/null || echo ns)").stdout
    assert out.startswith("42")


@pytest.mark.parametrize("mode", ["port-preserving", "random"])
def test_nat_router_masquerades(testbed: TestBed, mode: NatMode) -> None:
    require_tool("nft", "nftables")
    server = testbed.namespace("server")
    wan = testbed.segment("wan", "198.51.100.0/24", [server])
    site = testbed.nat_site("c1", wan, "10.1.0.0/24", mode)
    assert site.public_ip == IPv4Address("198.51.100.2")
    # The server has no route to 10.1.0.0/24: replies only arrive thanks to masquerade.
    assert testbed.ping(site.host, wan.ip(server))

    start_udp_echo(testbed, server, 3478)
    local_ports = [40001, 40002, 40003, 40004]
    seen = udp_observed_sources(site.host, wan.ip(server), 3478, local_ports)
    assert {ip for _, ip, _ in seen} == {site.public_ip}
    if mode == "port-preserving":
        assert [(local, port) for local, _, port in seen] == [(p, p) for p in local_ports]
    else:
        assert any(local != port for local, _, port in seen), seen

    # Unsolicited traffic from the WAN side is dropped, to the router and to the LAN.
    testbed.route(server, "10.1.0.0/24", site.public_ip)
    assert not testbed.ping(server, site.public_ip, timeout=1)
    assert not testbed.ping(server, site.host_ip, timeout=1)
    site.router.run(["nft", "delete", "table", "ip", NAT_TABLE])
    assert testbed.ping(server, site.public_ip)  # control: the ruleset was the reason


def test_internet_host_is_reached_only_through_its_gateway(testbed: TestBed) -> None:
    gateway, other = testbed.namespace("gw"), testbed.namespace("other")
    lan = testbed.link(other, gateway, "10.3.0.2/24", "10.3.0.1/24")
    other.default_route(lan.ip(gateway))
    internet = testbed.internet_host(gateway)
    assert (str(internet.address), str(internet.gateway_address)) == (
        "198.51.100.1",
        "198.51.100.2",
    )
    assert gateway.routes()[0] == {
        "dst": "default", "gateway": "198.51.100.1", "dev": "eth1", "flags": []
    }  # fmt: skip
    assert testbed.ping(gateway, internet.address)
    # The host knows no way back to 10.3.0.0/24: only a masquerading gateway gets replies.
    gateway.enable_forwarding()
    assert not testbed.ping(other, internet.address, timeout=1)


def test_resolv_conf_per_namespace_goes_with_the_namespace(tmp_path: Path) -> None:
    existed = ETC_NETNS_DIR.exists()
    with open_testbed(tmp_path / "logs") as bed:
        ns = bed.namespace("dns")
        path = ns.write_resolv_conf(["10.77.0.1"])
        assert path == ETC_NETNS_DIR / ns.name / "resolv.conf"
        seen = ns.run(["cat", "/etc/resolv.conf"]).stdout
        assert seen.splitlines()[0] == "nameserver 10.77.0.1"
    assert not (ETC_NETNS_DIR / ns.name).exists()
    if not existed:  # made for this namespace: it goes with it
        assert not ETC_NETNS_DIR.exists()


@pytest.mark.netns
def test_namespace_standalone_context_manager() -> None:
    require_netns()
    with run_namespace("solo") as ns:
        assert ns.exists()
        code = "import p2pvpn.netns, tests.integration.faults_support; print('ok')"
        assert ns.python(code).stdout == "ok\n"
        assert ns.run(["true"]).returncode == 0
        with pytest.raises(CommandError, match="exit status 3"):
            ns.run("exit 3")
    assert not ns.exists()


def test_repo_root_is_the_checkout() -> None:
    assert (REPO_ROOT / "pyproject.toml").is_file()
