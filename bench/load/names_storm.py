#!/usr/bin/env python3
"""A reconnect storm of named p2pvpn members through the sans-I/O relay alone.

    python bench/load/names_storm.py --members 1000 --spread 1.0

Each member logs in as a p2pvpn client does (AUTH, a ping with its name,
HELLO), the logins spread evenly over ``--spread`` seconds of simulated
time. A relay with ``flush_names`` (coalesced NAMES) is flushed whenever
``names_due`` says so, as the WebSocket layer does; an older relay sends
its NAMES from each event itself. Printed: the frames the relay asked to
send (NAMES, all of them) and the CPU seconds of the storm (the AUTH frames
are signed beforehand and not counted). No sockets, no event loop: this is
the relay's own cost, the lower bound of a real server's.
"""

import argparse
import time
from ipaddress import IPv4Address

from p2pvpn.server.relay import Relay, RelaySession, Send
from p2pvpn.wire.names import encode_ping_payload
from p2pvpn.wire.ws import Auth, Hello

PASSWORD = "storm-password"
FIRST_ADDRESS = IPv4Address("10.66.0.1")


def storm(members: int, spread: float) -> tuple[int, float, int]:
    """(frames sent, CPU seconds, flushes) for ``members`` logins over ``spread`` seconds."""
    start = time.time()
    relay = Relay(PASSWORD)
    sessions = [
        RelaySession(f"192.0.2.{index % 250 + 1}:{40000 + index}") for index in range(members)
    ]
    auths = [
        Auth.create(PASSWORD, FIRST_ADDRESS + index, int(start)).encode()
        for index in range(members)
    ]
    pings = [encode_ping_payload(f"member-{index}", "0.9.0") for index in range(members)]
    hello = Hello().encode()
    flush = getattr(relay, "flush_names", None)
    frames = flushes = 0

    def count(actions: list[object]) -> int:
        return sum(1 for action in actions if isinstance(action, Send))

    cpu = time.process_time()
    for index, session in enumerate(sessions):
        now = start + spread * index / members
        if flush is not None:
            due = relay.names_due(now)
            if due is not None and due <= now:
                frames += count(flush(now))
                flushes += 1
        relay.on_connect(session)
        frames += count(relay.handle_frame(session, auths[index], now))
        frames += count(relay.on_ping(session, pings[index], now))
        frames += count(relay.handle_frame(session, hello, now))
    if flush is not None:
        frames += count(flush(start + spread + 1.0))
        flushes += 1
    return frames, time.process_time() - cpu, flushes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="seconds the logins take")
    args = parser.parse_args()
    frames, cpu, flushes = storm(args.members, args.spread)
    print(
        f"members={args.members} spread={args.spread:g}s frames={frames} "
        f"frames/member={frames / args.members:.1f} cpu={cpu:.3f}s flushes={flushes}"
    )


if __name__ == "__main__":
    main()
