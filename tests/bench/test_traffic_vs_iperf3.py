"""The bench traffic tool against iperf3 on the same path between two namespaces.

The veth between them is shaped with tbf to `SHAPE` in both directions, so the
path, not the CPU of this (shared, small) machine, sets the rate: both tools
must see the same TCP throughput within 10 %, and the same UDP goodput with
no loss at a rate below the shape. The unshaped veth is measured too and only
printed (there the CPU is the limit, and iperf3 is C).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.netns import Namespace, TestBed, python_argv
from tests.integration.conftest import open_testbed, require_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SHAPE = "400mbit"
SHAPE_BPS = 400e6
SECONDS = 4
UDP_RATE = 200e6
UDP_LENGTH = 1400
OWN_PORT = 5301
IPERF_PORT = 5201
SENDER_IP = "10.201.0.1"
RECEIVER_IP = "10.201.0.2"


@dataclass
class Path2:
    """Two namespaces joined by one veth, a traffic agent and iperf3 serving in the receiver."""

    bed: TestBed
    sender: Namespace
    receiver: Namespace

    def own(self, *args: str) -> dict[str, Any]:
        argv = python_argv("-m", "p2pvpn.bench.traffic", *args, RECEIVER_IP)
        done = self.sender.run([*argv, "--port", str(OWN_PORT)], timeout=120, check=False)
        last = json.loads(done.stdout.strip().splitlines()[-1])
        assert "result" in last, f"{done.stdout}\n{done.stderr}"
        result: dict[str, Any] = last["result"]
        return result

    def iperf3(self, *args: str) -> dict[str, Any]:
        argv = ["iperf3", "-c", RECEIVER_IP, "-p", str(IPERF_PORT), "-J", *args]
        done = self.sender.run(argv, timeout=120, check=False)
        report: dict[str, Any] = json.loads(done.stdout)
        assert "error" not in report, report["error"]
        return report


def _shape(ns: Namespace, ifname: str) -> None:
    tbf = ["tbf", "rate", SHAPE, "burst", "256kb", "latency", "50ms"]
    ns.run(["tc", "qdisc", "add", "dev", ifname, "root", *tbf])


def _path(bed: TestBed, *, shaped: bool) -> Path2:
    sender = bed.namespace("tx")
    receiver = bed.namespace("rx")
    link = bed.link(sender, receiver, f"{SENDER_IP}/24", f"{RECEIVER_IP}/24")
    if shaped:
        _shape(sender, link.ifname(sender))
        _shape(receiver, link.ifname(receiver))
    agent = bed.start_python(
        receiver,
        ["-m", "p2pvpn.bench.traffic", "serve", RECEIVER_IP, "--port", str(OWN_PORT)],
        "traffic-serve",
    )
    agent.wait_for_log(r"listening ", timeout=30)
    bed.start(receiver, ["iperf3", "-s", "-B", RECEIVER_IP, "-p", str(IPERF_PORT)], "iperf3-s")
    bed.wait_until(
        lambda: receiver.listening("tcp", IPERF_PORT), timeout=30, message="iperf3 -s listening"
    )
    return Path2(bed, sender, receiver)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[TestBed]:
    require_tool("iperf3")
    require_tool("tc", "iproute2")
    with open_testbed(tmp_path / "logs") as testbed:
        yield testbed


def test_tcp_agrees_with_iperf3_on_a_shaped_veth(bed: TestBed) -> None:
    path = _path(bed, shaped=True)
    own = path.own("tcp", "--seconds", str(SECONDS))["bits_per_second"]
    iperf = path.iperf3("-t", str(SECONDS))["end"]["sum_received"]["bits_per_second"]
    print(f"shaped {SHAPE} TCP: own {own / 1e6:.1f} Mbit/s, iperf3 {iperf / 1e6:.1f} Mbit/s")
    assert own == pytest.approx(iperf, rel=0.10)
    assert own < SHAPE_BPS * 1.05  # the shape was the limit, as for iperf3


def test_udp_agrees_with_iperf3_below_the_shape(bed: TestBed) -> None:
    path = _path(bed, shaped=True)
    own = path.own(
        "udp", "--seconds", str(SECONDS), "--rate", str(UDP_RATE), "--length", str(UDP_LENGTH)
    )
    report = path.iperf3("-u", "-b", str(int(UDP_RATE)), "-l", str(UDP_LENGTH), "-t", str(SECONDS))
    iperf = report["end"]["sum"]
    print(
        f"shaped {SHAPE} UDP at {UDP_RATE / 1e6:g} Mbit/s: own {own['received_bps'] / 1e6:.1f} "
        f"Mbit/s loss {own['loss_percent']:.2f} %, iperf3 {iperf['bits_per_second'] / 1e6:.1f} "
        f"Mbit/s loss {iperf['lost_percent']:.2f} %"
    )
    assert own["loss_percent"] < 1.0
    assert iperf["lost_percent"] < 1.0
    assert own["received_bps"] == pytest.approx(iperf["bits_per_second"], rel=0.10)
