"""Data planes under concurrent load: table changes, close and restart while
packets flow. Run once per backend; for `fast` the traffic really runs in
parallel with the event loop, in worker threads without the GIL.

Packets are fed from Python threads that wait for room in the fake TUN device
instead of failing, so the tests assert accounting, never timing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from p2pvpn.dataplane.base import DataPlaneStats
from tests.dataplane.conftest import (
    Node,
    NodeFactory,
    connected_pair,
    eventually,
    ipv4_packet,
    settle,
)
from tests.sockets import drain

A, B, C, D = "10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"
SYSROUTE = IPv4Network("172.30.0.0/16")
WORKER_PREFIX = "p2pvpn-fast"


def send_waiting(sock: socket.socket, packet: bytes, stop: threading.Event | None = None) -> bool:
    """Send one datagram on a non-blocking socket, waiting for room; False if stopped."""
    while True:
        try:
            sock.send(packet)
            return True
        except BlockingIOError:
            if stop is not None and stop.is_set():
                return False
            select.select([], [sock], [], 0.05)


class Injector(threading.Thread):
    """Feeds packets into a node's fake TUN from another thread."""

    def __init__(self, node: Node, packets: Iterable[bytes], stop: threading.Event | None = None):
        super().__init__(daemon=True)
        self._node = node
        self._packets = packets
        self._halt = stop
        self.sent = 0

    def run(self) -> None:
        for packet in self._packets:
            if self._halt is not None and self._halt.is_set():
                return
            if not send_waiting(self._node.kernel, self._node.frame(packet), self._halt):
                return
            self.sent += 1


def packets_a_to_b(count: int) -> Iterable[bytes]:
    return (ipv4_packet(A, B, ident=n % 65536) for n in range(count))


def streaming_a_to_b(make_node: NodeFactory, count: int) -> tuple[Node, Node, Injector]:
    """Started nodes A and B, A knowing B's path, and an injector sending ``count`` A->B."""
    a, b = connected_pair(make_node, A, B)
    injector = Injector(a, packets_a_to_b(count))
    injector.start()
    return a, b, injector


async def finished(thread: threading.Thread) -> None:
    """Wait for a thread without blocking the loop (the pure data plane runs on it)."""
    while thread.is_alive():
        await asyncio.sleep(0.01)
    thread.join()


def drops(stats: DataPlaneStats) -> int:
    return sum(stats.drops.values())


def accounted_from_tun(stats: DataPlaneStats) -> int:
    """Packets read from TUN that were sent, handed up for the relay or dropped."""
    sent = sum(counters.packets_out for counters in stats.peers.values())
    return sent + stats.relay_packets_out + drops(stats)


def fast_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_table_changes_while_traffic_flows(make_node: NodeFactory) -> None:
    count = 6000

    async def body() -> None:
        a, b, c = make_node(A), make_node(B), make_node(C)
        for node in (a, b, c):
            node.plane.start()
        b.plane.set_peer(c.tun_ip, c.address, c.key)
        destinations = [B, C, "172.30.1.1", D]
        packets = (ipv4_packet(A, destinations[n % 4], ident=n % 65536) for n in range(count))
        injector = Injector(a, packets)
        injector.start()
        churn = 0
        while injector.is_alive():
            # Every table the workers read, changed under their feet.
            a.plane.set_peer(b.tun_ip, b.address, b.key)
            a.plane.set_peer(c.tun_ip, c.address, c.key)
            a.plane.set_route(c.tun_ip, b.tun_ip)
            a.plane.set_sysroutes([(SYSROUTE, b.tun_ip)])
            await asyncio.sleep(0)
            a.plane.drop_route(c.tun_ip)
            a.plane.drop_peer(b.tun_ip)
            a.plane.set_sysroutes([])
            await asyncio.sleep(0)
            a.plane.drop_peer(c.tun_ip)
            await asyncio.sleep(0)
            for node in (b, c):
                node.delivered()
            churn += 1
        await finished(injector)
        assert injector.sent == count
        await eventually(lambda: a.plane.stats().tun_packets_in == count, timeout=20)
        await eventually(lambda: accounted_from_tun(a.plane.stats()) == count)
        stats = a.plane.stats()
        assert accounted_from_tun(stats) == count
        # Everything counted as relayed really went up, exactly once.
        await eventually(lambda: len(a.events.relay) == stats.relay_packets_out)
        await settle()
        assert len(a.events.relay) == a.plane.stats().relay_packets_out
        # The receivers account for every FORWARD they authenticated.
        for node in (b, c):
            received = node.plane.stats()
            inbound = sum(counters.packets_in for counters in received.peers.values())
            outbound = sum(counters.packets_out for counters in received.peers.values())
            assert inbound == (
                received.tun_packets_out + outbound + received.relay_packets_out + drops(received)
            )
        assert churn > 0

    asyncio.run(body())


