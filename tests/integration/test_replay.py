"""Replayed datagrams from a third host, and a real NAT rebinding (namespaces, both data planes).

Topology: the server and b on the "internet" (198.51.100.0/24), a behind its
own NAT router, and an attacker c on the internet too. b has no NAT in front
of it, so whatever c sends to b's UDP port reaches b: the worst case for a
path hijack (behind a filtering NAT, c's datagrams would not even get in).

c's `Replayer` sniffs on a's NAT router, where a's datagrams to b leave with
a's public address, and sends copies of them to b from c's own address:

* copies within the replay window (seconds) must be dropped by b's data
  plane as "replay": the ping inside a FORWARD reaches b's TUN once, and the
  heartbeat copies move nothing;
* an old heartbeat (outside the window) gets through the data plane, but a
  heartbeat from a new address only makes b challenge that address (DELAY)
  and c does not answer, so b's path stays on a;
* a real rebinding of a's NAT still moves b's path to a's new public port
  within seconds (a answers the challenge from there).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from p2pvpn.netns import Client, Namespace, NatSite, PingLog, VpnNetwork, nat_client, wait_connected
from tests.integration.faults_support import (
    A_IP,
    B_IP,
    Record,
    direct_endpoint,
    flaps,
    other_port,
    rebind_udp,
)
from tests.integration.replay_support import (
    DELAY_DATAGRAMS,
    HEARTBEAT_DATAGRAM,
    PING_FORWARD_DATAGRAM,
    Replayer,
    Want,
)

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("no_namespace_left_behind")]


REPLAYS = 5
STEADY_SECONDS = 5.0
"""How long the peers must stay CONNECTED on the same paths after an attack."""
OLD_HEARTBEAT_AGE = 6.0
"""Replay window 2 s, IVs remembered up to 3 s: 6 s is well outside."""


@pytest.fixture(params=["fast", "pure"])
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Pair:
    a: Client
    site_a: NatSite
    b: Client
    c: Namespace
    a_public: tuple[str, int]
    """a's address as b sees it (b's path for a)."""
    b_address: tuple[str, int]
    """b's address as a sees it (a's path for b): where c sends its copies."""


def connected_pair_with_attacker(vpn: VpnNetwork, dataplane: str) -> Pair:
    """a behind a NAT, b and c on the internet; a and b CONNECTED directly."""
    vpn.start_server()
    a, site_a = nat_client(vpn, "a", A_IP, "port-preserving", "--dataplane", dataplane)
    b = vpn.add_client("b", "--dataplane", dataplane, tun=f"{B_IP}/24", stun=True)
    c = vpn.client_namespace("c")
    vpn.wait_for_tun(a)
    vpn.wait_for_tun(b)
    wait_connected(vpn, a, b)
    assert a.status()["dataplane"] == dataplane
    assert b.status()["dataplane"] == dataplane
    a_public = direct_endpoint(b.peer(A_IP))
    b_address = direct_endpoint(a.peer(B_IP))
    assert a_public is not None and a_public[0] == str(site_a.public_ip), b.peer(A_IP)
    assert b_address is not None and b_address[0] == str(vpn.wan.ip(b.ns)), a.peer(B_IP)
    assert path_moves(b, A_IP, 0), "b's log names no path: update path_moves to its wording"
    return Pair(a, site_a, b, c, a_public, b_address)


def sniff_a_to_b(vpn: VpnNetwork, pair: Pair, wants: list[Want], listen: float = 0.0) -> Replayer:
    """A `Replayer` in c that sniffs a's datagrams to b on a's NAT router (WAN side)."""
    return Replayer(
        vpn.bed,
        pair.c,
        capture_ns=pair.site_a.router,
        ifname=pair.site_a.wan_ifname,
        src=pair.a_public[0],
        dst=pair.b_address,
        wants=wants,
        listen=listen,
    )


# ---------------------------------------------------------------- counters

ICMP_COUNTERS = """
table ip p2t_replay {{
    counter icmp_in {{ }}
    chain input {{
        type filter hook input priority -5; policy accept;
        iifname "{ifname}" icmp type {icmp_type} counter name "icmp_in"
    }}
}}
"""


def count_icmp_in(client: Client, icmp_type: str) -> None:
    """Count the ICMP ``icmp_type`` packets that arrive on the client's TUN device."""
    client.ns.nft(ICMP_COUNTERS.format(ifname=client.interface, icmp_type=icmp_type))


