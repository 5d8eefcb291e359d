"""What a real `p2pvpn run` accepts from a hostile server, checked in the kernel's routing table.

A fake server (routes_support.py, in its own namespace) logs the client in
and sends grants and sdwan ROUTE sets that try to capture the client's own
underlay; `ip -4 route show` in the client's namespace must show only the
good routes, the set must be applied as a difference across a reconnect, and
every route must be gone when the client exits.
"""

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.netns import CommandError, Namespace, Process, TestBed
from p2pvpn.netns._process import p2pvpn_argv

pytestmark = pytest.mark.usefixtures("no_namespace_left_behind")

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "route-safety"
PORT = 8080
SERVER = "10.10.0.1"
GATEWAY = "10.10.0.254"
STUN = "10.10.0.77"
OWN = "10.77.0.11"
PEER = "10.77.0.12"
PEER_PUBLIC = "203.0.113.9"
GOOD = "172.30.0.0/16"
WITHDRAWN = "172.31.0.0/16"
ADDED_LATER = "172.28.0.0/16"

# destination -> the start of the reason the client must give for refusing it
HOSTILE: dict[str, tuple[str, str]] = {
    "0.0.0.0/0": (PEER, "the default route shorter than /8"),
    "0.0.0.0/1": (PEER, "a prefix shorter than /8"),
    f"{SERVER}/32": (PEER, f"would capture the server's address {SERVER}"),
    f"{STUN}/32": (PEER, f"would capture the STUN server's address {STUN}"),
    "203.0.113.0/24": (PEER, f"would capture the peer endpoint {PEER_PUBLIC}"),
    f"{GATEWAY}/32": (PEER, f"would capture the default gateway {GATEWAY}"),
    "10.10.0.128/26": (PEER, "overlaps the LAN subnet 10.10.0.0/24"),
    "127.0.0.0/8": (PEER, "reaches into loopback"),
    "169.254.0.0/16": (PEER, "reaches into link-local"),
    "239.0.0.0/8": (PEER, "reaches into multicast"),
    "10.77.0.128/25": (PEER, "overlaps the VPN network 10.77.0.0/24"),
    "172.29.0.0/16": ("10.99.0.1", "next hop 10.99.0.1 is outside the VPN network"),
}


def hostile_steps() -> list[dict[str, Any]]:
    hostile = [[destination, nexthop] for destination, (nexthop, _) in HOSTILE.items()]
    first = [[GOOD, PEER], [WITHDRAWN, PEER], *hostile]
    # 150 filler routes via ourselves push the set over one message of 100 entries.
    filler = [[f"172.16.{i}.0/24", OWN] for i in range(150)]
    return [
        {"grant": f"{OWN}/4"},  # refused: a prefix shorter than /8, then retried
        {
            "grant": f"{OWN}/24",
            "udp4conn": [[PEER, OWN, PEER_PUBLIC, 5000]],
            "routes": [*first, *filler],
        },
        {"grant": f"{OWN}/24", "routes": [[GOOD, PEER], [ADDED_LATER, PEER], *hostile]},
    ]


def destinations(ns: Namespace) -> set[str]:
    return {str(route.get("dst")) for route in ns.routes()}


def status(ns: Namespace, state_dir: Path, *extra: str) -> str:
    argv = p2pvpn_argv("status", *extra, "--state-dir", str(state_dir), "-n", "rt")
    return ns.run(argv, check=True).stdout


def start(
    testbed: TestBed, tmp_path: Path, steps: list[dict[str, Any]], *client_flags: str
) -> tuple[Namespace, Process, Process, Path]:
    """The fake server following ``steps`` and a client of it, on one segment."""
    server_ns, client_ns = testbed.namespace("srv"), testbed.namespace("cli")
    testbed.segment("wan", "10.10.0.0/24", [server_ns, client_ns])
    client_ns.default_route(GATEWAY)
    plan_path = tmp_path / "plan.json"
    plan = {"password": PASSWORD, "port": PORT, "dir": str(tmp_path), "steps": steps}
    plan_path.write_text(json.dumps(plan))
    args = ["-m", "tests.integration.routes_support", str(plan_path)]
    server = testbed.start_python(server_ns, args, "fake-server", cwd=ROOT)
    server.wait_for_log("listening")
    state_dir = tmp_path / "state"
    argv = ["run", "-w", f"ws://{SERVER}:{PORT}/", "-p", PASSWORD, "-n", "rt"]
    client = testbed.start_p2pvpn(
        client_ns, [*argv, "--state-dir", str(state_dir), *client_flags], "client"
    )
    return client_ns, server, client, state_dir


