"""Peer names over DNS end to end (issue 16): a server, three p2pvpn members, one Candy client.

One topology for the module, on one "internet" segment: ``p2pvpn server``,
members alpha, bravo and charlie (``p2pvpn run`` with a ``hostname`` key and
a static address) and a scripted Candy-protocol client (candy_client.py)
whose only name is the one in its WebSocket ping payload,
``candy::linux::6.1.8::candyhost``. Each member's namespace has a
resolv.conf naming its own TUN address, so ``getent hosts`` asks the
member's own DNS responder, as any program there would; dnspython asks it
directly. The tests run in file order; the last three change the network
(charlie restarted under another name, then under a taken one; bravo and the
Candy client leave) and wait for what they expect with a deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pvpn.netns import (
    Client,
    Namespace,
    Process,
    TestBed,
    VpnNetwork,
    p2pvpn_argv,
    python_argv,
)
from tests.integration.conftest import BED_KEY, open_testbed
from tests.integration.faults_support import Record
from tests.integration.names_support import (
    dns_ask,
    getent_hosts,
    resolve_all,
    status_names,
    write_config,
)

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("no_namespace_left_behind")]

CANDY_CLIENT = Path(__file__).with_name("candy_client.py")
MEMBERS = {"alpha": "10.77.0.11", "bravo": "10.77.0.12", "charlie": "10.77.0.13"}
CANDY_NAME, CANDY_IP, CANDY_VMAC = "candyhost", "10.77.0.70", "candynames000001"
DOMAIN = "vpn"
SEEN_WITHIN = 30.0
"""Deadline for a change to reach the others: generous for a loaded 2-core machine."""


def fqdn(name: str) -> str:
    return f"{name}.{DOMAIN}"


def write_hostname(tmp: Path, client: str, hostname: str) -> Path:
    return write_config(tmp / f"{client}.toml", {"hostname": hostname})


@dataclass
class Names:
    vpn: VpnNetwork
    members: dict[str, Client]  # by client name (= first hostname)
    candy: Process
    tmp: Path

    @property
    def bed(self) -> TestBed:
        return self.vpn.bed

    def expected(self) -> dict[str, str]:
        """fqdn -> address of every name at the start."""
        names = {fqdn(name): address for name, address in MEMBERS.items()}
        return {**names, fqdn(CANDY_NAME): CANDY_IP}

    def restart(self, client: Client, hostname: str) -> None:
        """Stop ``client`` and start it again, same address, with ``hostname``."""
        assert client.process is not None
        client.process.terminate()
        write_hostname(self.tmp, client.name, hostname)
        self.vpn.start_client(client)
        self.vpn.wait_for_tun(client)


@pytest.fixture(scope="module")
def names_bed(
    no_namespace_left_behind: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestBed]:
    with open_testbed(tmp_path_factory.mktemp("names") / "logs") as bed:
        yield bed


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, names_bed: TestBed) -> None:
    request.node.stash[BED_KEY] = names_bed


def start_candy(vpn: VpnNetwork, ns: Namespace) -> Process:
    job = {
        "job": "hold",
        "url": vpn.url,
        "password": vpn.password,
        "tun_ip": CANDY_IP,
        "vmac": CANDY_VMAC,
        "hostname": CANDY_NAME,
    }
    process = vpn.bed.start(ns, python_argv(str(CANDY_CLIENT), json.dumps(job)), "candy")
    process.wait_for_log("logged_in")
    return process


@pytest.fixture(scope="module")
def names(names_bed: TestBed) -> Names:
    tmp = names_bed.log_dir.parent
    vpn = VpnNetwork(names_bed, tmp)
    vpn.start_server()
    members: dict[str, Client] = {}
    for name, address in MEMBERS.items():
        config = write_hostname(tmp, name, name)
        members[name] = vpn.add_client(name, "-c", str(config), tun=f"{address}/24", stun=True)
    for client in members.values():
        vpn.wait_for_tun(client)
        client.ns.write_resolv_conf([client.tun_ip()])
    candy_ns = names_bed.namespace("candy")
    vpn.wan.attach(candy_ns)
    return Names(vpn, members, start_candy(vpn, candy_ns), tmp)


def wait_resolved(names: Names, client: Client, expected: dict[str, str | None]) -> None:
    """Until ``client``'s own DNS answers each fqdn with its address (None: NXDOMAIN)."""

    def answers() -> dict[str, str | None]:
        found = dns_ask(client.ns, client.tun_ip(), [(name, "A") for name in expected])
        return {
            name: answer.address if answer.rcode == "NOERROR" else None
            for name, answer in zip(expected, found, strict=True)
        }

    last: list[dict[str, str | None]] = []

    def done() -> bool:
        last[:] = [answers()]
        return last[0] == expected

    names.bed.wait_until(
        done,
        timeout=SEEN_WITHIN,
        interval=0.3,
        message=f"{client.name} never answered {expected} (last: {last})",
    )


def test_every_member_resolves_every_name(names: Names) -> None:
    """getent (glibc through the namespace's resolv.conf) and dnspython, on every member,
    for every member and for the Candy client, whose name came only from its ping."""
    expected = names.expected()
    for client in names.members.values():
        wait_resolved(names, client, dict(expected))
        assert resolve_all(client.ns, client.tun_ip(), list(expected)) == expected
        assert getent_hosts(client.ns, *expected) == expected, client.name


