"""Tests of p2pvpn.client.tun.

The device tests need root and run their code in a network namespace of their
own (a child ``python -c`` inside ``ip netns exec``), so nothing touches the
host's interfaces. A TUN device lives as long as its fd, so every check on a
device happens inside the child, which prints its findings as JSON.
"""

import errno
import json
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from p2pvpn.client import tun
from p2pvpn.client.tun import MAX_NAME_LENGTH, TunDevice, TunError, validate_name
from p2pvpn.netns import Namespace, run_namespace
from tests.integration.conftest import require_netns

# -- no root needed ------------------------------------------------------------


def test_name_of_15_characters_is_accepted() -> None:
    assert MAX_NAME_LENGTH == 15
    validate_name("p" * 15)


def test_too_long_name_is_rejected_before_touching_the_system() -> None:
    with pytest.raises(ValueError, match=r"16 bytes long; Linux allows at most 15"):
        TunDevice.open("p2pvpn-too-long0", 1400)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "tun:0", "é" * 8])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="TUN device name"):
        validate_name(name)


def test_bad_mtu_is_rejected() -> None:
    with pytest.raises(ValueError, match="MTU 20"):
        TunDevice.open("p2pvpn0", 20)


def test_missing_tun_node_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(TunError) as info:
        TunDevice.open("p2pvpn0", 1400)
    message = str(info.value)
    assert message.startswith("cannot open /nonexistent/net/tun: No such file or directory")
    assert "modprobe tun" in message
    assert info.value.errno == 2


# -- in a namespace (root) ---------------------------------------------------------

PRELUDE = """\
import asyncio, errno, fcntl, json, logging, os, select, socket, subprocess, sys
from ipaddress import IPv4Interface, IPv4Network
logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)
from p2pvpn.client.tun import TunDevice, TunError

def ip_json(*args):
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []

def link_exists(name):
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0

def routes(dev=None):
    return [r["dst"] for r in ip_json("-4", "route", "show", *(["dev", dev] if dev else []))]

result = {}
"""


@pytest.fixture
def ns() -> Iterator[Namespace]:
    require_netns()
    with run_namespace("tun") as namespace:
        yield namespace


def run_in(ns: Namespace, body: str) -> tuple[dict[str, Any], str]:
    """Run ``body`` after PRELUDE in ``ns``; returns its ``result`` dict and its log (stderr)."""
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    completed = ns.python(code, timeout=60)
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result, completed.stderr


