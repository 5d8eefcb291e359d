"""A relay cluster on NATS end to end (issue 15): three servers, one NATS, four clients.

One topology for the whole module (cluster_support.py draws it), built once
because it takes a while; the tests run in file order and the last three
break things on purpose: NATS goes away and comes back, then srv1 is
SIGKILLed for good (its clients learn it at once from the kernel's RST),
then srv2's host drops off the network without a word (its clients learn it
only from their own silence timeout, 30 s). Each test first checks that
what it needs still runs.

Measurements are printed as ``MEASURED ...`` lines, kept as test properties,
and merged into ``cluster-measurements.json`` in the test bed's log
directory (the failover times go to bench/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from p2pvpn.netns import PingLog, TestBed, terminate_all, wait_connected
from p2pvpn.wire.ws import Auth
from tests.integration.cluster_support import (
    A_IP,
    B_IP,
    C_IP,
    D_IP,
    Cluster,
    build_cluster,
    candy,
    first_answer_sent_after,
    first_log_line,
    record_measurements,
)
from tests.integration.conftest import BED_KEY, open_testbed, require_tool
from tests.integration.faults_support import Record, bulk_transfer, flaps

pytestmark = pytest.mark.netns

BULK_BYTES = 20_000_000
DUPLICATE_IP = "10.77.0.50"
REPLAY_IP = "10.77.0.60"
CANDY_IP = "10.77.0.70"
CANDY_VMAC = "candycluster0001"  # 16 ASCII characters, like Candy's own
PING_INTERVAL = 0.2
KICKED = "another client logged in with the same address"


@pytest.fixture(scope="module")
def cluster_bed(
    no_namespace_left_behind: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestBed]:
    """The module's test bed; closed before the namespace check runs."""
    require_tool("nats-server")
    with open_testbed(tmp_path_factory.mktemp("cluster") / "logs") as bed:
        yield bed


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, cluster_bed: TestBed) -> None:
    """A failing test's report gets the process logs (conftest's hook reads the stash)."""
    request.node.stash[BED_KEY] = cluster_bed


@pytest.fixture(scope="module")
def cluster(cluster_bed: TestBed) -> Cluster:
    return build_cluster(cluster_bed, cluster_bed.log_dir.parent)


@pytest.fixture(autouse=True)
def _own_processes_stopped(cluster: Cluster) -> Iterator[None]:
    """What a test started (pings, transfers, extra clients) stops with it, also when it
    fails; NATS and the servers belong to the module."""
    first = len(cluster.bed.processes)
    yield
    keep = {cluster.net.nats_process, *(server.process for server in cluster.net.servers)}
    terminate_all([p for p in cluster.bed.processes[first:] if p not in keep])


def test_relayed_ping_and_bulk_transfer_between_servers(cluster: Cluster, measured: Record) -> None:
    net, a, b = cluster.net, cluster.a, cluster.b
    cluster.check_alive()
    assert (net.server_of(A_IP), net.server_of(B_IP)) == (0, 1)
    net.wait_ping(a, B_IP)
    net.wait_ping(b, A_IP)
    row = a.peer(B_IP)
    assert row is not None and row["path"] == "relay server", row
    before = net.server_status(0)["stats"]["frames_published"]
    seconds = bulk_transfer(net, a, b, B_IP, BULK_BYTES)
    after = net.server_status(0)["stats"]["frames_published"]
    measured("cross_server_bulk_mbit_s", BULK_BYTES * 8 / seconds / 1e6)
    measured("srv1_frames_published", after - before)
    # 20 MB of TCP are some 14 000 segments: every one crossed NATS.
    assert after - before > 10_000
    assert b.peer(A_IP)["path"] == "relay server"  # type: ignore[index]


