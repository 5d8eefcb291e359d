"""Capture datagrams on a namespace's interface and replay them from another host.

`Replayer` runs one Python process in the attacker's namespace (host C). The
process first enters the namespace of a router on the path (``setns``), opens
an AF_PACKET socket on one of its interfaces there, and comes back: sockets
keep the namespace they were made in, so one process both sniffs on the
router and sends from C's own address. That keeps the time between capture
and replay down to milliseconds (the receiver remembers IVs for only a few
seconds) and needs no tcpdump.

What it captures: the first UDP datagram of each wanted payload size from
``src`` to ``dst:dport`` (sizes identify the message: a heartbeat is 12 + 28 =
40 bytes, a FORWARD of a default 84-byte ping 1 + 84 + 28 = 113). Each is sent
``count`` times, ``hold`` seconds after its capture, to ``dst:dport`` from C's
own UDP socket. Afterwards the socket listens ``listen`` seconds and reports
what comes back to C (a path challenge, or heartbeats of a hijacked path).

The process writes one JSON object per line: ``capturing``, then per size
``captured`` and ``replayed``, ``received`` for datagrams to C, and ``done``
(or ``timeout``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from p2pvpn.netns import Namespace, Process, TestBed

HEARTBEAT_DATAGRAM = 12 + 28
"""UDP payload of a heartbeat: 12-byte plaintext, IV and GCM tag."""
PING_FORWARD_DATAGRAM = 1 + 84 + 28
"""UDP payload of a FORWARD carrying a default ``ping`` (84-byte IP packet)."""
DELAY_DATAGRAMS = frozenset({13 + 28, 17 + 28})
"""UDP payloads of a DELAY probe (PROTOCOL 3.2: i32 or i64 timestamp)."""

REPLAYER = r"""
import ctypes, json, os, select, socket, struct, sys, time

cfg = json.loads(sys.argv[1])
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 3
libc = ctypes.CDLL(None, use_errno=True)


def say(event, **fields):
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


def enter(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


home = os.open("/proc/self/ns/net", os.O_RDONLY)
there = os.open("/run/netns/" + cfg["capture_ns"], os.O_RDONLY)
enter(there)
try:
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sniffer.bind((cfg["ifname"], ETH_P_ALL))
finally:
    enter(home)
    os.close(there)
    os.close(home)
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender.bind(("0.0.0.0", 0))

src, dst = socket.inet_aton(cfg["src"]), socket.inet_aton(cfg["dst"])
dport = cfg["dport"]
wants = {int(w["size"]): w for w in cfg["want"]}
captured = {}  # size -> payload
due = []  # [time, size]
replayed = set()
say("capturing", ifname=cfg["ifname"], sender=sender.getsockname())
deadline = time.monotonic() + cfg["timeout"]


def udp_payload(frame):
    if len(frame) < 42 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 17 or ip[12:16] != src or ip[16:20] != dst:
        return None
    udp = ip[ihl:]
    if len(udp) < 8 or struct.unpack("!H", udp[2:4])[0] != dport:
        return None
    length = struct.unpack("!H", udp[4:6])[0]
    return bytes(udp[8:length])


while len(replayed) < len(wants):
    now = time.monotonic()
    if now > deadline:
        say("timeout", captured=sorted(captured), replayed=sorted(replayed))
        sys.exit(1)
    for item in [d for d in due if d[0] <= now]:
        due.remove(item)
        size = item[1]
        want = wants[size]
        for _ in range(int(want["count"])):
            sender.sendto(captured[size], (cfg["dst"], dport))
            time.sleep(float(want.get("gap", 0.02)))
        replayed.add(size)
        say("replayed", size=size, count=int(want["count"]), iv=captured[size][:12].hex())
    waits = [d[0] - now for d in due] + [deadline - now]
    readable, _, _ = select.select([sniffer], [], [], max(0.0, min(waits)))
    if not readable:
        continue
    frame = sniffer.recv(65535)
    payload = udp_payload(frame)
    if payload is None or len(payload) not in wants or len(payload) in captured:
        continue
    size = len(payload)
    captured[size] = payload
    say("captured", size=size, iv=payload[:12].hex())
    due.append([time.monotonic() + float(wants[size].get("hold", 0.0)), size])

sender.settimeout(0.2)
until = time.monotonic() + float(cfg.get("listen", 0.0))
while time.monotonic() < until:
    try:
        data, peer = sender.recvfrom(65535)
    except (TimeoutError, socket.timeout):
        continue
    say("received", source=list(peer), size=len(data))
say("done")
"""


@dataclass(frozen=True)
class Want:
    """Capture the first datagram of ``size`` bytes; send it ``count`` times after ``hold`` s."""

    size: int
    count: int = 5
    hold: float = 0.0


class Replayer:
    """The capture-and-replay process (see module doc), started in ``attacker``."""

    def __init__(
        self,
        bed: TestBed,
        attacker: Namespace,
        *,
        capture_ns: Namespace,
        ifname: str,
        src: str,
        dst: tuple[str, int],
        wants: list[Want],
        listen: float = 0.0,
        timeout: float = 30.0,
    ) -> None:
        config = {
            "capture_ns": capture_ns.name,
            "ifname": ifname,
            "src": src,
            "dst": dst[0],
            "dport": dst[1],
            "want": [{"size": w.size, "count": w.count, "hold": w.hold} for w in wants],
            "listen": listen,
            "timeout": timeout,
        }
        self.bed = bed
        self.process: Process = bed.start_python(
            attacker, ["-c", REPLAYER, json.dumps(config)], "replayer"
        )
        self.process.wait_for_log('"event": "capturing"')

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The events the process reported so far (of one ``kind`` when given)."""
        found = []
        for line in self.process.log_text().splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if kind is None or event["event"] == kind:
                found.append(event)
        return found

    def event(self, kind: str, size: int | None = None) -> dict[str, Any] | None:
        for event in self.events(kind):
            if size is None or event.get("size") == size:
                return event
        return None

    def wait_for(self, kind: str, size: int | None = None, timeout: float = 20) -> dict[str, Any]:
        """Wait for an event; fail at once if the process gave up or died."""

        def check() -> dict[str, Any] | None:
            found = self.event(kind, size)
            if found is None and (self.event("timeout") or not self.process.alive()):
                raise AssertionError(
                    f"replayer ended without {kind} {size}:\n{self.process.tail()}"
                )
            return found

        return self.bed.wait_until(
            check, timeout=timeout, interval=0.05, message=f"replayer: no {kind} {size}"
        )

    def finish(self, timeout: float = 30) -> None:
        """Wait for ``done`` and the process's exit."""
        self.wait_for("done", timeout=timeout)
        rc = self.process.wait(10)
        assert rc == 0, f"replayer exited with {rc}:\n{self.process.tail()}"

    def stop(self) -> None:
        if self.process.alive():
            self.process.terminate()
