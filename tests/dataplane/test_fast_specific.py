"""What only the compiled data plane can show: its workers need neither the
GIL nor the event loop, its upward queue is bounded, it cleans up after a
plane that is never closed, and it agrees with the pure data plane counter
for counter on a scenario that takes every branch of the packet path.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from p2pvpn.dataplane.base import DataPlaneStats, DropReason, UdpAddress
from p2pvpn.wire.crypto import DatagramCipher, peer_key
from p2pvpn.wire.ipv4 import encapsulate_ipip
from p2pvpn.wire.peer import Heartbeat
from p2pvpn.wire.stun import encode_binding_response
from tests.dataplane.conftest import PASSWORD, Node, eventually, ipv4_packet

pytestmark = pytest.mark.fastpath

A, B, C, D = "10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"
QUEUE_FULL = "queue_full"
MARKER = b"\x07end of scenario"
STUN_ANSWER = encode_binding_response(bytes(12), (IPv4Address("192.0.2.1"), 32853))


def fast_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("p2pvpn-fast")}


def test_workers_move_packets_while_the_gil_is_held() -> None:
    """The main thread spins in Python with a huge switch interval, so it
    never lets go of the GIL: packets still go A -> B -> B's TUN."""
    count = 100

    async def body() -> None:
        a, b = Node("fast", A), Node("fast", B)
        try:
            b.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            a.plane.start()
            b.plane.start()
            a.plane.set_peer(b.tun_ip, b.address, b.key)
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1000.0)
            try:
                a.inject(*(ipv4_packet(A, B, ident=n) for n in range(count)))
                deadline = time.monotonic() + 10
                while b.plane.stats().tun_packets_out < count and time.monotonic() < deadline:
                    pass
            finally:
                sys.setswitchinterval(interval)
            assert b.plane.stats().tun_packets_out == count
            assert len(b.delivered()) == count
        finally:
            a.close()
            b.close()

    asyncio.run(body())


def test_a_full_upward_queue_drops_and_counts_instead_of_waiting() -> None:
    """With the loop blocked nobody drains the queue; the TUN worker must not wait."""
    count, size = 150, 60000  # ~9 MB of relay packets, the queue holds 4 MB

    async def body() -> None:
        a = Node("fast", A)
        try:
            a.plane.start()
            packet = ipv4_packet(A, B, b"r" * size)

            def inject() -> None:
                for _ in range(count):
                    while True:
                        try:
                            a.kernel.send(packet)
                            break
                        except BlockingIOError:
                            time.sleep(0.0005)

            injector = threading.Thread(target=inject)
            injector.start()
            # Blocks the loop (no await) but not the GIL (sleep releases it).
            deadline = time.monotonic() + 20
            while a.plane.stats().tun_packets_in < count and time.monotonic() < deadline:
                time.sleep(0.005)
            injector.join()
            stats = a.plane.stats()
            assert stats.tun_packets_in == count
            assert stats.drops.get(QUEUE_FULL, 0) > 0
            assert stats.relay_packets_out > 0
            assert stats.relay_packets_out + stats.drops[QUEUE_FULL] == count
            await eventually(lambda: len(a.events.relay) == stats.relay_packets_out)
            assert a.events.relay == [packet] * stats.relay_packets_out
        finally:
            a.close()

    asyncio.run(body())


def test_a_plane_that_is_never_closed_stops_its_workers_when_collected() -> None:
    node = Node("fast", A)
    before = fast_threads()

    async def body() -> None:
        node.plane.start()
        node.inject(ipv4_packet(A, B))
        await eventually(lambda: len(node.events.relay) == 1)

    asyncio.run(body())
    workers = fast_threads() - before
    assert len(workers) == 2
    # The closed loop has let go of its reader; this is the last reference.
    del node.plane
    gc.collect()
    for worker in workers:
        worker.join(timeout=1.0)
        assert not worker.is_alive()
    node.kernel.close()
    node.udp.close()


def test_close_before_start_and_stats_after_close() -> None:
    node = Node("fast", A)
    try:
        node.plane.close()
        assert node.plane.implementation == "fast"
        assert node.plane.stats() == DataPlaneStats(implementation="fast")
    finally:
        node.close()


