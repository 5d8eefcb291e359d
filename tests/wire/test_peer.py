"""UDP plaintext layouts (PROTOCOL 3.2): exact bytes, truncation, round trips."""

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.peer import (
    ROUTE_DELETED,
    Delay,
    Heartbeat,
    PeerForward,
    PeerMessage,
    PeerType,
    RouteAdvert,
    UnknownPeerMessage,
    decode_peer_message,
)

A = IPv4Address("192.168.202.1")
B = IPv4Address("192.168.202.9")
PACKET = bytes.fromhex("4500001c00010000401100000a4d00010a4d00027878787878787878")

EXACT_PLAINTEXTS: list[tuple[PeerMessage, str]] = [
    (
        Heartbeat(A, IPv4Address("203.0.113.5"), 0x1F90, ack=True),
        "00" + "c0a8ca01" + "cb007105" + "1f90" + "01",
    ),
    (
        Heartbeat(A, IPv4Address("0.0.0.0"), 0, ack=False),
        "00" + "c0a8ca01" + "00000000" + "0000" + "00",
    ),
    (PeerForward(PACKET), "01" + PACKET.hex()),
    (Delay(A, B, 0xCBADF), "02" + "c0a8ca01" + "c0a8ca09" + "00000000000cbadf"),
    (RouteAdvert(A, B, 25), "04" + "c0a8ca01" + "c0a8ca09" + "00000019"),
    (RouteAdvert(A, B, -1), "04" + "c0a8ca01" + "c0a8ca09" + "ffffffff"),
    (RouteAdvert(A, B, ROUTE_DELETED), "04" + "c0a8ca01" + "c0a8ca09" + "7fffffff"),
    (UnknownPeerMessage(3, b"\x01\x02\x03"), "03" + "010203"),
    (UnknownPeerMessage(255, b""), "ff"),
]

MINIMUM_SIZES = {
    PeerType.HEARTBEAT: 12,
    PeerType.FORWARD: 21,
    PeerType.DELAY: 17,
    PeerType.ROUTE: 13,
}


def _ids() -> list[str]:
    return [
        f"{type(message).__name__}-{index}" for index, (message, _) in enumerate(EXACT_PLAINTEXTS)
    ]


@pytest.mark.parametrize(("message", "plaintext_hex"), EXACT_PLAINTEXTS, ids=_ids())
def test_encode_gives_exact_bytes(message: PeerMessage, plaintext_hex: str) -> None:
    assert message.encode().hex() == plaintext_hex


@pytest.mark.parametrize(("message", "plaintext_hex"), EXACT_PLAINTEXTS, ids=_ids())
def test_decode_exact_bytes(message: PeerMessage, plaintext_hex: str) -> None:
    assert decode_peer_message(bytes.fromhex(plaintext_hex)) == message


@pytest.mark.parametrize(("message_type", "size"), MINIMUM_SIZES.items())
def test_truncated_plaintexts_raise_decode_error(message_type: PeerType, size: int) -> None:
    for length in range(1, size):
        with pytest.raises(DecodeError):
            decode_peer_message(bytes([message_type]) + b"\x00" * (length - 1))


def test_empty_plaintext_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_peer_message(b"")


@pytest.mark.parametrize("extra", [1, 4, 50])
def test_trailing_bytes_are_ignored(extra: int) -> None:
    heartbeat = Heartbeat(A, B, 4000, ack=True)
    delay = Delay(A, B, 123)
    assert decode_peer_message(heartbeat.encode() + b"\xee" * extra) == heartbeat
    assert decode_peer_message(delay.encode() + b"\xee" * extra) == delay


def test_heartbeat_ack_is_any_nonzero_byte() -> None:
    decoded = decode_peer_message(bytes.fromhex("00c0a8ca0100000000f89a" + "02"))
    assert decoded == Heartbeat(A, IPv4Address("0.0.0.0"), 0xF89A, ack=True)


def test_route_accepts_the_17_byte_i64_form() -> None:
    plaintext = bytes.fromhex("04" + "c0a8ca01" + "c0a8ca09" + "00000001" + "00000000")
    assert decode_peer_message(plaintext) == RouteAdvert(A, B, 2**32)


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_route_13_to_16_bytes_is_the_i32_form(extra: int) -> None:
    plaintext = bytes.fromhex("04c0a8ca01c0a8ca09" + "0000002a") + b"\xff" * extra
    assert decode_peer_message(plaintext) == RouteAdvert(A, B, 42)


@pytest.mark.parametrize(
    ("delay_ms", "encoded_delay"),
    [(2**40, 2**31 - 1), (-(2**40), -(2**31)), (2**31 - 1, 2**31 - 1), (-(2**31), -(2**31))],
)
def test_route_delay_is_clamped_to_int32(delay_ms: int, encoded_delay: int) -> None:
    plaintext = RouteAdvert(A, B, delay_ms).encode()
    assert len(plaintext) == 13
    assert int.from_bytes(plaintext[9:], "big", signed=True) == encoded_delay


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(A, B, 65536, ack=False),
        Heartbeat(A, B, -1, ack=False),
        Delay(A, B, 2**63),
        PeerForward(b"\x45" * 19),
        UnknownPeerMessage(256, b""),
    ],
)
def test_encode_refuses_unrepresentable_fields(message: PeerMessage) -> None:
    with pytest.raises(ValueError):
        message.encode()


addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
known_types = {int(member) for member in PeerType}

peer_messages = st.one_of(
    st.builds(Heartbeat, addresses, addresses, st.integers(0, 0xFFFF), st.booleans()),
    st.builds(PeerForward, st.binary(min_size=20, max_size=200)),
    st.builds(Delay, addresses, addresses, st.integers(-(2**63), 2**63 - 1)),
    st.builds(RouteAdvert, addresses, addresses, st.integers(-(2**31), 2**31 - 1)),
    st.builds(
        UnknownPeerMessage,
        st.integers(0, 255).filter(lambda value: value not in known_types),
        st.binary(max_size=100),
    ),
)


@given(peer_messages)
def test_round_trip(message: PeerMessage) -> None:
    plaintext = message.encode()
    assert decode_peer_message(plaintext) == message
    assert decode_peer_message(plaintext).encode() == plaintext