@pytest.mark.netns
def test_open_and_configure(ns: Namespace) -> None:
    result, log = run_in(
        ns,
        """
        dev = TunDevice.open("p2pvpn0", 1400)
        result["name"], result["index"] = dev.name, dev.index
        result["offloads"] = list(dev.offloads)
        result["nonblocking"] = bool(fcntl.fcntl(dev.fd, fcntl.F_GETFL) & os.O_NONBLOCK)
        result["mtu_after_open"] = ip_json("link", "show", "dev", "p2pvpn0")[0]["mtu"]
        dev.configure(IPv4Interface("10.77.0.2/24"), 1380)
        result["link"] = ip_json("addr", "show", "dev", "p2pvpn0")[0]
        result["routes"] = routes("p2pvpn0")

        # IFF_TUN | IFF_NO_PI: a datagram routed to the device comes out of the fd
        # as a bare IPv4 packet.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(b"hello tun", ("10.77.0.9", 9999))
        packet = b""
        while True:
            assert select.select([dev.fd], [], [], 10)[0], "nothing to read from the TUN fd"
            packet = os.read(dev.fd, 65535)
            if packet[0] >> 4 == 4 and packet[9] == 17:
                break
        result["packet_dst"] = socket.inet_ntoa(packet[16:20])
        result["packet_tail"] = packet[-9:].decode()
        try:
            os.read(dev.fd, 65535)
            result["second_read"] = "data"
        except BlockingIOError:
            result["second_read"] = "would block"
        dev.close()
        """,
    )
    link = result["link"]
    assert result["name"] == "p2pvpn0"
    assert result["index"] == link["ifindex"]
    assert result["offloads"] == []
    assert result["nonblocking"] is True
    assert result["mtu_after_open"] == 1400
    assert link["mtu"] == 1380
    assert "UP" in link["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert inet == [("10.77.0.2", 24)]
    assert result["routes"] == ["10.77.0.0/24"]
    assert result["packet_dst"] == "10.77.0.9"
    assert result["packet_tail"] == "hello tun"
    assert result["second_read"] == "would block"
    assert "TUN device p2pvpn0 up: address 10.77.0.2/24, MTU 1380" in log


@pytest.mark.netns
def test_reconfigure_replaces_the_address(ns: Namespace) -> None:
    result, _ = run_in(
        ns,
        """
        with TunDevice.open("p2pvpn0", 1400) as dev:
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)  # same again: fine
            dev.configure(IPv4Interface("10.78.0.5/16"), 1300)
            link = ip_json("addr", "show", "dev", "p2pvpn0")[0]
            result["inet"] = [a["local"] + "/" + str(a["prefixlen"])
                              for a in link["addr_info"] if a["family"] == "inet"]
            result["mtu"] = link["mtu"]
        """,
    )
    assert result == {"inet": ["10.78.0.5/16"], "mtu": 1300}


@pytest.mark.netns
def test_routes_add_remove_idempotent(ns: Namespace) -> None:
    result, log = run_in(
        ns,
        """
        with TunDevice.open("p2pvpn0", 1400) as dev:
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
            dev.add_route(IPv4Network("10.88.0.0/16"))
            dev.add_route(IPv4Network("10.88.0.0/16"))  # exists already: not an error
            dev.add_route(IPv4Network("192.168.50.0/24"))
            dev.add_route(IPv4Network("10.77.0.0/24"))  # the kernel's prefix route: not ours
            result["added"] = routes("p2pvpn0")
            result["tracked"] = [str(n) for n in dev.routes]
            dev.remove_route(IPv4Network("10.88.0.0/16"))
            dev.remove_route(IPv4Network("10.88.0.0/16"))  # gone already: not an error
            result["after_remove"] = routes("p2pvpn0")
        """,
    )
    assert sorted(result["added"]) == ["10.77.0.0/24", "10.88.0.0/16", "192.168.50.0/24"]
    assert result["tracked"] == ["10.88.0.0/16", "192.168.50.0/24"]
    assert sorted(result["after_remove"]) == ["10.77.0.0/24", "192.168.50.0/24"]
    assert log.count("route 10.88.0.0/16 via p2pvpn0 added") == 1
    assert log.count("route 10.88.0.0/16 via p2pvpn0 removed") == 1
    assert "route 192.168.50.0/24 via p2pvpn0 removed" in log  # by close()


@pytest.mark.netns
def test_route_owned_by_another_device_is_an_error(ns: Namespace) -> None:
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.set_up("v0")
    ns.set_up("v1")
    ns.ip("route", "add", "10.99.0.0/16", "dev", "v0")
    result, _ = run_in(
        ns,
        """
        with TunDevice.open("p2pvpn0", 1400) as dev:
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
            try:
                dev.add_route(IPv4Network("10.99.0.0/16"))
            except TunError as exc:
                result["error"] = str(exc)
            result["tracked"] = [str(n) for n in dev.routes]
        """,
    )
    assert "already exists via another device" in result["error"]
    assert result["tracked"] == []
    assert [r["dev"] for r in ns.routes() if r["dst"] == "10.99.0.0/16"] == ["v0"]


@pytest.mark.netns
def test_close_removes_routes_address_and_device(ns: Namespace) -> None:
    result, log = run_in(
        ns,
        """
        dev = TunDevice.open("p2pvpn0", 1400)
        dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
        dev.add_route(IPv4Network("10.88.0.0/16"))
        result["before"] = link_exists("p2pvpn0")
        dev.close()
        dev.close()  # idempotent
        result["closed"] = dev.closed
        result["after"] = link_exists("p2pvpn0")
        result["routes_after"] = routes()
        try:
            dev.add_route(IPv4Network("10.89.0.0/16"))
        except TunError as exc:
            result["use_after_close"] = str(exc)
        """,
    )
    assert result["before"] is True
    assert result["closed"] is True
    assert result["after"] is False
    assert result["routes_after"] == []
    assert result["use_after_close"] == "TUN device p2pvpn0 is closed"
    assert "route 10.88.0.0/16 via p2pvpn0 removed" in log
    assert log.count("TUN device p2pvpn0 closed") == 1
    assert "p2pvpn0" not in ns.interfaces()


@pytest.mark.netns
def test_name_template_and_index(ns: Namespace) -> None:
    result, _ = run_in(
        ns,
        """
        with TunDevice.open("p2pt%d", 1400) as first, TunDevice.open("p2pt%d", 1400) as second:
            result["names"] = [first.name, second.name]
            result["indices_ok"] = [
                first.index == socket.if_nametoindex(first.name),
                second.index == socket.if_nametoindex(second.name),
            ]
        """,
    )
    assert result["names"] == ["p2pt0", "p2pt1"]
    assert result["indices_ok"] == [True, True]


@pytest.mark.netns
def test_remove_stale_deletes_a_leftover_tun_only(ns: Namespace) -> None:
    ns.ip("tuntap", "add", "dev", "p2pvpn0", "mode", "tun")  # persistent: outlives its creator
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    assert "p2pvpn0" in ns.interfaces()
    result, log = run_in(
        ns,
        """
        result["first"] = TunDevice.remove_stale("p2pvpn0")
        result["second"] = TunDevice.remove_stale("p2pvpn0")
        try:
            TunDevice.remove_stale("v0")
        except TunError as exc:
            result["veth"] = str(exc)
        # The name is free again for a new device.
        with TunDevice.open("p2pvpn0", 1400) as dev:
            result["reopened"] = dev.name
        """,
    )
    assert result["first"] is True
    assert result["second"] is False
    assert "not a TUN device (kind veth); refusing to delete it" in result["veth"]
    assert result["reopened"] == "p2pvpn0"
    assert "WARNING p2pvpn.client.tun: deleting stale TUN device p2pvpn0" in log
    assert sorted(ns.interfaces()) == ["lo", "v0", "v1"]


@pytest.mark.netns
def test_works_inside_a_running_event_loop(ns: Namespace) -> None:
    """pyroute2 0.9's sync API breaks inside a running loop; tun.py must not."""
    result, _ = run_in(
        ns,
        """
        async def main():
            with TunDevice.open("p2pvpn0", 1400) as dev:
                dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
                dev.add_route(IPv4Network("10.88.0.0/16"))
                result["routes"] = sorted(routes("p2pvpn0"))
                dev.remove_route(IPv4Network("10.88.0.0/16"))
            result["after"] = link_exists("p2pvpn0")
            result["stale"] = TunDevice.remove_stale("p2pvpn0")
        asyncio.run(main())
        """,
    )
    assert result == {"routes": ["10.77.0.0/24", "10.88.0.0/16"], "after": False, "stale": False}


@pytest.mark.netns
def test_unprivileged_user_gets_a_clear_message(ns: Namespace) -> None:
    result, _ = run_in(
        ns,
        """
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            TunDevice.open("p2pvpn0", 1400)
        except TunError as exc:
            result["error"] = str(exc)
            result["errno"] = exc.errno
        """,
    )
    assert "p2pvpn run needs root or CAP_NET_ADMIN" in result["error"]
    assert result["errno"] in (1, 13)  # EPERM (ioctl) or EACCES (open)


# -- TUN offloads (IFF_VNET_HDR, TUNSETOFFLOAD) ----------------------------------------

# The child's helpers: read one UDP datagram that a local socket sends into the
# device, and count (or refuse) the ioctls that tun.py makes.
OFFLOAD_HELPERS = """
import struct
from p2pvpn.client import tun
from p2pvpn.wire.virtio import HEADER_LENGTH, decode_virtio_header

def read_udp_from(dev, payload):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(payload, ("10.77.0.9", 9999))
    sock.close()
    while True:
        assert select.select([dev.fd], [], [], 10)[0], "nothing to read from the TUN fd"
        data = os.read(dev.fd, 65535)
        if data.endswith(payload):
            return data

def tun_flags(name):
    with open(f"/sys/class/net/{name}/tun_flags") as flags:
        return int(flags.read(), 16)

ioctls = []
real_ioctl = fcntl.ioctl

def recording_ioctl(fd, request, arg=0, *rest):
    if request == tun.TUNSETOFFLOAD:
        ioctls.append(["offload", arg])
        if refuse(arg):
            raise OSError(REFUSED_ERRNO, os.strerror(REFUSED_ERRNO))
    elif request == tun.TUNSETIFF:
        ioctls.append(["iff", struct.unpack("16sH22x", arg)[1]])
    return real_ioctl(fd, request, arg, *rest)

fcntl.ioctl = recording_ioctl
"""

IFF_TUN_NO_PI = 0x1001
IFF_VNET_HDR = 0x4000
ALL_OFFLOADS = 0x63  # TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4 | TUN_F_USO6 (Linux: both or none)
TCP_OFFLOADS = 0x03  # TUN_F_CSUM | TUN_F_TSO4


def run_offloaded(ns: Namespace, refuse: str, body: str) -> tuple[dict[str, Any], str]:
    """`run_in` with OFFLOAD_HELPERS; ``refuse`` is a Python expression of ``arg``
    (the TUNSETOFFLOAD flags) that makes the ioctl fail with ``REFUSED_ERRNO``."""
    setup = f"def refuse(arg):\n    return {refuse}\n" + OFFLOAD_HELPERS
    return run_in(ns, setup + textwrap.dedent(body))


@pytest.mark.netns
def test_offload_device_reads_start_with_a_virtio_header(ns: Namespace) -> None:
    result, log = run_offloaded(
        ns,
        "False",
        """
        with TunDevice.open("p2pvpn0", 1400, offload=True) as dev:
            result["offloads"] = list(dev.offloads)
            result["vnet_hdr"] = bool(tun_flags("p2pvpn0") & tun.IFF_VNET_HDR)
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
            data = read_udp_from(dev, b"hello offload")
            header = decode_virtio_header(data)
            result["gso_type"] = header.gso_type
            packet = data[HEADER_LENGTH:]
            result["version"], result["protocol"] = packet[0] >> 4, packet[9]
            result["length_ok"] = int.from_bytes(packet[2:4], "big") == len(packet)
        result["ioctls"] = ioctls
        """,
    )
    # Linux 6.2 and later take USO4 as well; older kernels the TCP offloads only.
    assert result["offloads"] in (["csum", "tso4", "uso4"], ["csum", "tso4"])
    assert result["vnet_hdr"] is True
    assert result["gso_type"] == 0  # one small datagram: nothing to segment
    assert (result["version"], result["protocol"]) == (4, 17)
    assert result["length_ok"] is True
    # One probe per open: TUNSETIFF once, TUNSETOFFLOAD once or twice (without USO4).
    assert result["ioctls"][:2] == [
        ["iff", IFF_TUN_NO_PI | IFF_VNET_HDR],
        ["offload", ALL_OFFLOADS],
    ]
    offloads = "+".join(result["offloads"])
    assert f"TUN device p2pvpn0: offloads {offloads} (virtio-net header" in log
    assert "WARNING" not in log
    assert ns.interfaces() == ["lo"]


@pytest.mark.netns
def test_offload_without_uso4_keeps_csum_and_tso4(ns: Namespace) -> None:
    result, log = run_offloaded(
        ns,
        "arg & 0x60",  # a kernel before 6.2: TUN_F_USO4/6 unknown, the set refused
        """
        REFUSED_ERRNO = errno.EINVAL
        with TunDevice.open("p2pvpn0", 1400, offload=True) as dev:
            result["offloads"] = list(dev.offloads)
            result["vnet_hdr"] = bool(tun_flags("p2pvpn0") & tun.IFF_VNET_HDR)
        result["ioctls"] = ioctls
        """,
    )
    assert result["offloads"] == ["csum", "tso4"]
    assert result["vnet_hdr"] is True
    assert result["ioctls"] == [
        ["iff", IFF_TUN_NO_PI | IFF_VNET_HDR],
        ["offload", ALL_OFFLOADS],
        ["offload", TCP_OFFLOADS],
    ]
    assert "TUN device p2pvpn0: offloads csum+tso4 (virtio-net header" in log
    assert "WARNING" not in log
    assert ns.interfaces() == ["lo"]


@pytest.mark.netns
@pytest.mark.parametrize(
    ("refused", "offload_calls"),
    [
        # EINVAL: the full set and then csum+tso4 are asked for before giving up.
        ("EINVAL", [ALL_OFFLOADS, TCP_OFFLOADS]),
        # Any other refusal is not about USO4: no second attempt.
        ("EPERM", [ALL_OFFLOADS]),
    ],
)
def test_refused_offloads_give_a_plain_device(
    ns: Namespace, refused: str, offload_calls: list[int]
) -> None:
    result, log = run_offloaded(
        ns,
        "True",
        f"""
        REFUSED_ERRNO = errno.{refused}
        with TunDevice.open("p2pt%d", 1400, offload=True) as dev:
            result["name"] = dev.name
            result["offloads"] = list(dev.offloads)
            result["vnet_hdr"] = bool(tun_flags(dev.name) & tun.IFF_VNET_HDR)
            result["links"] = [link["ifname"] for link in ip_json("link", "show")]
            dev.configure(IPv4Interface("10.77.0.2/24"), 1400)
            packet = read_udp_from(dev, b"hello plain")
            result["version"], result["protocol"] = packet[0] >> 4, packet[9]
        result["ioctls"] = ioctls
        result["links_after"] = [link["ifname"] for link in ip_json("link", "show")]
        """,
    )
    assert result["name"] == "p2pt0"  # the name the template gave the first device
    assert result["offloads"] == []
    assert result["vnet_hdr"] is False
    assert result["links"] == ["lo", "p2pt0"]  # the refused device is gone
    assert (result["version"], result["protocol"]) == (4, 17)  # a bare IPv4 packet
    assert result["ioctls"] == [
        ["iff", IFF_TUN_NO_PI | IFF_VNET_HDR],
        *(["offload", flags] for flags in offload_calls),
        ["iff", IFF_TUN_NO_PI],
    ]
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING p2pvpn.client.tun: TUN device p2pt0 refuses offloads (TUNSETOFFLOAD: "
        f"{os.strerror(getattr(errno, refused))} ({refused})); opening it without them"
    ]
    assert "offloads csum" not in log
    assert result["links_after"] == ["lo"]
    assert ns.interfaces() == ["lo"]