def test_bad_arguments_are_refused() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        from p2pvpn._fastpath import FastDataPlane

        events: Any = object()
        with pytest.raises(ValueError, match="32 bytes"):
            FastDataPlane(0, udp, IPv4Address(A), b"short", events)
        with pytest.raises(ValueError, match="AF_INET"):
            FastDataPlane(0, udp6, IPv4Address(A), bytes(32), events)
        plane = FastDataPlane(0, udp, IPv4Address(A), bytes(32), events)
        with pytest.raises(ValueError, match="32 bytes"):
            plane.set_peer(IPv4Address(B), ("127.0.0.1", 1), b"short")
        with pytest.raises(OverflowError):
            plane.set_peer(IPv4Address(B), ("127.0.0.1", 70000), bytes(32))
        with pytest.raises(RuntimeError):
            plane.start()  # no running event loop
    finally:
        udp.close()
        udp6.close()


# -- pure and fast agree -------------------------------------------------------


def ipip_header_only() -> bytes:
    """An IPIP packet for A whose total length (60) overruns its 20 bytes."""
    header = bytearray(ipv4_packet(B, A)[:20])
    header[9] = 4  # protocol: IPIP
    return bytes(header)


BAD_IPIP = ipip_header_only()
# From behind B in the sdwan range 172.30.0.0/16: what IPIP carries to A.
INNER = ipv4_packet("172.30.9.9", A, b"inner")


def scenario_tun_inputs() -> list[bytes]:
    """What the kernel routes into A's TUN device: one per outbound branch."""
    return [
        ipv4_packet(A, B, b"direct"),
        ipv4_packet(A, C, b"via b"),
        ipv4_packet(A, "172.30.1.2", b"wrapped"),
        ipv4_packet(A, D, b"relay"),
        b"\x60" + bytes(39),
        b"\x45\x00",
    ]


def scenario_udp_inputs(
    to_a: DatagramCipher, b_sock: socket.socket, x_sock: socket.socket, stun_sock: socket.socket
) -> list[tuple[socket.socket, bytes]]:
    """What reaches A's UDP socket, and from where: one per inbound branch."""
    for_a = to_a.seal(b"\x01" + ipv4_packet(B, A, b"for a"))
    return [
        (x_sock, for_a),
        (x_sock, for_a),
        (x_sock, to_a.seal(b"\x01" + encapsulate_ipip(INNER, IPv4Address(B), IPv4Address(A)))),
        (x_sock, to_a.seal(b"\x01" + BAD_IPIP)),
        # C is not the sdwan next hop for 172.30.0.0/16.
        (x_sock, to_a.seal(b"\x01" + encapsulate_ipip(INNER, IPv4Address(C), IPv4Address(A)))),
        (x_sock, to_a.seal(b"\x01" + ipv4_packet(D, C, b"last hop", ttl=1))),
        (b_sock, to_a.seal(b"\x01" + ipv4_packet(B, C, b"loop"))),
        (x_sock, to_a.seal(b"\x01" + ipv4_packet(D, C, b"relayed"))),
        (x_sock, to_a.seal(b"\x01" + ipv4_packet(B, "10.9.0.9", b"no path"))),
        (x_sock, to_a.seal(b"\x01" + b"\x60" + bytes(39))),
        (x_sock, to_a.seal(b"")),
        (x_sock, to_a.seal(Heartbeat(IPv4Address(B), IPv4Address(A), 1, True).encode())),
        (x_sock, to_a.seal(b"\x09unknown type")),
        (x_sock, to_a.seal(b"\x01" + ipv4_packet(B, A))[:-1] + b"\x00"),
        (x_sock, b"short"),
        (stun_sock, STUN_ANSWER),
        (stun_sock, b"not stun at all, opened and refused"),
    ]


def loopback_udp_sockets(count: int) -> list[socket.socket]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
    return sockets


def opened_by(sock: socket.socket, key: bytes) -> list[bytes]:
    """What arrives at ``sock`` within 0.2 s of each datagram, opened with ``key``."""
    opened = []
    sock.settimeout(0.2)
    try:
        while True:
            datagram, _ = sock.recvfrom(70000)
            opened.append(DatagramCipher(key).open(datagram))
    except TimeoutError:
        pass
    return opened


