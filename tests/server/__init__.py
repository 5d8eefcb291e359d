"""Server tests; this package module holds the fake sessions and frame builders they share."""

import asyncio
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface

from p2pvpn.server.relay import Action, Close, Relay, RelaySession, Send
from p2pvpn.wire.ws import Auth, ExptTun, Vmac, decode_ws_message

PASSWORD = "test-password"
# The timestamp of the Candy captures in tests/vectors, so both agree on "now".
NOW = 0x6B06A41A

VMAC_A = "0123456789abcdef"
VMAC_B = "fedcba9876543210"
VMAC_C = "00112233445566aa"


class FakeSession(RelaySession):
    """Records what the relay sends to it and how the relay closes it (see :func:`perform`)."""

    def __init__(self, remote: str = "192.0.2.1:40000") -> None:
        super().__init__(remote)
        self.sent: list[bytes] = []
        self.closes: list[tuple[int, str]] = []

    @property
    def close_code(self) -> int | None:
        return self.closes[0][0] if self.closes else None


def perform(actions: list[Action]) -> None:
    """Carry out the relay's actions on FakeSessions, as the WebSocket layer would."""
    for action in actions:
        if isinstance(action, Send):
            assert isinstance(action.session, FakeSession)
            action.session.sent.append(action.frame)
        elif isinstance(action, Close):
            assert isinstance(action.session, FakeSession)
            action.session.closes.append((action.code, action.reason))
        else:
            raise AssertionError(f"a cluster action from a relay without a cluster: {action}")


def feed(relay: Relay, session: RelaySession, frame: bytes, now: float = NOW) -> None:
    """Hand ``frame`` from ``session`` to the relay and perform what it returns."""
    perform(relay.handle_frame(session, frame, now))


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def ipv4_packet(src: str, dst: str, payload: bytes = b"hello-relay") -> bytes:
    """A minimal UDP-over-IPv4 packet (checksums are not checked by the relay).

    The length field saturates so that oversized test frames can be built.
    """
    total = min(20 + len(payload), 0xFFFF)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, ip(src).packed, ip(dst).packed
    )
    return header + payload


def forward(src: str, dst: str, payload: bytes = b"hello-relay") -> bytes:
    return b"\x01" + ipv4_packet(src, dst, payload)


def auth_frame(tun_ip: str, now: int = NOW, password: str = PASSWORD) -> bytes:
    return Auth.create(password, ip(tun_ip), now).encode()


def vmac_frame(vmac: str, now: int = NOW, password: str = PASSWORD) -> bytes:
    return Vmac.create(password, vmac, now).encode()


def expttun_frame(cidr: str = "0.0.0.0/0", now: int = NOW, password: str = PASSWORD) -> bytes:
    return ExptTun.create(password, IPv4Interface(cidr), now).encode()


def login(
    relay: Relay,
    tun_ip: str,
    *,
    vmac: str | None = None,
    now: int = NOW,
    session: FakeSession | None = None,
) -> FakeSession:
    """A session that sent (VMAC and) AUTH and was accepted."""
    session = session if session is not None else FakeSession()
    relay.on_connect(session)
    if vmac is not None:
        feed(relay, session, vmac_frame(vmac, now), now)
    feed(relay, session, auth_frame(tun_ip, now), now)
    assert session.closes == [], session.closes
    assert session.authenticated
    return session


def request_address(
    relay: Relay, session: FakeSession, cidr: str = "0.0.0.0/0", now: int = NOW
) -> IPv4Interface | None:
    """Send EXPTTUN; the granted cidr, or None if the session was closed."""
    before = len(session.sent)
    feed(relay, session, expttun_frame(cidr, now), now)
    if session.closes:
        return None
    (reply,) = session.sent[before:]
    grant = decode_ws_message(reply)
    assert isinstance(grant, ExptTun)
    assert grant.verify(PASSWORD)
    return grant.cidr


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.005)
