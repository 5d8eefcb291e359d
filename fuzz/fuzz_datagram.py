#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris/libFuzzer) of the client's UDP datagram path.

    python fuzz/fuzz_datagram.py -atheris_runs=200000
    python fuzz/fuzz_datagram.py -max_total_time=600 fuzz/corpus   # keeps a corpus
    python fuzz/fuzz_datagram.py --dataplane fast -atheris_runs=20000

One long-lived node (a data plane + peer manager, as ClientNode wires them,
relaying on; a fake TUN device, a UDP socket on 127.0.0.1 and a peer
CONNECTED over loopback) receives every input. With ``--dataplane pure`` (the
default) datagrams go straight into PureDataPlane._on_datagram; with
``--dataplane fast`` the compiled FastDataPlane runs its workers and every
datagram is a real one over loopback, waited for until it has its outcome.
The first byte picks what the input is:

* 0: a raw datagram, straight into the data plane (authentication fails);
* 1: a plaintext, sealed under the node's own key with an IV from a counter
  (deterministic, and never one the replay record has seen) so the fuzzer
  reaches the decoders behind the GCM tag: decode_peer_message, the
  FORWARD/IPIP path and the peer manager's control handlers;
* 2: the same sealed plaintext with one byte changed: it must be dropped as
  an authentication failure and change nothing;
* 3: a datagram from the STUN server's address, into the STUN handler (with
  bit 0x40 of the second byte, bytes 8..20 become the transaction id of the
  last request, so answers can be accepted).

The second byte also picks the UDP source, and with bit 0x80 advances the
clock and ticks the peer manager first.

Anything raised, and any broken invariant (one outcome per sealed datagram,
tables of data plane and peer manager in agreement, tampered datagrams
without effect) is a crash. See fuzz/README.md.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import sys
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package lives in ../src.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from p2pvpn.client.peer_manager import PeerManager
    from p2pvpn.config import ClientConfig, StunServer
    from p2pvpn.dataplane.base import DataPlane, DataPlaneStats, DropReason, UdpAddress
    from p2pvpn.dataplane.pure import PureDataPlane
    from p2pvpn.wire.crypto import DatagramCipher, peer_key
    from p2pvpn.wire.errors import DecodeError
    from p2pvpn.wire.peer import Heartbeat, decode_peer_message
    from p2pvpn.wire.stun import decode_binding_request
    from p2pvpn.wire.ws import Discovery

PASSWORD = "fuzz-password"
OWN = IPv4Interface("10.99.0.1/24")
PEER = IPv4Address("10.99.0.2")
PEER_PATH: UdpAddress = ("127.0.0.2", 40002)
PREPARING_PEER = IPv4Address("10.99.0.3")
SOURCES: list[UdpAddress] = [PEER_PATH, ("127.0.0.3", 40003), ("127.0.0.4", 0), ("127.0.0.2", 1)]
# The fast plane reads real datagrams: its sources are sockets on these hosts.
FAST_SOURCE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
STUN: UdpAddress = ("127.0.0.5", 3478)
# How long the fast plane gets for one datagram's outcome.
OUTCOME_TIMEOUT = 10.0
# The node is rebuilt now and then so that its peer table stays small and fast.
RESET_EVERY = 5000


class TrackingPlane:
    """Passes every call to the real data plane and remembers the tables it set."""

    def __init__(self, inner: DataPlane) -> None:
        self.inner = inner
        self.peers: dict[IPv4Address, UdpAddress] = {}
        self.routes: dict[IPv4Address, IPv4Address] = {}
        self.stun_server: UdpAddress | None = None
        self.transaction_id = bytes(12)  # of the last STUN request

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_peer(self, tun_ip: IPv4Address, address: UdpAddress, key: bytes) -> None:
        self.peers[tun_ip] = address
        self.inner.set_peer(tun_ip, address, key)

    def drop_peer(self, tun_ip: IPv4Address) -> None:
        self.peers.pop(tun_ip, None)
        self.inner.drop_peer(tun_ip)

    def set_route(self, destination: IPv4Address, next_hop: IPv4Address) -> None:
        self.routes[destination] = next_hop
        self.inner.set_route(destination, next_hop)

    def drop_route(self, destination: IPv4Address) -> None:
        self.routes.pop(destination, None)
        self.inner.drop_route(destination)

    def set_stun_server(self, address: UdpAddress | None) -> None:
        self.stun_server = address
        self.inner.set_stun_server(address)

    def send_stun(self, address: UdpAddress, data: bytes) -> None:
        self.transaction_id = decode_binding_request(data)
        self.inner.send_stun(address, data)