async def run_scenario(backend: str) -> dict[str, Any]:
    """Every branch of the packet path once, in an order that is the same for
    both backends; returns what came out, with UDP endpoints named."""
    a = Node(backend, A, relaying=True)
    b_sock, x_sock, stun_sock = loopback_udp_sockets(3)
    names = {
        b_sock.getsockname(): "b",
        x_sock.getsockname(): "x",
        stun_sock.getsockname(): "stun",
    }
    to_a = DatagramCipher(a.key)

    def named(datagrams: list[tuple[bytes, UdpAddress]]) -> list[tuple[bytes, str]]:
        return [(data, names[source]) for data, source in datagrams]

    b_key = peer_key(PASSWORD, IPv4Address(B))
    try:
        a.plane.start()
        a.plane.set_peer(IPv4Address(B), b_sock.getsockname(), b_key)
        a.plane.set_route(IPv4Address(C), IPv4Address(B))
        a.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), IPv4Address(B))])
        a.plane.set_stun_server(stun_sock.getsockname())

        tun_inputs = scenario_tun_inputs()
        a.inject(*tun_inputs)
        await eventually(lambda: a.plane.stats().tun_packets_in == len(tun_inputs))
        for sock, datagram in scenario_udp_inputs(to_a, b_sock, x_sock, stun_sock):
            sock.sendto(datagram, a.address)
        a.plane.write_tun(ipv4_packet(B, A, b"from ws"))
        a.plane.write_tun(encapsulate_ipip(INNER, IPv4Address(B), IPv4Address(A)))
        a.plane.write_tun(BAD_IPIP)

        # One socket queue, read in order: once the marker is up, so is the rest.
        x_sock.sendto(to_a.seal(MARKER), a.address)
        await eventually(lambda: (MARKER, names[x_sock.getsockname()]) in named(a.events.control))
        await eventually(lambda: len(a.events.relay) == 2)
        await asyncio.sleep(0.2)
        sent_to_b = opened_by(b_sock, b_key)
        return {
            "stats": replace(a.plane.stats(), implementation=""),
            # The workers and the loop thread write concurrently: compare as sets.
            "delivered": sorted(a.delivered()),
            "relay": sorted(a.events.relay),
            "control": named(a.events.control),
            "stun": named(a.events.stun),
            "sent_to_b": sorted(sent_to_b),
        }
    finally:
        a.close()
        for sock in (b_sock, x_sock, stun_sock):
            sock.close()


def test_fast_and_pure_agree_on_every_branch() -> None:
    pure = asyncio.run(run_scenario("pure"))
    fast = asyncio.run(run_scenario("fast"))
    assert fast == pure
    # And the scenario did take the branches it was written for.
    drops = pure["stats"].drops
    for reason in (
        DropReason.TOO_SHORT,
        DropReason.AUTHENTICATION,
        DropReason.MALFORMED,
        DropReason.NOT_IPV4,
        DropReason.LOOP,
        DropReason.REPLAY,
        DropReason.IPIP_SOURCE,
        DropReason.TTL_EXPIRED,
    ):
        assert drops.get(reason, 0) > 0, reason
    assert len(pure["delivered"]) == 4
    assert [source for _, source in pure["control"]] == ["x", "x", "x"]
    assert pure["stun"] == [(STUN_ANSWER, "stun")]
    assert len(pure["sent_to_b"]) == 4


def test_a_worker_that_loses_its_fd_says_so_instead_of_spinning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        a = Node("fast", A)
        try:
            a.plane.start()
            before = time.process_time()
            a._tun.shutdown(socket.SHUT_RDWR)  # the TUN device goes away
            await eventually(lambda: "stopped using the TUN device" in caplog.text)
            await asyncio.sleep(0.2)
            # The worker left its loop: no CPU burnt on an fd that stays readable.
            assert time.process_time() - before < 0.15
            started = time.monotonic()
            a.plane.close()
            assert time.monotonic() - started < 1.0
        finally:
            a.close()

    asyncio.run(body())