def test_dynamic_address_stays_when_its_client_moves_to_another_server(cluster: Cluster) -> None:
    net = cluster.net
    cluster.check_alive()
    dyn = net.add_client("dyn", home=0)
    address = net.wait_for_tun(dyn)
    assert net.server_of(address.ip) == 0
    vmac = net.sessions(0)[str(address.ip)]["vmac"]
    assert dyn.process is not None and dyn.process.terminate() == 0
    net.bed.wait_until(
        lambda: net.server_of(address.ip) is None, message="srv1 kept the session of dyn"
    )
    # Same state directory, so the same vmac; srv2 first this time.
    moved = net.add_client("dyn", ns=dyn.ns, home=1)
    assert net.wait_for_tun(moved) == address
    net.bed.wait_until(lambda: net.server_of(address.ip) == 1, message="dyn is not on srv2")
    assert net.sessions(1)[str(address.ip)]["vmac"] == vmac
    net.wait_ping(cluster.c, address.ip)  # c is on srv3
    assert moved.process is not None and moved.process.terminate() == 0


def test_duplicate_static_address_on_another_server_kicks_the_old_one(cluster: Cluster) -> None:
    net, b = cluster.net, cluster.b
    cluster.check_alive()
    old = net.add_client("old", tun=f"{DUPLICATE_IP}/24", urls=[net.servers[0].url])
    net.wait_for_tun(old)
    net.wait_ping(b, DUPLICATE_IP)
    new = net.add_client("new", tun=f"{DUPLICATE_IP}/24", urls=[net.servers[2].url])
    assert old.process is not None and new.process is not None
    # They fight with kicks across the servers until the one kicked first gives up.
    assert old.process.wait(timeout=60) != 0
    assert KICKED in old.process.log_text()
    net.wait_for_tun(new)
    net.bed.wait_until(lambda: net.server_of(DUPLICATE_IP) == 2, message="new is not on srv3")
    net.wait_ping(b, DUPLICATE_IP)
    assert new.process.alive()
    assert new.process.terminate() == 0


def test_replayed_auth_on_a_second_server_is_refused(cluster: Cluster) -> None:
    net = cluster.net
    cluster.check_alive()
    timestamp = int(time.time())
    auth = Auth.create(net.password, IPv4Address(REPLAY_IP), timestamp).encode()
    job = {"job": "replay", "tun_ip": REPLAY_IP, "target": C_IP, "auth": auth.hex()}
    result = candy(cluster, {**job, "first": net.servers[0].url, "second": net.servers[1].url})
    # The first login relays to srv3 and back; the same bytes on srv2 are a replay,
    # and refusing them must not kick the first session.
    assert result["first_rtt_ms"] > 0
    assert result["second"] == {"code": 4002, "reason": "replayed"}, result
    assert result["first_rtt_after_ms"] > 0


def test_candy_client_with_one_url_works_against_every_server(
    cluster: Cluster, measured: Record
) -> None:
    net = cluster.net
    cluster.check_alive()
    homes = {ip: net.server_of(ip) for ip in (A_IP, B_IP, C_IP, D_IP)}
    first_timestamp = int(time.time())
    for server in net.servers:
        target = next(ip for ip, home in homes.items() if home not in (None, server.index))
        job: dict[str, object] = {"job": "ping", "url": server.url, "target": target}
        # A timestamp of its own per login: the same second twice would be a replay.
        job.update(tun_ip=CANDY_IP, vmac=CANDY_VMAC, timestamp=first_timestamp + server.index)
        result = candy(cluster, job)
        measured(f"candy_via_{server.name}_to_{target}_rtt_ms", result["rtt_ms"])
        assert result["undecodable"] == 0, result


