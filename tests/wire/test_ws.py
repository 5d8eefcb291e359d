"""WebSocket message layouts (PROTOCOL 2.2): exact bytes, truncation, round trips."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ws import (
    BROADCAST,
    GENERAL_NAME,
    Auth,
    Discovery,
    ExptTun,
    Forward,
    General,
    LanAddress,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    UnknownWsMessage,
    Vmac,
    WsMessage,
    WsType,
    decode_ws_message,
)

HASH = bytes(range(32))
HASH_HEX = HASH.hex()
PACKET = bytes.fromhex("4500001c00010000401100000a4d00010a4d00027878787878787878")

# Each layout written out by hand from PROTOCOL 2.2, field by field.
EXACT_FRAMES: list[tuple[WsMessage, str]] = [
    (
        Auth(IPv4Address("10.0.0.1"), 0x0102030405060708, HASH),
        "00" + "0a000001" + "0102030405060708" + HASH_HEX,
    ),
    (Forward(PACKET), "01" + PACKET.hex()),
    (
        ExptTun(-2, IPv4Interface("192.168.202.7/24"), HASH),
        "02" + "fffffffffffffffe" + b"192.168.202.7/24".hex() + "00" * 16 + HASH_HEX,
    ),
    (
        Udp4Conn(
            IPv4Address("192.168.202.1"),
            IPv4Address("192.168.202.9"),
            IPv4Address("10.98.0.2"),
            0xD96A,
        ),
        "03" + "c0a8ca01" + "c0a8ca09" + "0a620002" + "d96a",
    ),
    (
        Vmac("0123456789abcdef", 1, HASH),
        "04" + b"0123456789abcdef".hex() + "0000000000000001" + HASH_HEX,
    ),
    (Discovery(IPv4Address("10.0.0.1"), BROADCAST), "05" + "0a000001" + "ffffffff"),
    (SystemRoutes(()), "06" + "00" + "0000"),
    (
        SystemRoutes(
            (
                SystemRoute(
                    IPv4Address("172.30.0.0"),
                    IPv4Address("255.255.0.0"),
                    IPv4Address("10.77.0.9"),
                ),
                SystemRoute(
                    IPv4Address("0.0.0.0"), IPv4Address("0.0.0.0"), IPv4Address("10.77.0.1")
                ),
            )
        ),
        "06" + "02" + "0000" + "ac1e0000ffff00000a4d0009" + "00000000000000000a4d0001",
    ),
    (
        General(7, 0xBEEF, IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), b"xyz"),
        "ff" + "07" + "beef" + "0a000001" + "0a000002" + b"xyz".hex(),
    ),
    (
        LanAddress(
            IPv4Address("10.0.0.1"),
            IPv4Address("10.0.0.2"),
            IPv4Address("192.168.1.20"),
            0x1F90,
        ),
        "ff" + "00" + "0000" + "0a000001" + "0a000002" + "c0a80114" + "1f90",
    ),
    (UnknownWsMessage(7, b"\x01\x02"), "07" + "0102"),
    (UnknownWsMessage(254, b""), "fe"),
]

# The smallest valid frame of each fixed or minimum-size layout.
MINIMUM_SIZES = {
    WsType.AUTH: 45,
    WsType.FORWARD: 21,
    WsType.EXPTTUN: 73,
    WsType.UDP4CONN: 15,
    WsType.VMAC: 57,
    WsType.DISCOVERY: 9,
    WsType.ROUTE: 4,
    WsType.GENERAL: 12,
}


def _frame_ids() -> list[str]:
    return [f"{type(message).__name__}-{index}" for index, (message, _) in enumerate(EXACT_FRAMES)]


@pytest.mark.parametrize(("message", "frame_hex"), EXACT_FRAMES, ids=_frame_ids())
def test_encode_gives_exact_bytes(message: WsMessage, frame_hex: str) -> None:
    assert message.encode().hex() == frame_hex


@pytest.mark.parametrize(("message", "frame_hex"), EXACT_FRAMES, ids=_frame_ids())
def test_decode_exact_bytes(message: WsMessage, frame_hex: str) -> None:
    assert decode_ws_message(bytes.fromhex(frame_hex)) == message


# In the other layouts, bytes after the header are the payload itself.
FIXED_SIZE_FRAMES = [
    (message, frame_hex)
    for message, frame_hex in EXACT_FRAMES
    if not isinstance(message, Forward | General | UnknownWsMessage)
]


@pytest.mark.parametrize(("message", "frame_hex"), FIXED_SIZE_FRAMES)
def test_trailing_bytes_are_ignored(message: WsMessage, frame_hex: str) -> None:
    assert decode_ws_message(bytes.fromhex(frame_hex) + b"\xaa" * 7) == message


@pytest.mark.parametrize(("message_type", "size"), MINIMUM_SIZES.items())
def test_truncated_frames_raise_decode_error(message_type: WsType, size: int) -> None:
    for length in range(1, size):
        frame = bytes([message_type]) + b"\x00" * (length - 1)
        with pytest.raises(DecodeError):
            decode_ws_message(frame)


def test_empty_frame_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_ws_message(b"")


def test_route_with_fewer_entries_than_count_raises() -> None:
    frame = bytes.fromhex("06" + "02" + "0000" + "ac1e0000ffff00000a4d0009")
    with pytest.raises(DecodeError, match="2 entries"):
        decode_ws_message(frame)


def test_route_reserved_field_is_ignored_on_decode() -> None:
    frame = bytes.fromhex("06" + "00" + "abcd")
    assert decode_ws_message(frame) == SystemRoutes(())


def test_route_with_non_contiguous_mask_raises() -> None:
    frame = bytes.fromhex("06" + "01" + "0000" + "ac1e0000ff00ff000a4d0009")
    with pytest.raises(DecodeError, match="contiguous"):
        decode_ws_message(frame)


def test_route_encode_refuses_more_than_255_entries() -> None:
    route = SystemRoute(IPv4Address("10.0.0.0"), IPv4Address("255.0.0.0"), IPv4Address("1.2.3.4"))
    assert len(SystemRoutes((route,) * 255).encode()) == 4 + 255 * 12
    with pytest.raises(ValueError, match="256 routes"):
        SystemRoutes((route,) * 256).encode()


def test_system_route_network() -> None:
    route = SystemRoute(
        IPv4Address("172.30.1.2"), IPv4Address("255.255.0.0"), IPv4Address("10.77.0.9")
    )
    assert route.network == IPv4Network("172.30.0.0/16")


@pytest.mark.parametrize(
    "cidr_text",
    [b"", b"not-an-address", b"10.0.0.1/33", b"300.1.2.3/24", b"10.0.0.\xff/24", b"::1/128"],
)
def test_expttun_bad_cidr_raises(cidr_text: bytes) -> None:
    frame = b"\x02" + b"\x00" * 8 + cidr_text.ljust(32, b"\x00") + HASH
    with pytest.raises(DecodeError):
        decode_ws_message(frame)


def test_expttun_cidr_without_nul_raises() -> None:
    frame = b"\x02" + b"\x00" * 8 + b"1" * 32 + HASH
    with pytest.raises(DecodeError):
        decode_ws_message(frame)


def test_expttun_ignores_bytes_after_nul() -> None:
    raw_cidr = b"10.0.0.1/8\x00garbage".ljust(32, b"\x00")
    decoded = decode_ws_message(b"\x02" + b"\x00" * 8 + raw_cidr + HASH)
    assert isinstance(decoded, ExptTun)
    assert decoded.cidr == IPv4Interface("10.0.0.1/8")


def test_vmac_non_ascii_raises() -> None:
    frame = b"\x04" + b"\xc3\xa9" + b"a" * 14 + b"\x00" * 8 + HASH
    with pytest.raises(DecodeError, match="ASCII"):
        decode_ws_message(frame)


def test_general_subtype_zero_with_short_data_raises() -> None:
    frame = bytes.fromhex("ff000000" + "0a000001" + "0a000002" + "c0a80114")
    with pytest.raises(DecodeError):
        decode_ws_message(frame)


def test_forward_encode_refuses_short_packet() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        Forward(b"\x45" * 19).encode()


@pytest.mark.parametrize(
    "message",
    [
        Auth(IPv4Address("10.0.0.1"), 0, b"short"),
        Auth(IPv4Address("10.0.0.1"), 2**63, HASH),
        ExptTun(0, IPv4Interface("10.0.0.1/24"), HASH + b"x"),
        Vmac("0123456789abcde", 0, HASH),
        Vmac("0123456789abcdé", 0, HASH),
        Udp4Conn(IPv4Address("1.1.1.1"), IPv4Address("2.2.2.2"), IPv4Address("3.3.3.3"), 65536),
        General(256, 0, IPv4Address("1.1.1.1"), IPv4Address("2.2.2.2"), b""),
        LanAddress(IPv4Address("1.1.1.1"), IPv4Address("2.2.2.2"), IPv4Address("3.3.3.3"), -1),
        UnknownWsMessage(300, b""),
        SystemRoutes((SystemRoute(IPv4Address("1.0.0.0"), IPv4Address("255.0.255.0"), BROADCAST),)),
    ],
)
def test_encode_refuses_unrepresentable_fields(message: WsMessage) -> None:
    with pytest.raises(ValueError):
        message.encode()


def test_hashed_messages_create_and_verify() -> None:
    tun_ip = IPv4Address("192.168.202.1")
    auth = Auth.create("secret", tun_ip, 1_700_000_000)
    expttun = ExptTun.create("secret", IPv4Interface("0.0.0.0/0"), 1_700_000_000)
    vmac = Vmac.create("secret", "1eb9fcc6f6a90f6f", 1_700_000_000)
    for message in (auth, expttun, vmac):
        assert message.verify("secret")
        assert not message.verify("Secret")
        assert not message.verify("")


def test_empty_password_is_allowed() -> None:
    assert Auth.create("", IPv4Address("10.0.0.1"), 5).verify("")


def test_vmac_with_bad_vmac_does_not_verify() -> None:
    assert not Vmac("short", 0, HASH).verify("secret")


# --- round trips ---------------------------------------------------------------

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
timestamps = st.integers(-(2**63), 2**63 - 1)
hashes = st.binary(min_size=32, max_size=32)
ports = st.integers(0, 0xFFFF)
interfaces = st.builds(
    lambda address, prefix: IPv4Interface((address, prefix)), addresses, st.integers(0, 32)
)
vmacs = st.text(alphabet=st.characters(max_codepoint=127), min_size=16, max_size=16)
masks = st.integers(0, 32).map(lambda prefix: IPv4Network(f"0.0.0.0/{prefix}").netmask)
system_routes = st.builds(SystemRoute, addresses, masks, addresses)
known_types = {int(member) for member in WsType}

ws_messages = st.one_of(
    st.builds(Auth, addresses, timestamps, hashes),
    st.builds(Forward, st.binary(min_size=20, max_size=200)),
    st.builds(ExptTun, timestamps, interfaces, hashes),
    st.builds(Udp4Conn, addresses, addresses, addresses, ports),
    st.builds(Vmac, vmacs, timestamps, hashes),
    st.builds(Discovery, addresses, addresses),
    st.builds(SystemRoutes, st.lists(system_routes, max_size=20).map(tuple)),
    st.builds(
        General,
        # Subtype 0x50 decodes to a NameAnnouncement (test_ws_names.py).
        st.integers(1, 255).filter(lambda subtype: subtype != GENERAL_NAME),
        st.integers(0, 0xFFFF),
        addresses,
        addresses,
        st.binary(max_size=100),
    ),
    st.builds(LanAddress, addresses, addresses, addresses, ports),
    st.builds(
        UnknownWsMessage,
        st.integers(0, 255).filter(lambda value: value not in known_types),
        st.binary(max_size=100),
    ),
)


@given(ws_messages)
def test_round_trip(message: WsMessage) -> None:
    frame = message.encode()
    assert decode_ws_message(frame) == message
    assert decode_ws_message(frame).encode() == frame
