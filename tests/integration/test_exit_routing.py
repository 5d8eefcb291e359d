"""Using an exit node, the kernel side (issue 16): in a namespace with a default route
of its own and a TUN device, the rules, the table route, where packets go with and
without the underlay mark and with and without exit_allow_lan, and nothing left after
close or, after a SIGKILL, after remove_stale."""

import json
import signal
import subprocess
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.netns import Namespace, TestBed, VpnNetwork
from p2pvpn.netns._process import python_argv

SUPPORT = Path(__file__).with_name("exit_routing_support.py")
TUN_DEVICE = "p2pvpn-exr"
TUN = "p2pvpn-exr from 10.77.0.2"  # what goes to the exit node has the VPN address as source
RUN_TIMEOUT = 60.0


@pytest.fixture
def member(testbed: TestBed) -> tuple[Namespace, str]:
    """A namespace whose default route leaves by a veth toward its "LAN" gateway."""
    member = testbed.namespace("exr")
    gateway = testbed.namespace("exrgw")
    link = testbed.link(member, gateway, "192.0.2.2/24", "192.0.2.1/24")
    member.ip("route", "add", "default", "via", "192.0.2.1")
    return member, link.ifname(member)


def underlay(ifname: str) -> str:
    return f"{ifname} from 192.0.2.2"


def run_support(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(python_argv(str(SUPPORT), *args), timeout=RUN_TIMEOUT, check=False)


def scenario(ns: Namespace, state_dir: Path, allow_lan: bool) -> dict[str, Any]:
    done = run_support(ns, "scenario", str(state_dir), "1" if allow_lan else "0")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rule_texts(rules: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {rule["priority"]: rule for rule in rules}


def test_all_traffic_goes_to_the_tun_but_the_marked_underlay(
    member: tuple[Namespace, str], tmp_path: Path
) -> None:
    ns, ifname = member
    lan_if = underlay(ifname)
    steps = scenario(ns, tmp_path / "state", allow_lan=True)
    started = steps["started"]
    assert steps["state_file"] is True
    rules = rule_texts(started["rules"])
    assert set(rules) == {5270, 5271}
    assert rules[5270]["table"] == "main"
    assert rules[5270].get("suppress_prefixlen") == 0
    assert rules[5271]["table"] == "30326"
    assert "not" in rules[5271]  # iproute2 shows the invert flag as a key with null
    assert rules[5271]["fwmark"] == "0x7076"
    # Started but not active: the empty table falls through to the main one.
    assert started["table"] == []
    assert started["internet"] == lan_if
    active = steps["active"]
    assert [(r["dst"], r["dev"], r.get("prefsrc")) for r in active["table"]] == [
        ("default", TUN_DEVICE, "10.77.0.2")
    ]
    assert active["internet"] == TUN
    assert active["internet_marked"] == lan_if
    # The LAN-address probe (peer_manager) is marked too: it must find the underlay's address.
    assert (active["source"], active["source_marked"]) == ("10.77.0.2", "192.0.2.2")
    assert active["lan"] == lan_if  # exit_allow_lan: the LAN stays direct
    assert active["vpn"] == TUN
    inactive = steps["inactive"]
    assert inactive["table"] == []
    assert inactive["internet"] == lan_if
    assert inactive["lan"] == lan_if
    closed = steps["closed"]
    assert closed["rules"] == [] and closed["table"] == []
    assert closed["internet"] == lan_if
    assert steps["state_file_after_close"] is False
    # The data plane got the complement of the VPN network, then nothing (deactivate, close).
    first = steps["entries"][0]
    assert sum(IPv4Network(network).num_addresses for network, _ in first) == 2**32 - 256
    assert all(nexthop == "10.77.0.1" for _, nexthop in first)
    assert "10.77.0.0/24" not in {network for network, _ in first}
    assert steps["entries"][1] == [] and steps["entries"][-1] == []


def test_without_allow_lan_the_lan_goes_through_the_exit_node(
    member: tuple[Namespace, str], tmp_path: Path
) -> None:
    ns, ifname = member
    lan_if = underlay(ifname)
    steps = scenario(ns, tmp_path / "state", allow_lan=False)
    assert set(rule_texts(steps["started"]["rules"])) == {5271}
    active = steps["active"]
    assert active["lan"] == TUN
    assert active["internet"] == TUN
    assert active["internet_marked"] == lan_if
    assert steps["inactive"]["lan"] == lan_if
    assert steps["closed"]["rules"] == []


def test_remove_stale_undoes_a_killed_run(member: tuple[Namespace, str], tmp_path: Path) -> None:
    ns, ifname = member
    lan_if = underlay(ifname)
    state_dir = tmp_path / "state"
    killed = run_support(ns, "killed", str(state_dir))
    assert killed.returncode == -9, killed.stderr
    assert (state_dir / "exit-routing.json").exists()
    assert {rule["priority"] for rule in ns.ip_json("rule")} >= {5270, 5271}
    # The TUN device went with the process and took its route; a route that outlived
    # its run (a persistent device, say) must go as well.
    ns.ip("route", "add", "default", "dev", ifname, "table", "30326")
    stale = run_support(ns, "stale", str(state_dir))
    assert stale.returncode == 0, stale.stderr
    result = json.loads(stale.stdout)
    assert result["removed"] is True
    assert result["after"]["rules"] == [] and result["after"]["table"] == []
    assert result["after"]["internet"] == lan_if
    assert not (state_dir / "exit-routing.json").exists()
    again = run_support(ns, "stale", str(state_dir))
    assert json.loads(again.stdout)["removed"] is False


def exit_rules(ns: Namespace) -> set[int]:
    return {rule["priority"] for rule in ns.ip_json("rule")} & {5270, 5271}


def test_a_client_waiting_for_its_exit_node_keeps_its_own_routes(vpn: VpnNetwork) -> None:
    """`p2pvpn run --exit gw` while no member offers gw: rules in place, nothing routed
    into the tunnel, the server reachable; SIGTERM removes the rules, and after a
    SIGKILL the next start (even without --exit) does."""
    vpn.start_server()
    client = vpn.add_client("w", "--exit", "gw", "--no-exit-allow-lan")
    vpn.wait_for_tun(client)
    vpn.bed.wait_until(
        lambda: client.status()["exit"]["state"] == "waiting",
        message="the client never reported its exit node as waited for",
    )
    state_file = client.state_root / "w" / "exit-routing.json"
    assert exit_rules(client.ns) == {5271}  # --no-exit-allow-lan: no LAN rule
    assert state_file.exists()
    assert client.status()["exit"] == {
        "target": "gw",
        "address": None,
        "state": "waiting",
        "since": None,
        "fallbacks": 0,
    }
    # Without the exit node the machine's own route carries everything.
    (route,) = client.ns.ip_json("route", "get", str(vpn.server_ip))
    assert route["dev"] != client.interface
    assert client.process is not None
    assert client.process.terminate() == 0
    assert exit_rules(client.ns) == set()
    assert not state_file.exists()

    client = vpn.add_client("w", "--exit", "gw", ns=client.ns)
    vpn.bed.wait_until(lambda: exit_rules(client.ns) == {5270, 5271}, message="no rules")
    assert client.process is not None
    client.process.send_signal(signal.SIGKILL)
    client.process.wait(timeout=10)
    assert exit_rules(client.ns) == {5270, 5271}
    assert state_file.exists()
    client = vpn.add_client("w", ns=client.ns)  # no --exit now
    vpn.wait_for_tun(client)
    assert exit_rules(client.ns) == set()
    assert not state_file.exists()
    assert client.status()["exit"]["state"] == "off"