def test_nothing_reaches_a_dropped_peer_under_load(make_node: NodeFactory) -> None:
    count = 5000

    async def body() -> None:
        a, b, injector = streaming_a_to_b(make_node, count)

        def sent_to_b() -> int:
            counters = a.plane.stats().peers.get(b.tun_ip)
            return 0 if counters is None else counters.packets_out

        await eventually(lambda: sent_to_b() >= 500, timeout=20)
        a.plane.drop_peer(b.tun_ip)
        sent_before = sent_to_b()
        await finished(injector)
        await eventually(lambda: a.plane.stats().tun_packets_in == count, timeout=20)
        stats = a.plane.stats()
        assert stats.peers[b.tun_ip].packets_out == sent_before
        assert stats.relay_packets_out + drops(stats) == count - sent_before
        # B sees at most what left A before the drop (its socket may lose some).
        await settle(0.3)

        def received_by_b() -> int:
            counters = b.plane.stats().peers.get(a.tun_ip)
            return 0 if counters is None else counters.packets_in

        assert 0 < received_by_b() <= sent_before

    asyncio.run(body())


def test_close_while_traffic_flows_is_prompt_and_joins_the_workers(
    make_node: NodeFactory,
) -> None:
    async def body() -> None:
        a, b = make_node(A), make_node(B)
        b.plane.start()
        before = fast_threads()
        a.plane.start()
        workers = fast_threads() - before
        assert len(workers) == (2 if a.plane.implementation == "fast" else 0)
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        stop = threading.Event()
        injector = Injector(a, packets_a_to_b(10**9), stop)
        injector.start()
        await eventually(lambda: a.plane.stats().tun_packets_in >= 1000, timeout=20)
        started = time.monotonic()
        a.plane.close()
        elapsed = time.monotonic() - started
        stop.set()
        await finished(injector)
        assert elapsed < 1.0
        assert not any(worker.is_alive() for worker in workers)
        assert not workers & set(threading.enumerate())
        # Closed means closed: the counters stop moving. (Empty the device
        # first: the injector filled it once nobody read any more.)
        drain(a._tun)
        frozen = a.plane.stats()
        a.inject(ipv4_packet(A, B))
        await settle()
        assert a.plane.stats() == frozen
        a.plane.close()

    asyncio.run(body())


def test_start_close_cycles_leak_no_fd_and_no_thread(make_node: NodeFactory) -> None:
    async def body() -> None:
        b = make_node(B)
        b.plane.start()
        # One warm-up node: the first one may open lazily created fds
        # (e.g. the loop's self-pipe is already there; urandom, etc.).
        warmup = Node(b.backend, A)
        warmup.plane.start()
        warmup.close()
        fds = open_fds()
        threads = fast_threads()
        for round_ in range(30):
            node = Node(b.backend, A)
            node.plane.set_peer(b.tun_ip, b.address, b.key)
            node.plane.start()
            node.inject(ipv4_packet(A, B, ident=round_))
            if round_ % 2:
                await eventually(lambda node=node: node.plane.stats().tun_packets_in == 1)
            node.plane.close()
            node.plane.close()
            node.close()
        assert open_fds() == fds
        assert fast_threads() == threads

    asyncio.run(body())