def icmp_in(client: Client) -> int:
    result = client.ns.run(["nft", "-j", "list", "counter", "ip", "p2t_replay", "icmp_in"])
    for item in json.loads(result.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError(f"no counter in {result.stdout}")


def replay_drops(client: Client) -> int:
    return int(client.status()["drops"].get("replay", 0))


# ---------------------------------------------------------------- checks


def path_moves(client: Client, peer: str, since: int) -> list[str]:
    """The ``direct path`` lines the client logged for ``peer`` after log offset ``since``."""
    assert client.process is not None
    text = client.process.log_text()[since:]
    return re.findall(rf"peer {re.escape(peer)}: direct path \S+", text)


def log_offset(client: Client) -> int:
    assert client.process is not None
    return len(client.process.log_text())


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` s pass; no failure, just the answer."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.2)
    return True


def assert_steady(vpn: VpnNetwork, pair: Pair, seconds: float) -> int:
    """Both sides CONNECTED on their original paths at every look for ``seconds``.

    Returns how many times both were looked at.
    """
    expected_b = f"direct {pair.a_public[0]}:{pair.a_public[1]}"
    expected_a = f"direct {pair.b_address[0]}:{pair.b_address[1]}"
    looks = 0
    end = time.monotonic() + seconds
    while True:
        row_b, row_a = pair.b.peer(A_IP), pair.a.peer(B_IP)
        assert row_b is not None and row_b["state"] == "CONNECTED", row_b
        assert row_b["path"] == expected_b, f"b's path for a moved: {row_b}"
        assert row_a is not None and row_a["state"] == "CONNECTED", row_a
        assert row_a["path"] == expected_a, f"a's path for b moved: {row_a}"
        looks += 1
        if time.monotonic() >= end:
            return looks
        time.sleep(0.2)


# ---------------------------------------------------------------- tests


def test_replayed_heartbeat_and_forward_are_dropped(
    vpn: VpnNetwork, dataplane: str, measured: Record
) -> None:
    """Copies of a heartbeat and of a ping's FORWARD, sent within the replay window
    from a third host, are dropped as "replay": the ping reaches b once, the
    tunnel stays up on the same paths, and traffic still flows."""
    started = time.monotonic()
    pair = connected_pair_with_attacker(vpn, dataplane)
    a, b = pair.a, pair.b
    measured("setup_s", time.monotonic() - started)
    count_icmp_in(b, "echo-request")
    count_icmp_in(a, "echo-reply")
    assert icmp_in(b) == 0 and icmp_in(a) == 0  # nothing pings during the test but us
    drops_before = replay_drops(b)
    since = time.time()
    b_log, a_log = log_offset(b), log_offset(a)

    replayer = sniff_a_to_b(
        vpn,
        pair,
        [Want(HEARTBEAT_DATAGRAM, REPLAYS), Want(PING_FORWARD_DATAGRAM, REPLAYS)],
        listen=1.0,
    )
    try:
        # A heartbeat leaves every second; then one ping, the only 113-byte datagram.
        replayer.wait_for("captured", HEARTBEAT_DATAGRAM)
        first_ping = a.ns.ping(B_IP, count=1, timeout=2.0)
        replayer.finish()
    finally:
        replayer.stop()
    captured = {e["size"]: e for e in replayer.events("captured")}
    replayed = {e["size"]: e for e in replayer.events("replayed")}
    for size in (HEARTBEAT_DATAGRAM, PING_FORWARD_DATAGRAM):
        assert replayed[size]["count"] == REPLAYS
        measured(f"replay_delay_{size}_ms", (replayed[size]["at"] - captured[size]["at"]) * 1000)

    # Measure everything first, so a failure shows the whole picture.
    expected = drops_before + 2 * REPLAYS
    eventually(lambda: replay_drops(b) >= expected, timeout=10)
    drops = replay_drops(b) - drops_before
    requests, replies = icmp_in(b), icmp_in(a)
    back = replayer.events("received")
    measured("replay_drops", drops)
    measured("datagrams_b_sent_to_c", [e["size"] for e in back])
    measured("echo_requests_on_b_tun", requests)
    measured("echo_replies_on_a_tun", replies)
    assert requests == 1, f"the ping reached b's TUN {requests} times"
    assert drops == 2 * REPLAYS, b.status()["drops"]
    assert first_ping and replies == 1, f"a got {replies} echo replies"
    assert not back, f"b sent datagrams to c: {back}"
    assert not path_moves(b, A_IP, b_log), f"b's path for a moved: {path_moves(b, A_IP, b_log)}"
    assert not path_moves(a, B_IP, a_log), f"a's path for b moved: {path_moves(a, B_IP, a_log)}"
    measured("steady_looks", assert_steady(vpn, pair, STEADY_SECONDS))
    assert not flaps(b.process, A_IP, after=since), "b left CONNECTED"
    assert not flaps(a.process, B_IP, after=since), "a left CONNECTED"
    assert a.ns.ping(B_IP, count=3, timeout=2.0)
    assert icmp_in(b) == 4
    measured("test_s", time.monotonic() - started)


def test_old_heartbeat_from_a_third_host_does_not_move_the_path(
    vpn: VpnNetwork, dataplane: str, measured: Record
) -> None:
    """A heartbeat captured seconds ago is no replay any more, but its new source
    address only earns a challenge: b's path for a stays where it was."""
    started = time.monotonic()
    pair = connected_pair_with_attacker(vpn, dataplane)
    a, b = pair.a, pair.b
    measured("setup_s", time.monotonic() - started)
    since = time.time()
    b_log = log_offset(b)
    drops_before = replay_drops(b)

    replayer = sniff_a_to_b(
        vpn, pair, [Want(HEARTBEAT_DATAGRAM, count=1, hold=OLD_HEARTBEAT_AGE)], listen=3.0
    )
    try:
        captured = replayer.wait_for("captured", HEARTBEAT_DATAGRAM)
        replayed = replayer.wait_for("replayed", HEARTBEAT_DATAGRAM, timeout=OLD_HEARTBEAT_AGE + 15)
        measured("heartbeat_age_s", replayed["at"] - captured["at"])
        looks = assert_steady(vpn, pair, STEADY_SECONDS)
        replayer.finish()
    finally:
        replayer.stop()
    back = replayer.events("received")
    measured("steady_looks", looks)
    measured("datagrams_b_sent_to_c", [e["size"] for e in back])
    measured("replay_drops", replay_drops(b) - drops_before)
    assert replayed["at"] - captured["at"] >= OLD_HEARTBEAT_AGE
    # The copy was too old to be a replay: it reached b's control plane, which
    # challenged c's address (a DELAY) and did nothing else there. b's status is
    # no proof on its own: a's next heartbeat would move a hijacked path back
    # within a second, between two looks; b logs every path it takes.
    moves = path_moves(b, A_IP, b_log)
    assert not moves, f"b moved its path for a: {moves}"
    assert replay_drops(b) == drops_before, b.status()["drops"]
    assert back, "b did not challenge c's address: did the heartbeat reach b?"
    assert all(e["size"] in DELAY_DATAGRAMS for e in back), f"b sent c more than a DELAY: {back}"
    assert not flaps(b.process, A_IP, after=since), "b left CONNECTED"
    assert not flaps(a.process, B_IP, after=since), "a left CONNECTED"
    assert a.ns.ping(B_IP, count=3, timeout=2.0)
    assert_steady(vpn, pair, 0)
    measured("test_s", time.monotonic() - started)


def test_nat_rebinding_still_moves_the_path(
    vpn: VpnNetwork, dataplane: str, measured: Record
) -> None:
    """a's NAT hands out a new public port while a pings b: b's path follows
    within seconds (after its challenge is answered from there), and nobody
    leaves CONNECTED."""
    started = time.monotonic()
    pair = connected_pair_with_attacker(vpn, dataplane)
    a, b = pair.a, pair.b
    measured("setup_s", time.monotonic() - started)
    old_ip, old_port = pair.a_public
    new_port = other_port(old_port)
    since = time.time()
    ping = PingLog(vpn.bed, a.ns, B_IP)
    try:
        vpn.bed.wait_until(lambda: ping.replies_after(since, 3), timeout=10, message="no pings")
        dropped = rebind_udp(pair.site_a, new_port)
        rebound = time.time()
        vpn.bed.wait_until(
            lambda: direct_endpoint(b.peer(A_IP)) == (old_ip, new_port),
            timeout=20,
            interval=0.1,
            message=f"b's path never moved to a's new port {new_port}",
        )
        moved_after = time.time() - rebound
        vpn.bed.wait_until(
            lambda: ping.replies_after(time.time() - 1, 3),
            timeout=15,
            message="pings did not resume",
        )
        end = time.time()
        max_gap = ping.max_gap(rebound, end)
    finally:
        ping.stop()
    measured("udp_mappings_dropped", dropped)
    measured("b_path_moved_after_s", moved_after)
    measured("ping_max_gap_s", max_gap)
    row_a, row_b = a.peer(B_IP), b.peer(A_IP)
    assert row_b is not None and row_b["state"] == "CONNECTED", row_b
    assert row_b["path"] == f"direct {old_ip}:{new_port}", row_b
    assert row_a is not None and row_a["state"] == "CONNECTED", row_a
    assert direct_endpoint(row_a) == pair.b_address, row_a
    assert not flaps(b.process, A_IP, after=since), "b left CONNECTED"
    assert not flaps(a.process, B_IP, after=since), "a left CONNECTED"
    assert moved_after < 10
    assert a.ns.ping(B_IP, count=3, timeout=2.0)
    measured("test_s", time.monotonic() - started)