class Signaling:
    def send(self, message: Any) -> bool:
        message.encode()
        return True


class Node:
    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.loop = asyncio.new_event_loop()
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.setblocking(False)
        self.tun.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.senders = [self._sender(host) for host in FAST_SOURCE_HOSTS] if fast else []
        self.sources = [sender.getsockname() for sender in self.senders] if fast else SOURCES
        self.peer_path: UdpAddress = self.sources[0]
        key = peer_key(PASSWORD, OWN.ip)
        self.cipher = DatagramCipher(key)
        self.ivs = itertools.count(1)
        self.relay: list[bytes] = []
        self.relayed = self.controls = 0
        self.plane = self._plane(key)
        self.tracking = TrackingPlane(self.plane)
        self.now = 1000.0
        config = ClientConfig(
            websocket="ws://127.0.0.1:9/",
            password=PASSWORD,
            stun=StunServer(*STUN),
            route=5,
            localhost=IPv4Address("127.0.0.1"),
            state_dir=Path("/nonexistent"),
        )
        self.manager = PeerManager(config, OWN, self.tracking, Signaling(), local_port=40001)
        self.loop.run_until_complete(self._start())
        # A peer with a direct path: hint, then a heartbeat with ack from its address.
        self.manager.on_discovery(Discovery(PEER, OWN.ip), self.now)
        self.receive(self.seal(Heartbeat(PEER, OWN.ip, 0, True).encode()), self.peer_path)
        assert self.tracking.peers == {PEER: self.peer_path}
        # And one that wants STUN answers (it asks on the next ticks).
        self.manager.on_discovery(Discovery(PREPARING_PEER, OWN.ip), self.now)

    @staticmethod
    def _sender(host: str) -> socket.socket:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((host, 0))
        sender.setblocking(False)
        return sender

    def _plane(self, key: bytes) -> DataPlane:
        # route = 5 below: the node relays, as ClientNode makes it.
        if not self.fast:
            return PureDataPlane(self.tun.fileno(), self.udp, OWN.ip, key, self, relaying=True)
        from p2pvpn._fastpath import FastDataPlane

        fast: DataPlane = FastDataPlane(
            self.tun.fileno(), self.udp, OWN.ip, key, self, relaying=True
        )
        return fast

    async def _start(self) -> None:
        # start() resolves the STUN server in a task; an IP address resolves at once.
        self.manager.start()
        while self._stun_resolved() is None:
            await asyncio.sleep(0.0005)
        self.manager.close()
        if self.fast:
            self.plane.start()

    def _stun_resolved(self) -> UdpAddress | None:
        return self.manager.stun_server

    def close(self) -> None:
        self.plane.close()
        self.loop.close()
        for sock in (self.kernel, self.tun, self.udp, *self.senders):
            sock.close()

    def seal(self, plaintext: bytes) -> bytes:
        """Deterministic for the fuzzer, and a fresh IV for the replay record."""
        return self.cipher.seal(plaintext, next(self.ivs).to_bytes(12, "big"))

    # DataPlaneEvents
    def on_relay_packets(self, packets: list[bytes]) -> None:
        self.relayed += len(packets)
        self.relay.extend(packets)
        del self.relay[:-16]

    def on_control_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        self.controls += len(datagrams)
        self.manager.on_control_datagrams(datagrams, self.now)

    def on_stun_datagrams(self, datagrams: list[tuple[bytes, UdpAddress]]) -> None:
        self.manager.on_stun_datagrams(datagrams, self.now)

    def receive(self, datagram: bytes, source: UdpAddress) -> tuple[int, int, DataPlaneStats]:
        """One datagram as the UDP reader handles it: (#relayed, #control, stats).

        The pure plane's stats are taken after the data plane's step and before
        the control plane's (whose answers may count send failures of their
        own); the fast plane's after both (its answers go to loopback sockets).
        """
        if self.fast:
            return self._receive_over_udp(datagram, source)
        relay: list[bytes] = []
        control: list[tuple[bytes, UdpAddress]] = []
        assert isinstance(self.plane, PureDataPlane)
        self.plane._on_datagram(datagram, source, relay, control)
        stats = self.plane.stats()
        if control:
            self.on_control_datagrams(control)
        if relay:
            self.on_relay_packets(relay)
        return len(relay), len(control), stats

    def _receive_over_udp(
        self, datagram: bytes, source: UdpAddress
    ) -> tuple[int, int, DataPlaneStats]:
        relayed, controls = self.relayed, self.controls
        expected = self._progress() + 1
        self.senders[self.sources.index(source)].sendto(datagram, self.udp.getsockname())
        self.loop.run_until_complete(self._outcome(expected))
        return self.relayed - relayed, self.controls - controls, self.plane.stats()

    def _progress(self) -> int:
        stats = self.plane.stats()
        return outcomes(DataPlaneStats("none"), stats) + self.relayed + self.controls

    async def _outcome(self, expected: int) -> None:
        deadline = time.monotonic() + OUTCOME_TIMEOUT
        while self._progress() < expected:
            assert time.monotonic() < deadline, "a datagram without an outcome"
            await asyncio.sleep(0.0001)

    def drain_tun(self) -> int:
        count = 0
        while True:
            try:
                self.kernel.recv(70000)
            except BlockingIOError:
                return count
            count += 1

    def check_tables(self) -> None:
        rows = self.manager.snapshot(None, self.now)
        connected = {IPv4Address(row["tun_ip"]) for row in rows if row["state"] == "CONNECTED"}
        assert set(self.tracking.peers) == connected, (self.tracking.peers, rows)
        relayed = {
            IPv4Address(route["destination"]): IPv4Address(route["next_hop"])
            for route in self.manager.route_snapshot()
            if route["destination"] != route["next_hop"]
        }
        assert self.tracking.routes == relayed, (self.tracking.routes, relayed)


