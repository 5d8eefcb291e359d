"""Helpers for the TUN offload tests (issue 13): hashed TCP transfers and nftables judges.

* `hashed_transfer`: TCP flows from one namespace to another in plain Python
  (no iperf3), each of deterministic pseudo-random bytes; the sender and the
  receiver print a SHA-256 of what they sent and what they got.
* `TunCounters`: what the kernel counted crossing a TUN device: nftables
  counters of the packets arriving from it (all, and those longer than the
  MTU) and the device's tx statistics: the kernel says whether
  super-packets crossed it.
* `add_peer_loss`: drop one in N of the UDP datagrams from a peer, on arrival.
Everything runs inside namespaces the test bed creates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from p2pvpn.netns import Namespace, Process, TestBed

TRANSFER_TIMEOUT = 120.0
"""Generous: the machine has 2 cores and other tests may run beside these."""

# One thread per connection. A flow is: 4-byte flow index, then the data, then EOF.
HASH_RECEIVER = """
import hashlib, json, socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
lock = threading.Lock()

def receive(conn):
    digest, total, head = hashlib.sha256(), 0, b""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with conn:
        while len(head) < 4:
            chunk = conn.recv(4 - len(head))
            if not chunk:
                break
            head += chunk
        while count := conn.recv_into(buffer):
            digest.update(view[:count])
            total += count
    flow = int.from_bytes(head, "big") if len(head) == 4 else -1
    with lock:
        print(json.dumps({"flow": flow, "bytes": total, "sha256": digest.hexdigest()}), flush=True)

print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=receive, args=(conn,), daemon=True).start()
"""
HASH_SENDER = """
import hashlib, json, random, socket, sys, threading
host, port, flows, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
failures = []
lock = threading.Lock()  # print writes the line and its newline apart

def send(flow):
    data = random.Random(flow * 7919 + size).randbytes(size)
    try:
        with socket.create_connection((host, port), timeout=60) as conn:
            conn.sendall(flow.to_bytes(4, "big"))
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass
    except OSError as exc:
        failures.append(f"flow {flow}: {exc!r}")
        return
    line = {"flow": flow, "bytes": size, "sha256": hashlib.sha256(data).hexdigest()}
    with lock:
        print(json.dumps(line), flush=True)

threads = [threading.Thread(target=send, args=(flow,)) for flow in range(flows)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for failure in failures:
    print("FAILED", failure, flush=True)
sys.exit(1 if failures else 0)
"""


def _flow_lines(text: str) -> dict[int, dict[str, Any]]:
    lines = (json.loads(line) for line in text.splitlines() if line.startswith("{"))
    return {int(line["flow"]): line for line in lines}


def hashed_transfer(
    bed: TestBed,
    sender: Namespace,
    receiver: Namespace,
    address: str,
    *,
    port: int,
    size: int,
    flows: int = 1,
) -> None:
    """``flows`` parallel TCP flows of ``size`` bytes each, sender -> ``address``:``port``
    in ``receiver``; fails unless every flow arrived whole with the sender's SHA-256."""
    __tracebackhide__ = True
    started: list[Process] = []
    try:
        rx = bed.start_python(receiver, ["-c", HASH_RECEIVER, str(port)], f"hash-rx-{port}")
        started.append(rx)
        rx.wait_for_log("ready")
        tx_argv = ["-c", HASH_SENDER, address, str(port), str(flows), str(size)]
        tx = bed.start_python(sender, tx_argv, f"hash-tx-{port}")
        started.append(tx)

        def finished() -> bool:
            # The sender waits for the receiver's close, which comes just before its line.
            everything = len(_flow_lines(rx.log_text())) >= flows
            return not tx.alive() and (tx.returncode != 0 or everything)

        bed.wait_until(
            finished,
            timeout=TRANSFER_TIMEOUT,
            interval=0.2,
            message=f"{flows} flow(s) of {size} bytes to {address}:{port} never all arrived",
        )
        assert tx.returncode == 0, f"sender failed ({tx.returncode}):\n{tx.tail(20)}"
        sent, received = _flow_lines(tx.log_text()), _flow_lines(rx.log_text())
    finally:
        for process in started:
            process.terminate()
    assert sorted(sent) == list(range(flows)), f"sender reported flows {sorted(sent)}"
    for flow, line in sent.items():
        assert received.get(flow) == line, (
            f"flow {flow}: sent {line}, received {received.get(flow)}"
        )


# --------------------------------------------------------------------------
# nftables: what crossed the TUN device, and loss


@dataclass(frozen=True)
class TunCounters:
    """What crossed TUN ``ifname`` in ``ns``, as the kernel counts it; `install` first.

    Arriving (from the data plane's writes): an nftables counter of all
    packets and one of those longer than the MTU. Leaving (what the data
    plane reads): the device's own tx statistics, one per packet handed to
    it; their average size over the MTU means super-packets (TSO). Netfilter
    cannot judge that side: TCP builds GSO packets for every device and the
    kernel cuts them after the output hook when the device has no TSO.
    """

    ns: Namespace
    ifname: str
    mtu: int
    table: str = "p2t_tun_judge"

    def install(self) -> None:
        # Priority -500: before conntrack's defragmentation (-400), so reassembled
        # fragments are not mistaken for super-packets; meta length is the IP length.
        quoted, mtu = json.dumps(self.ifname), self.mtu
        self.ns.nft(f"""
table ip {self.table} {{
    counter in_all {{ }}
    counter in_over_mtu {{ }}
    chain arriving {{
        type filter hook prerouting priority -500; policy accept;
        iifname {quoted} counter name "in_all"
        iifname {quoted} meta length > {mtu} counter name "in_over_mtu"
    }}
}}
""")

    def read(self) -> dict[str, int]:
        """``in_all``, ``in_over_mtu`` (packets the data plane wrote), ``out_packets``,
        ``out_bytes`` (what the kernel gave the data plane to read)."""
        [link] = self.ns.ip_json("-s", "link", "show", "dev", self.ifname)
        sent = link["stats64"]["tx"]
        return {
            "in_all": _counter_packets(self.ns, self.table, "in_all"),
            "in_over_mtu": _counter_packets(self.ns, self.table, "in_over_mtu"),
            "out_packets": int(sent["packets"]),
            "out_bytes": int(sent["bytes"]),
        }


def _counter_packets(ns: Namespace, table: str, name: str) -> int:
    result = ns.run(["nft", "-j", "list", "counter", "ip", table, name])
    for item in json.loads(result.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError(f"nft printed no counter {table}/{name}: {result.stdout[:300]}")


LOSS_TABLE = "p2t_peer_loss"


def add_peer_loss(ns: Namespace, peer_ip: str, one_in: int) -> None:
    """Drop one in ``one_in`` (at random) of the UDP datagrams from ``peer_ip`` arriving in ``ns``.

    Only arrivals: a drop on the way out would fail the sender's sendmsg
    (EPERM), which the data plane takes for an error, not for a loss.
    """
    ns.nft(f"""
table ip {LOSS_TABLE} {{
    counter dropped {{ }}
    chain arriving {{
        type filter hook input priority -10; policy accept;
        ip saddr {peer_ip} meta l4proto udp numgen random mod {one_in} == 0 \\
            counter name "dropped" drop
    }}
}}
""")


def peer_loss_dropped(ns: Namespace) -> int:
    return _counter_packets(ns, LOSS_TABLE, "dropped")


def clear_peer_loss(ns: Namespace) -> None:
    ns.run(["nft", "delete", "table", "ip", LOSS_TABLE], check=False)