def test_a_closed_plane_can_start_again(make_node: NodeFactory) -> None:
    async def body() -> None:
        a, b = make_node(A), make_node(B)
        b.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        fds = open_fds()
        for round_ in range(5):
            a.plane.start()
            a.plane.start()  # already running: no second set of workers
            packet = ipv4_packet(A, B, ident=round_)
            a.inject(packet)
            await eventually(lambda packet=packet: b.delivered() == [packet])
            a.plane.close()
        assert open_fds() == fds
        assert a.plane.stats().peers[b.tun_ip].packets_out == 5

    asyncio.run(body())


def test_python_threads_and_the_loop_keep_running_while_packets_flow(
    make_node: NodeFactory,
) -> None:
    count, checkpoint, window = 20000, 2000, 100

    async def body() -> None:
        a, b = make_node(A), make_node(B)
        a.plane.start()
        b.plane.start()
        a.plane.set_peer(b.tun_ip, b.address, b.key)
        stop = threading.Event()
        progress = {"thread": 0, "loop": 0, "received": 0}

        def python_work() -> None:
            while not stop.is_set():
                for _ in range(1000):
                    progress["thread"] += 1
                # A well-behaved thread: the pure plane needs the GIL on the loop.
                time.sleep(0)

        def receive() -> None:
            while progress["received"] < count and not stop.is_set():
                if select.select([b.kernel], [], [], 0.05)[0]:
                    progress["received"] += len(b.delivered())

        def inject() -> None:
            for n in range(count):
                # A bounded window keeps every buffer on the way from overflowing.
                while n - progress["received"] >= window and not stop.is_set():
                    time.sleep(0.0002)
                packet = a.frame(ipv4_packet(A, B, ident=n % 65536))
                if not send_waiting(a.kernel, packet, stop):
                    return

        threads = [threading.Thread(target=f, daemon=True) for f in (python_work, receive, inject)]
        for thread in threads:
            thread.start()
        samples = []
        try:
            next_checkpoint = checkpoint
            deadline = time.monotonic() + 60
            while progress["received"] < count:
                assert time.monotonic() < deadline, f"stuck at {progress}"
                progress["loop"] += 1
                if progress["received"] >= next_checkpoint:
                    samples.append((progress["thread"], progress["loop"]))
                    next_checkpoint += checkpoint
                await asyncio.sleep(0)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert progress["received"] == count
        assert len(samples) >= count // checkpoint - 1
        # Between every two checkpoints both the Python thread and the loop ran.
        for earlier, later in itertools.pairwise(samples):
            assert later[0] > earlier[0]
            assert later[1] > earlier[1]

    asyncio.run(body())


def test_stats_are_consistent_snapshots_while_packets_flow(make_node: NodeFactory) -> None:
    count = 3000

    async def body() -> None:
        a, b, injector = streaming_a_to_b(make_node, count)
        previous = a.plane.stats()
        while injector.is_alive() or a.plane.stats().tun_packets_in < count:
            current = a.plane.stats()
            # Counters only grow, and nothing is counted as sent before it was read.
            assert current.tun_packets_in >= previous.tun_packets_in
            sent = current.peers[b.tun_ip].packets_out if b.tun_ip in current.peers else 0
            assert sent <= current.tun_packets_in
            previous = current
            b.delivered()
            await asyncio.sleep(0.001)
        await finished(injector)
        # The last batch may still be in sendmmsg: reads are counted when
        # read, sends when the kernel took them, so settle before comparing.
        await eventually(lambda: accounted_from_tun(a.plane.stats()) == count)
        assert IPv4Address(B) in a.plane.stats().peers

    asyncio.run(body())
