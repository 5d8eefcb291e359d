"""HELLO, NAMES and the GENERAL name announcement (docs/protocol-extensions.md)."""

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.names import clean_label
from p2pvpn.wire.ws import (
    BROADCAST,
    GENERAL_NAME,
    MAX_NAMES_PER_MESSAGE,
    General,
    Hello,
    LanAddress,
    NameAnnouncement,
    NameEntry,
    Names,
    WsMessage,
    WsType,
    decode_general_header,
    decode_ws_message,
    encode_names,
)

A = IPv4Address("10.0.0.1")
B = IPv4Address("10.0.0.2")

# Each layout written out by hand from ISSUE16-API section 2, field by field.
EXACT_FRAMES: list[tuple[WsMessage, str]] = [
    (Hello(), "50" + "01" + "00" + "00"),
    (Hello(exit_node=True), "50" + "01" + "01" + "00"),
    (Names(True, ()), "51" + "01" + "0000"),
    (
        Names(
            False,
            (
                NameEntry(A, "laptop", exit_node=False, p2pvpn=True),
                NameEntry(B, "", exit_node=False, p2pvpn=False),
                NameEntry(IPv4Address("10.0.0.7"), "gw-7", exit_node=True, p2pvpn=True),
            ),
        ),
        "51" + "00" + "0003"
        + "0a000001" + "02" + "06" + b"laptop".hex()
        + "0a000002" + "00" + "00"
        + "0a000007" + "03" + "04" + b"gw-7".hex(),
    ),
    (
        NameAnnouncement(A, BROADCAST, "laptop", exit_node=True, reply_wanted=True),
        "ff" + "50" + "0003" + "0a000001" + "ffffffff" + b"laptop".hex(),
    ),
    (NameAnnouncement(A, B, ""), "ff" + "50" + "0000" + "0a000001" + "0a000002"),
    (
        NameAnnouncement(A, B, "pc", reply_wanted=True),
        "ff" + "50" + "0002" + "0a000001" + "0a000002" + b"pc".hex(),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("message", "frame_hex"), EXACT_FRAMES)
def test_encode_gives_exact_bytes(message: WsMessage, frame_hex: str) -> None:
    assert message.encode().hex() == frame_hex


@pytest.mark.parametrize(("message", "frame_hex"), EXACT_FRAMES)
def test_decode_exact_bytes(message: WsMessage, frame_hex: str) -> None:
    assert decode_ws_message(bytes.fromhex(frame_hex)) == message


def test_type_numbers() -> None:
    assert (WsType.HELLO, WsType.NAMES, GENERAL_NAME) == (0x50, 0x51, 0x50)


def test_hello_longer_frames_and_other_versions_are_accepted() -> None:
    assert decode_ws_message(bytes.fromhex("50" + "02" + "ff" + "00" + "abcdef")) == Hello(True)


def test_names_trailing_bytes_are_ignored() -> None:
    frame = Names(True, (NameEntry(A, "pc"),)).encode()
    assert decode_ws_message(frame + b"\xaa\xbb") == Names(True, (NameEntry(A, "pc"),))


def test_a_candy_lan_address_still_decodes() -> None:
    frame = bytes.fromhex("ff" + "00" + "0000" + "0a000001" + "0a000002" + "c0a80114" + "1f90")
    assert decode_ws_message(frame) == LanAddress(A, B, IPv4Address("192.168.1.20"), 0x1F90)


def test_other_general_subtypes_stay_general() -> None:
    frame = General(0x51, 7, A, B, b"NAME").encode()
    assert decode_ws_message(frame) == General(0x51, 7, A, B, b"NAME")


def test_decode_general_header_leaves_the_data_alone() -> None:
    junk = General(GENERAL_NAME, 0, A, B, b"Not A Label!").encode()
    with pytest.raises(DecodeError):
        decode_ws_message(junk)
    assert decode_general_header(junk) == General(GENERAL_NAME, 0, A, B, b"Not A Label!")
    with pytest.raises(DecodeError):
        decode_general_header(junk[:11])
    with pytest.raises(DecodeError):
        decode_general_header(b"\x05" + junk[1:])


@pytest.mark.parametrize(
    "frame_hex",
    [
        "50",
        "500100",
        "51",
        "5100",
        "510000",
        "51000001" + "0a000001" + "00",  # entry header cut off
        "51000001" + "0a000001" + "00" + "05" + b"pc".hex(),  # name cut off
        "51000002" + "0a000001" + "00" + "02" + b"pc".hex(),  # second entry missing
        "51000001" + "0a000001" + "00" + "02" + b"PC".hex(),  # not lowercase
        "51000001" + "0a000001" + "00" + "03" + b"-pc".hex(),  # leading dash
        "51000001" + "0a000001" + "00" + "02" + "c3a9",  # not ASCII
        "51000001" + "0a000001" + "00" + "40" + "61" * 64,  # 64 characters
        "5100" + "0101" + ("0a00000100" + "00") * 257,  # 257 entries
        "ff500000" + "0a000001" + "0a000002" + b"a.b".hex(),
        "ff500000" + "0a000001" + "0a000002" + "ff",
        "ff500000" + "0a000001" + "0a000002" + "61" * 64,
        "ff500000" + "0a000001" + "0a0000",
    ],
)
def test_junk_raises_decode_error(frame_hex: str) -> None:
    with pytest.raises(DecodeError):
        decode_ws_message(bytes.fromhex(frame_hex))


@pytest.mark.parametrize(
    "message",
    [
        Names(False, (NameEntry(A, "Laptop"),)),
        Names(False, (NameEntry(A, "a" * 64),)),
        Names(False, (NameEntry(A, "pc"),) * (MAX_NAMES_PER_MESSAGE + 1)),
        NameAnnouncement(A, B, "my laptop"),
        NameAnnouncement(A, B, "ü"),
    ],
)
def test_encode_refuses_what_the_layout_cannot_carry(message: WsMessage) -> None:
    with pytest.raises(ValueError):
        message.encode()


def test_encode_names_splits_at_256() -> None:
    entries = [NameEntry(IPv4Address(0x0A000000 + index), f"m{index}") for index in range(600)]
    frames = encode_names(entries, replace=True)
    decoded = [decode_ws_message(frame) for frame in frames]
    assert [len(message.entries) for message in decoded if isinstance(message, Names)] == [
        256,
        256,
        88,
    ]
    assert [isinstance(message, Names) and message.replace for message in decoded] == [
        True,
        False,
        False,
    ]
    assert [
        entry for message in decoded if isinstance(message, Names) for entry in message.entries
    ] == entries
    assert len(encode_names(entries[:256], replace=False)) == 1


def test_encode_names_of_nothing() -> None:
    assert encode_names([], replace=True) == [Names(True, ()).encode()]
    assert encode_names([], replace=False) == []


addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
labels = st.text(max_size=70).map(clean_label)
name_entries = st.builds(NameEntry, addresses, labels, st.booleans(), st.booleans())
extension_messages = st.one_of(
    st.builds(Hello, st.booleans()),
    st.builds(Names, st.booleans(), st.lists(name_entries, max_size=20).map(tuple)),
    st.builds(NameAnnouncement, addresses, addresses, labels, st.booleans(), st.booleans()),
)


@given(extension_messages)
def test_round_trip(message: WsMessage) -> None:
    frame = message.encode()
    assert decode_ws_message(frame) == message
    assert decode_ws_message(frame).encode() == frame


@given(st.lists(name_entries, max_size=700), st.booleans())
def test_encode_names_round_trip(entries: list[NameEntry], replace: bool) -> None:
    decoded = [decode_ws_message(frame) for frame in encode_names(entries, replace)]
    assert all(isinstance(message, Names) for message in decoded)
    assert [
        entry for message in decoded if isinstance(message, Names) for entry in message.entries
    ] == entries


@given(st.sampled_from([0x50, 0x51, 0xFF]), st.binary(max_size=300))
def test_extension_type_bytes_with_random_fields_raise_only_decode_error(
    type_byte: int, rest: bytes
) -> None:
    frame = bytes([type_byte]) + (bytes([GENERAL_NAME]) + rest if type_byte == 0xFF else rest)
    try:
        message = decode_ws_message(frame)
    except DecodeError:
        return
    assert decode_ws_message(message.encode()) == message