def test_hostile_grants_and_routes_are_refused_and_sets_are_diffed(
    testbed: TestBed, tmp_path: Path
) -> None:
    client_ns, server, client, state_dir = start(
        testbed, tmp_path, hostile_steps(), "-s", f"stun://{STUN}:3478"
    )

    # The /4 grant is refused and retried, not fatal.
    client.wait_for_log(r"granted the address 10\.77\.0\.11/4, which has a prefix shorter")
    server.wait_for_log("connection 1 sent")
    testbed.wait_until(
        lambda: {GOOD, WITHDRAWN} <= destinations(client_ns),
        timeout=30,
        message="the good routes never appeared",
    )

    def refused() -> dict[str, str] | None:
        rows = json.loads(status(client_ns, state_dir, "--json"))["sysroutes_refused"]
        found = {row["network"]: row["reason"] for row in rows}
        return found if set(HOSTILE) <= set(found) else None

    reasons = testbed.wait_until(
        refused, timeout=30, message="refusals never all shown", ignore=(CommandError,)
    )
    for destination, (_, reason) in HOSTILE.items():
        assert reasons[destination].startswith(reason), (destination, reasons[destination])
    installed = destinations(client_ns)
    assert not set(HOSTILE) & installed
    assert not any(destination.startswith("172.16.") for destination in installed)
    assert "default" in installed  # ours, via the gateway, untouched
    text = status(client_ns, state_dir)
    assert "REFUSED SYSROUTE" in text and "reaches into loopback" in text

    # A reconnect with a new set: the withdrawn route goes, the new one comes,
    # the unchanged one stays (added once only), refusals are not logged again.
    (tmp_path / "advance-1").touch()
    server.wait_for_log("connection 2 sent")
    testbed.wait_until(
        lambda: ADDED_LATER in (now := destinations(client_ns)) and WITHDRAWN not in now,
        timeout=30,
        message="the new set was never applied",
    )
    assert GOOD in destinations(client_ns)
    log = client.log_text()
    assert len(re.findall(rf"route {re.escape(GOOD)} via p2pvpn-rt added", log)) == 1
    assert len(re.findall(r"sdwan route 127\.0\.0\.0/8 via \S+ refused", log)) == 1

    # Exit: every route goes with the client.
    client.send_signal(signal.SIGTERM)
    assert client.wait(30) == 0
    left = destinations(client_ns)
    assert not {GOOD, ADDED_LATER, WITHDRAWN} & left, left
    assert "default" in left


OFFER = [[GOOD, PEER], [WITHDRAWN, PEER], ["128.0.0.0/2", PEER], ["172.29.0.0/16", "10.99.0.1"]]


@pytest.mark.parametrize(
    ("policy", "installed", "refused"),
    [
        ("none", set(), dict.fromkeys([GOOD, WITHDRAWN, "128.0.0.0/2", "172.29.0.0/16"], "accept")),
        (
            "172.30.0.0/16,172.29.0.0/16",
            {GOOD},
            {
                WITHDRAWN: "outside the networks of accept_routes",
                "128.0.0.0/2": "outside the networks of accept_routes",
                "172.29.0.0/16": "next hop 10.99.0.1 is outside the VPN network",
            },
        ),
        ("all", {GOOD, WITHDRAWN, "128.0.0.0/2", "172.29.0.0/16"}, {}),
    ],
)
def test_accept_routes_policies(
    testbed: TestBed, tmp_path: Path, policy: str, installed: set[str], refused: dict[str, str]
) -> None:
    steps = [{"grant": f"{OWN}/24", "routes": OFFER}]
    client_ns, _, _, state_dir = start(testbed, tmp_path, steps, "--accept-routes", policy)

    def judged() -> dict[str, str] | None:
        snapshot = json.loads(status(client_ns, state_dir, "--json"))
        done = {row["network"]: "" for row in snapshot["sysroutes"]}
        done |= {row["network"]: row["reason"] for row in snapshot["sysroutes_refused"]}
        return done if len(done) == len(OFFER) else None

    reasons = testbed.wait_until(
        judged, timeout=30, message="the offer was never judged", ignore=(CommandError,)
    )
    for destination, reason in refused.items():
        assert reasons[destination].startswith(reason), (destination, reasons[destination])
    testbed.wait_until(
        lambda: installed <= destinations(client_ns), timeout=30, message="routes missing"
    )
    assert not (set(refused) & destinations(client_ns))


def test_routes_go_when_repeated_kicks_stop_the_client(testbed: TestBed, tmp_path: Path) -> None:
    kick = {"grant": f"{OWN}/24", "close": [4004, "another client logged in"]}
    steps = [{"grant": f"{OWN}/24", "routes": [[GOOD, PEER]]}, kick, kick, kick]
    client_ns, _, client, _ = start(testbed, tmp_path, steps)
    testbed.wait_until(
        lambda: GOOD in destinations(client_ns), timeout=30, message="the route never appeared"
    )
    (tmp_path / "advance-0").touch()
    # One kick is retried (the route stays meanwhile); the third in a row is fatal.
    client.wait_for_log("another client logged in.*; retrying")
    assert client.wait(60) == 1
    assert "3 times in a row" in client.log_text()
    assert GOOD not in destinations(client_ns)