def test_reverse_lookups_name_the_members(names: Names) -> None:
    alpha, charlie = names.members["alpha"], names.members["charlie"]
    addresses = [*MEMBERS.values(), CANDY_IP]
    answers = dns_ask(alpha.ns, alpha.tun_ip(), [(address, "PTR") for address in addresses])
    assert [answer.records for answer in answers] == [
        (f"{fqdn(name)}.",) for name in [*MEMBERS, CANDY_NAME]
    ]
    bravo_ip = MEMBERS["bravo"]
    assert getent_hosts(charlie.ns, bravo_ip) == {bravo_ip: fqdn("bravo")}


def test_other_domains_are_refused_unknown_names_not_found(names: Names) -> None:
    bravo = names.members["bravo"]
    questions = [
        ("example.com", "A"),
        ("alpha.vpn.example.com", "A"),
        (fqdn("nosuchhost"), "A"),
        (fqdn("alpha"), "AAAA"),
        ("198.51.100.7", "PTR"),  # outside the VPN network: not ours to answer
    ]
    answers = dns_ask(bravo.ns, bravo.tun_ip(), questions)
    assert [(answer.rcode, answer.records) for answer in answers] == [
        ("REFUSED", ()),
        ("REFUSED", ()),
        ("NXDOMAIN", ()),
        ("NOERROR", ()),
        ("REFUSED", ()),
    ]
    assert getent_hosts(bravo.ns, "example.com") == {}


def test_status_shows_the_names(names: Names) -> None:
    alpha = names.members["alpha"]
    # One answered and one refused query for the counters; traffic for peer rows.
    dns_ask(alpha.ns, alpha.tun_ip(), [(fqdn("bravo"), "A"), ("example.com", "A")])
    for name in ("bravo", "charlie"):
        names.vpn.wait_ping(alpha, MEMBERS[name])
    expected = {address: name for name, address in [*MEMBERS.items(), (CANDY_NAME, CANDY_IP)]}
    names.bed.wait_until(
        lambda: status_names(alpha) == expected,
        timeout=SEEN_WITHIN,
        message="alpha's status never listed every name",
    )
    snapshot = alpha.status()
    assert (snapshot["hostname"], snapshot["domain"]) == ("alpha", DOMAIN)
    rows = {row["address"]: row for row in snapshot["names"]}
    assert rows[CANDY_IP]["p2pvpn"] is False and rows[MEMBERS["bravo"]]["p2pvpn"] is True
    dns = snapshot["dns"]
    assert dns["listening"] == f"{MEMBERS['alpha']}:53"
    assert dns["queries"] >= dns["answered"] >= 1 and dns["refused"] >= 1
    names.bed.wait_until(
        lambda: {row.get("name") for row in alpha.status()["peers"]} >= {"bravo", "charlie"},
        timeout=SEEN_WITHIN,
        message="alpha's peer rows never showed bravo's and charlie's names",
    )
    argv = p2pvpn_argv("status", "--state-dir", str(alpha.state_root), "-n", "alpha")
    text = alpha.ns.run(argv).stdout
    assert fqdn("alpha") in text, text
    for name in ("bravo", "charlie", CANDY_NAME):
        assert name in text, text


def test_a_new_hostname_is_seen_within_seconds(names: Names, measured: Record) -> None:
    alpha, charlie = names.members["alpha"], names.members["charlie"]
    started = time.monotonic()
    names.restart(charlie, "delta")
    charlie_ip = MEMBERS["charlie"]
    wait_resolved(names, alpha, {fqdn("delta"): charlie_ip, fqdn("charlie"): None})
    measured("rename_seen_s", time.monotonic() - started)
    wait_resolved(names, charlie, {fqdn("delta"): charlie_ip, fqdn("alpha"): MEMBERS["alpha"]})
    assert getent_hosts(alpha.ns, fqdn("delta")) == {fqdn("delta"): charlie_ip}


def test_a_taken_hostname_gets_a_suffix(names: Names) -> None:
    alpha, bravo, charlie = (names.members[name] for name in ("alpha", "bravo", "charlie"))
    names.restart(charlie, "alpha")  # alpha logged in first and keeps the plain name
    alpha_ip, charlie_ip = MEMBERS["alpha"], MEMBERS["charlie"]
    suffixed = f"alpha-{charlie_ip.rsplit('.', 1)[1]}"
    for client in (alpha, charlie):
        names.bed.wait_until(
            lambda client=client: status_names(client).get(charlie_ip) == suffixed,  # type: ignore[misc]
            timeout=SEEN_WITHIN,
            message=f"{client.name}'s status never showed {suffixed} for {charlie_ip}",
        )
        assert status_names(client)[alpha_ip] == "alpha"
    wait_resolved(names, bravo, {fqdn("alpha"): alpha_ip, fqdn(suffixed): charlie_ip})


def test_departures_are_seen_within_seconds(names: Names) -> None:
    """bravo stops (it says goodbye) and the Candy client goes (only the server can tell)."""
    alpha, bravo = names.members["alpha"], names.members["bravo"]
    assert bravo.process is not None
    bravo.process.terminate()
    names.candy.terminate()
    wait_resolved(names, alpha, {fqdn("bravo"): None, fqdn(CANDY_NAME): None})
    names.bed.wait_until(
        lambda: not {MEMBERS["bravo"], CANDY_IP} & set(status_names(alpha)),
        timeout=SEEN_WITHIN,
        message="alpha's status kept the names of bravo or the Candy client",
    )
    assert getent_hosts(alpha.ns, fqdn("bravo"), fqdn(CANDY_NAME)) == {}