def test_nats_outage_keeps_local_relaying_and_rejoins(cluster: Cluster, measured: Record) -> None:
    net, bed, a = cluster.net, cluster.bed, cluster.a
    cluster.check_alive()
    assert (net.server_of(A_IP), net.server_of(D_IP)) == (0, 0)  # a and d share srv1
    processes = [server.process for server in net.servers] + [c.process for c in cluster.clients()]
    pids = [process.pid for process in processes if process is not None]
    logins = {c.name: c.status()["server"]["reconnects"] for c in cluster.clients()}
    local = PingLog(bed, a.ns, D_IP, interval=PING_INTERVAL, name="ping-local")
    cross = PingLog(bed, a.ns, B_IP, name="ping-cross")
    started = time.time()
    bed.wait_until(lambda: local.replies_after(started, 3) and cross.replies_after(started, 3))

    net.stop_nats()
    stopped_at = time.time()
    for server in net.servers:
        bed.wait_until(
            lambda i=server.index: net.cluster_state(i) == "unreachable",  # type: ignore[misc]
            timeout=30,
            message=f"{server.name} never reported NATS unreachable",
        )
    unreachable_after = time.time() - stopped_at
    # Longer than the ttl of every record, so that all of them have run out on NATS's
    # side when it comes back and must be written again.
    outlasted = stopped_at + net.ttl * 1.5
    bed.wait_until(
        lambda: local.replies_after(outlasted, 3),
        timeout=net.ttl * 1.5 + 30,
        message="local relaying stopped with NATS",
    )
    local_answered = len(local.replies(stopped_at)) * PING_INTERVAL / (time.time() - stopped_at)
    local_gap = local.max_gap(stopped_at, time.time())
    cross_while_down = len(cross.replies(stopped_at + unreachable_after))

    restarted_at = time.time()
    net.start_nats()
    net.wait_joined(timeout=60)
    joined_after = time.time() - restarted_at
    bed.wait_until(
        lambda: cross.resumed_at(restarted_at, streak=3),
        timeout=60,
        message="cross-server relaying did not resume after NATS came back",
    )
    resumed = cross.resumed_at(restarted_at, streak=3)
    assert resumed is not None
    local.stop()
    cross.stop()
    measured("servers_unreachable_after_s", unreachable_after)
    measured("local_ping_max_gap_during_outage_s", local_gap)
    measured("local_pings_answered_during_outage", round(local_answered, 3))
    measured("cross_server_replies_while_unreachable", cross_while_down)
    measured("servers_joined_after_nats_restart_s", joined_after)
    measured("cross_server_ping_resumed_after_nats_restart_s", resumed - restarted_at)
    record_measurements(
        bed.log_dir,
        nats_restart_rejoin_s=joined_after,
        nats_restart_cross_server_resumed_s=resumed - restarted_at,
    )
    # Local relaying went on (a lost ping or two is the machine, not the outage).
    assert local_answered > 0.75, f"only {local_answered:.0%} of the local pings answered"
    # Nothing restarted: the same processes, and no client had to log in again.
    assert all(process is not None and process.alive() for process in processes)
    assert [process.pid for process in processes if process is not None] == pids
    assert {c.name: c.status()["server"]["reconnects"] for c in cluster.clients()} == logins


def test_server_killed_clients_move_and_relaying_resumes(
    cluster: Cluster, measured: Record
) -> None:
    net, bed, a, c, d = cluster.net, cluster.bed, cluster.a, cluster.c, cluster.d
    cluster.check_alive()
    assert [net.server_of(ip) for ip in (A_IP, C_IP, D_IP)] == [0, 2, 0]
    wait_connected(net, c, d)
    watched_from = time.time()
    direct = PingLog(bed, c.ns, D_IP, name="ping-direct")
    # Every 50 ms: the failover is measured to the next request that gets through.
    relayed = PingLog(bed, a.ns, C_IP, interval=0.05, name="ping-relayed")
    bed.wait_until(
        lambda: direct.replies_after(watched_from, 3) and relayed.replies_after(watched_from, 3)
    )
    assert a.peer(C_IP)["path"] == "relay server"  # type: ignore[index]
    assert d.peer(C_IP)["path"].startswith("direct ")  # type: ignore[index]

    killed_at = net.kill(0)
    answered = bed.wait_until(
        lambda: first_answer_sent_after(relayed, killed_at),
        timeout=60,
        message="no relayed ping a -> c answered after the kill",
    )
    # srv1's clients are on srv2, the next URL in their lists, with TUN and address kept.
    bed.wait_until(
        lambda: net.server_of(A_IP) == 1 and net.server_of(D_IP) == 1,
        timeout=60,
        message="the clients of srv1 never logged in on srv2",
    )
    for client in (a, d):
        server = client.status()["server"]
        assert (server["url"], server["state"]) == (net.servers[1].url, "connected"), server
        assert client.process is not None
        assert client.process.log_text().count(f"TUN device {client.interface} up") == 1
    a_moved = first_log_line(a.process, "logged in as", after=killed_at)
    # srv1's record ages out of the others' picture of the cluster.
    bed.wait_until(
        lambda: all(len(net.server_status(i)["cluster"]["servers"]) == 2 for i in (1, 2)),
        timeout=net.ttl * 3 + 15,
        message="srv2/srv3 still list the dead srv1",
    )
    bed.wait_until(lambda: len(direct.replies(killed_at)) >= 25, timeout=30)
    watched_until = time.time()
    direct.stop()
    relayed.stop()

    failover = answered - killed_at
    gap = relayed.max_gap(killed_at, watched_until)
    login = None if a_moved is None else a_moved - killed_at
    path = record_measurements(
        bed.log_dir,
        failover_kill_to_relayed_ping_s=failover,
        failover_kill_to_login_on_srv2_s=login,
        failover_relayed_ping_max_gap_s=gap,
    )
    measured("failover_kill_to_relayed_ping_s", failover)
    measured("failover_kill_to_login_on_srv2_s", login)
    measured("failover_relayed_ping_max_gap_s", gap)
    measured("direct_ping_max_gap_s", direct.max_gap(killed_at, watched_until))
    measured("measurements_file", str(path))
    # The direct path c <-> d never noticed: no state change away from CONNECTED.
    assert not flaps(d.process, C_IP, after=watched_from), "d left CONNECTED"
    assert not flaps(c.process, D_IP, after=watched_from), "c left CONNECTED"
    for client, peer in ((c, D_IP), (d, C_IP)):
        row = client.peer(peer)
        assert row is not None and row["state"] == "CONNECTED", row
        assert row["path"].startswith("direct "), row
    net.wait_ping(a, B_IP)  # a and b share srv2 now


