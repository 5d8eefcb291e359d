"""No input may make a decoder raise anything but DecodeError (ARCHITECTURE: fuzzing).

Besides arbitrary bytes, inputs are built to get past the first checks: a
valid type byte with random fields, and real captured frames with bytes
flipped, cut off or appended.
"""

import contextlib
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvpn.wire.crypto import DatagramCipher
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import decapsulate_ipip, ipv4_destination, ipv4_source, parse_ipv4_header
from p2pvpn.wire.peer import PeerType, decode_peer_message
from p2pvpn.wire.stun import (
    MAGIC_COOKIE,
    decode_binding_request,
    decode_binding_response,
    looks_like_stun,
)
from p2pvpn.wire.ws import WsType, decode_ws_message

FUZZ_SETTINGS = settings(max_examples=200, deadline=None)
CIPHER = DatagramCipher(bytes(32))

DECODERS: list[Callable[[bytes], object]] = [
    decode_ws_message,
    decode_peer_message,
    decode_binding_request,
    decode_binding_response,
    parse_ipv4_header,
    ipv4_source,
    ipv4_destination,
    decapsulate_ipip,
    CIPHER.open,
]


def _check_reencoding(data: bytes) -> None:
    """Whatever decodes must encode again, and a WebSocket message to itself."""
    try:
        ws_message = decode_ws_message(data)
    except DecodeError:
        pass
    else:
        assert decode_ws_message(ws_message.encode()) == ws_message
    try:
        peer_message = decode_peer_message(data)
    except DecodeError:
        pass
    else:
        decode_peer_message(peer_message.encode())
    try:
        response = decode_binding_response(data)
    except DecodeError:
        pass
    else:
        assert decode_binding_response(response.encode()) == response


def _feed_every_decoder(data: bytes) -> None:
    looks_like_stun(data)
    for decoder in DECODERS:
        with contextlib.suppress(DecodeError):
            decoder(data)
    _check_reencoding(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    _feed_every_decoder(data)


@FUZZ_SETTINGS
@given(
    st.sampled_from(sorted({int(t) for t in WsType} | {int(t) for t in PeerType})),
    st.binary(max_size=120),
)
def test_known_type_byte_with_random_fields(type_byte: int, rest: bytes) -> None:
    _feed_every_decoder(bytes([type_byte]) + rest)


@FUZZ_SETTINGS
@given(
    st.sampled_from([0x0001, 0x0101]),
    st.integers(0, 0xFFFF),
    st.binary(min_size=12, max_size=12),
    st.lists(
        st.tuples(st.sampled_from([0x0001, 0x0020, 0x8022, 0x0008]), st.binary(max_size=24)),
        max_size=5,
    ),
)
def test_stun_shaped_input(
    message_type: int, length: int, transaction_id: bytes, attributes: list[tuple[int, bytes]]
) -> None:
    body = b"".join(
        kind.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
        for kind, value in attributes
    )
    header = message_type.to_bytes(2, "big") + length.to_bytes(2, "big")
    header += MAGIC_COOKIE.to_bytes(4, "big") + transaction_id
    _feed_every_decoder(header + body)
    # The same attributes with a consistent length field.
    consistent = message_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + header[4:]
    _feed_every_decoder(consistent + body)


def _captured_frames(candy_vectors: dict[str, Any], rfc5769_vector: dict[str, Any]) -> list[bytes]:
    hex_frames = [frame["hex"] for frame in candy_vectors["client_to_server_ws"]]
    hex_frames += list(candy_vectors["server_to_client_ws"].values())
    hex_frames += [d["plaintext"] for d in candy_vectors["udp_client_to_peer"]["datagrams"]]
    hex_frames += [d["hex"] for d in candy_vectors["udp_client_to_peer"]["datagrams"]]
    hex_frames += [candy_vectors["stun_binding_request"], rfc5769_vector["response_hex"]]
    frames = [bytes.fromhex(frame) for frame in hex_frames]
    # The IPv4 packets inside FORWARD frames, for the IPv4 parsers.
    frames += [frame[1:] for frame in frames if frame[:2] == b"\x01\x45"]
    return frames


@st.composite
def _mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    mutated = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "truncate", "extend", "delete"]))
        if action == "extend":
            mutated += draw(st.binary(min_size=1, max_size=40))
        elif not mutated:
            continue
        elif action == "flip":
            index = draw(st.integers(0, len(mutated) - 1))
            mutated[index] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del mutated[draw(st.integers(0, len(mutated) - 1)) :]
        else:
            del mutated[draw(st.integers(0, len(mutated) - 1))]
    return bytes(mutated)


@FUZZ_SETTINGS
@given(st.data())
def test_mutated_captured_frames(
    candy_vectors: dict[str, Any], rfc5769_vector: dict[str, Any], data: st.DataObject
) -> None:
    frame = data.draw(st.sampled_from(_captured_frames(candy_vectors, rfc5769_vector)))
    _feed_every_decoder(data.draw(_mutated(frame)))