def outcomes(before: DataPlaneStats, after: DataPlaneStats) -> int:
    def direct(stats: DataPlaneStats) -> int:
        return sum(counters.packets_out for counters in stats.peers.values())

    return (
        sum(after.drops.values())
        - sum(before.drops.values())
        + after.tun_packets_out
        - before.tun_packets_out
        + direct(after)
        - direct(before)
    )


class _Current:
    """The node every input goes to, rebuilt every RESET_EVERY inputs."""

    node: Node | None = None
    runs = 0
    fast = False


def node() -> Node:
    _Current.runs += 1
    if _Current.node is None or _Current.runs % RESET_EVERY == 0:
        if _Current.node is not None:
            _Current.node.close()
        _Current.node = Node(_Current.fast)
    return _Current.node


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, selector, payload = data[0] % 4, data[1], data[2:]
    current = node()
    source = current.sources[selector % len(current.sources)]
    if selector & 0x80:
        current.now += 1.0 + (selector & 0x0F)
        current.manager.tick(current.now)
    with contextlib.suppress(DecodeError):
        decode_peer_message(payload)
    before = current.plane.stats()
    if mode == 0:
        relayed, control, after = current.receive(payload, source)
        # Random bytes never authenticate (one in 2**128).
        assert (relayed, control) == (0, 0)
        assert outcomes(before, after) == 1
    elif mode == 1:
        relayed, control, after = current.receive(current.seal(payload), source)
        assert outcomes(before, after) + relayed + control == 1, payload.hex()
    elif mode == 2:
        sealed = bytearray(current.seal(payload))
        index = int.from_bytes(payload[:2] or b"\0", "big") % len(sealed)
        sealed[index] ^= payload[-1] if payload and payload[-1] else 0x01
        state = (
            dataclasses.replace(before, drops={}),
            current.manager.snapshot(before, current.now),
        )
        relayed, control, after = current.receive(bytes(sealed), source)
        assert (relayed, control) == (0, 0)
        assert after.drops[DropReason.AUTHENTICATION] == (
            before.drops.get(DropReason.AUTHENTICATION, 0) + 1
        )
        assert (
            dataclasses.replace(after, drops={}),
            current.manager.snapshot(after, current.now),
        ) == state
    else:
        if selector & 0x40 and len(payload) >= 20:
            # Answer the last request: the fuzzer cannot guess a random transaction id.
            payload = payload[:8] + current.tracking.transaction_id + payload[20:]
        current.on_stun_datagrams([(payload, STUN)])
    current.drain_tun()
    current.check_tables()


def main() -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dataplane", choices=("pure", "fast"), default="pure")
    known, libfuzzer_args = parser.parse_known_args()
    _Current.fast = known.dataplane == "fast"
    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
