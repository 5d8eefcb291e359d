"""ExitNodeOffer for real, in a namespace of its own (root, nft): the nft table and
ip_forward while it offers, nothing after close, and remove_stale after a SIGKILL.

The offer runs in a Python process inside the namespace, so the nft command
and /proc/sys/net it touches are the namespace's; the test looks in from
outside with ``ip netns exec``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from p2pvpn.client.exit_node import STATE_FILE, table_name
from p2pvpn.netns import Namespace, Process, TestBed
from tests.integration.conftest import require_tool

pytestmark = pytest.mark.usefixtures("no_namespace_left_behind")

INTERFACE = "p2pvpn-exit"
VPN = "10.77.0.0/24"

# Offers, says so, waits for the test's "stop" file, withdraws, says so.
OFFER = """
import asyncio, sys, time
from ipaddress import IPv4Network
from pathlib import Path
from p2pvpn.client.exit_node import ExitNodeOffer

class Plane:
    def set_forwarded_wrap(self, network):
        print("wrap", network, flush=True)

async def main(state_dir: Path, network: str) -> None:
    offer = ExitNodeOffer(sys.argv[1], state_dir)
    await offer.start(IPv4Network(network), Plane())
    print("offering", offer.snapshot()["masquerade"], flush=True)
    while not (state_dir / "stop").exists():
        await asyncio.sleep(0.05)
    await offer.close()
    print("closed", flush=True)

asyncio.run(main(Path(sys.argv[2]), sys.argv[3]))
"""

REMOVE_STALE = """
import sys
from pathlib import Path
from p2pvpn.client.exit_node import ExitNodeOffer

print("removed" if ExitNodeOffer.remove_stale(Path(sys.argv[1])) else "nothing")
"""


def exit_namespace(testbed: TestBed) -> Namespace:
    """A namespace whose default route leaves by "wan0" (a veth to another), forwarding off."""
    require_tool("nft", "nftables")
    ns = testbed.namespace("exit")
    internet = testbed.namespace("internet")
    ns.add_veth("wan0", internet, "lan0")
    ns.add_address("wan0", "192.0.2.2/24")
    internet.add_address("lan0", "192.0.2.1/24")
    ns.default_route("192.0.2.1")
    ns.write_sysctl("net/ipv4/ip_forward", "0")
    return ns


def ip_forward(ns: Namespace) -> str:
    return ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()


def our_table(ns: Namespace) -> str | None:
    """The ruleset of the offer's table; None when there is none."""
    done = ns.run(["nft", "list", "table", "ip", table_name(INTERFACE)], check=False)
    return done.stdout if done.returncode == 0 else None


def start_offer(testbed: TestBed, ns: Namespace, state_dir: Path) -> Process:
    process = testbed.start_python(ns, ["-c", OFFER, INTERFACE, str(state_dir), VPN], "offer")
    process.wait_for_log(r"offering .* out of wan0")
    return process


def test_offer_then_close_leaves_the_namespace_as_it_was(testbed: TestBed, tmp_path: Path) -> None:
    ns = exit_namespace(testbed)
    state_dir = tmp_path / "state"
    process = start_offer(testbed, ns, state_dir)
    assert ip_forward(ns) == "1"
    table = our_table(ns)
    assert table is not None
    assert "ip saddr 10.77.0.0/24" in table and f'oifname != "{INTERFACE}"' in table
    assert "masquerade" in table
    assert (state_dir / STATE_FILE).exists()
    assert f"wrap {VPN}" in process.log_text()

    (state_dir / "stop").touch()
    process.wait_for_log("closed")
    assert process.wait(timeout=30) == 0
    assert ip_forward(ns) == "0"
    assert our_table(ns) is None
    assert not (state_dir / STATE_FILE).exists()


def test_remove_stale_cleans_up_after_a_sigkill(testbed: TestBed, tmp_path: Path) -> None:
    ns = exit_namespace(testbed)
    state_dir = tmp_path / "state"
    process = start_offer(testbed, ns, state_dir)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    # What a killed run leaves: its note, its table, forwarding on.
    assert (state_dir / STATE_FILE).exists()
    assert our_table(ns) is not None
    assert ip_forward(ns) == "1"

    assert ns.python(REMOVE_STALE, str(state_dir)).stdout.strip() == "removed"
    assert our_table(ns) is None
    assert ip_forward(ns) == "0"
    assert not (state_dir / STATE_FILE).exists()
    assert ns.python(REMOVE_STALE, str(state_dir)).stdout.strip() == "nothing"