def test_server_cut_off_silently_clients_move_after_their_silence_timeout(
    cluster: Cluster, measured: Record
) -> None:
    """srv2's host drops off the network: no RST tells the clients, so they move only
    when their silence timeout runs out (PROTOCOL 2.3 keepalive); the direct path stays."""
    net, bed, a, c, d = cluster.net, cluster.bed, cluster.a, cluster.c, cluster.d
    cluster.check_alive(servers=(1, 2))  # srv1 died in the test before
    assert [net.server_of(ip) for ip in (A_IP, B_IP, C_IP, D_IP)] == [1, 1, 2, 1]
    wait_connected(net, c, d)
    watched_from = time.time()
    direct = PingLog(bed, c.ns, D_IP, name="ping-direct")
    relayed = PingLog(bed, a.ns, C_IP, name="ping-relayed")
    bed.wait_until(
        lambda: direct.replies_after(watched_from, 3) and relayed.replies_after(watched_from, 3)
    )

    cut_at = net.cut_off(1)
    # srv2 still lists them (it cannot tell either): ask srv3.
    bed.wait_until(
        lambda: {A_IP, B_IP, D_IP} <= set(net.sessions(2)),
        timeout=90,
        interval=0.5,
        message="the clients of srv2 never logged in on srv3",
    )
    answered = bed.wait_until(
        lambda: first_answer_sent_after(relayed, cut_at),
        timeout=30,
        message="no relayed ping a -> c answered after srv2 went",
    )
    moved = first_log_line(a.process, "logged in as", after=cut_at)
    bed.wait_until(
        lambda: len(net.server_status(2)["cluster"]["servers"]) == 1,
        timeout=net.ttl * 3 + 15,
        message="srv3 still lists srv2",
    )
    watched_until = time.time()
    direct.stop()
    relayed.stop()
    net.kill(1)  # the host never comes back

    login = None if moved is None else moved - cut_at
    record_measurements(
        bed.log_dir,
        silent_loss_to_login_on_srv3_s=login,
        silent_loss_to_relayed_ping_s=answered - cut_at,
    )
    measured("silent_loss_to_login_on_srv3_s", login)
    measured("silent_loss_to_relayed_ping_s", answered - cut_at)
    measured("direct_ping_max_gap_s", direct.max_gap(cut_at, watched_until))
    assert not flaps(d.process, C_IP, after=watched_from), "d left CONNECTED"
    assert not flaps(c.process, D_IP, after=watched_from), "c left CONNECTED"
    row = d.peer(C_IP)
    assert row is not None and row["state"] == "CONNECTED" and row["path"].startswith("direct ")
