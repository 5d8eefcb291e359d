"""STUN binding request/response (RFC 5389, PROTOCOL 3.3)."""

from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.stun import (
    MAGIC_COOKIE,
    BindingResponse,
    decode_binding_request,
    decode_binding_response,
    encode_binding_request,
    encode_binding_response,
    looks_like_stun,
)

TRANSACTION_ID = bytes.fromhex("0102030405060708090a0b0c")
HEADER_TAIL = "2112a442" + TRANSACTION_ID.hex()

# 203.0.113.5:8080 as XOR-MAPPED-ADDRESS: port ^ 0x2112, address ^ 0x2112a442.
XOR_MAPPED_203_0_113_5_8080 = "0020" + "0008" + "00" + "01" + "3e82" + "ea12d547"
MAPPED_198_51_100_7_9000 = "0001" + "0008" + "00" + "01" + "2328" + "c6336407"
IPV6_XOR_MAPPED = "0020" + "0014" + "00" + "02" + "3e82" + "ab" * 16


def _response(*attributes_hex: str) -> bytes:
    body = "".join(attributes_hex)
    return bytes.fromhex("0101" + f"{len(body) // 2:04x}" + HEADER_TAIL + body)


def test_binding_request_exact_bytes() -> None:
    assert encode_binding_request(TRANSACTION_ID).hex() == (
        "0001" + "0008" + HEADER_TAIL + "0003" + "0004" + "00000000"
    )


def test_binding_request_decodes_to_its_transaction_id() -> None:
    request = encode_binding_request(TRANSACTION_ID)
    assert decode_binding_request(request) == TRANSACTION_ID
    assert decode_binding_request(request + b"\x00" * 4) == TRANSACTION_ID


def test_binding_request_without_attributes_decodes() -> None:
    assert decode_binding_request(bytes.fromhex("0001" + "0000" + HEADER_TAIL)) == TRANSACTION_ID


@pytest.mark.parametrize(
    "request_hex",
    [
        "0101" + "0000" + HEADER_TAIL,  # a response, not a request
        "0001" + "0000" + "2112a443" + TRANSACTION_ID.hex(),  # wrong cookie
        "0001" + "0008" + HEADER_TAIL,  # announces 8 bytes of attributes it lacks
        ("0001" + "0000" + HEADER_TAIL)[:-2],  # short header
    ],
)
def test_bad_binding_request_raises(request_hex: str) -> None:
    with pytest.raises(DecodeError):
        decode_binding_request(bytes.fromhex(request_hex))


def test_binding_response_exact_bytes() -> None:
    encoded = encode_binding_response(TRANSACTION_ID, (IPv4Address("203.0.113.5"), 8080))
    expected = _response(XOR_MAPPED_203_0_113_5_8080, "0001000800011f90cb007105")
    assert encoded == expected


def test_response_prefers_xor_mapped_address() -> None:
    data = _response(MAPPED_198_51_100_7_9000, XOR_MAPPED_203_0_113_5_8080)
    assert decode_binding_response(data) == BindingResponse(
        TRANSACTION_ID, (IPv4Address("203.0.113.5"), 8080)
    )


def test_response_falls_back_to_mapped_address() -> None:
    data = _response(IPV6_XOR_MAPPED, MAPPED_198_51_100_7_9000)
    assert decode_binding_response(data).address == (IPv4Address("198.51.100.7"), 9000)


def test_response_skips_unknown_attributes_with_padding() -> None:
    software = "8022" + "0005" + b"hello".hex() + "000000"
    data = _response(software, XOR_MAPPED_203_0_113_5_8080)
    assert decode_binding_response(data).address == (IPv4Address("203.0.113.5"), 8080)


def test_response_with_only_ipv6_raises() -> None:
    with pytest.raises(DecodeError, match="no IPv4"):
        decode_binding_response(_response(IPV6_XOR_MAPPED))


def test_response_without_attributes_raises() -> None:
    with pytest.raises(DecodeError):
        decode_binding_response(_response())


def test_response_attribute_running_past_the_message_raises() -> None:
    data = bytes.fromhex("0101" + "0008" + HEADER_TAIL + "0020" + "0008" + "00013e82")
    with pytest.raises(DecodeError):
        decode_binding_response(data)


def test_response_attributes_beyond_announced_length_are_ignored() -> None:
    data = _response() + bytes.fromhex(XOR_MAPPED_203_0_113_5_8080)
    with pytest.raises(DecodeError, match="no IPv4"):
        decode_binding_response(data)


def test_response_trailing_bytes_are_ignored() -> None:
    data = _response(XOR_MAPPED_203_0_113_5_8080) + b"\xff" * 9
    assert decode_binding_response(data).address == (IPv4Address("203.0.113.5"), 8080)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("0001" + "0000" + HEADER_TAIL),  # a request
        bytes.fromhex("0101" + "0000" + "00000000" + TRANSACTION_ID.hex()),
    ],
)
def test_not_a_binding_response_raises(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_binding_response(data)


def test_truncated_response_raises() -> None:
    data = _response(XOR_MAPPED_203_0_113_5_8080)
    for length in range(len(data)):
        with pytest.raises(DecodeError):
            decode_binding_response(data[:length])


def test_rfc5769_sample_response(rfc5769_vector: dict[str, Any]) -> None:
    # SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT surround the address and must be skipped.
    data = bytes.fromhex(rfc5769_vector["response_hex"])
    response = decode_binding_response(data)
    assert response.transaction_id.hex() == rfc5769_vector["transaction_id"]
    assert response.address == (IPv4Address("192.0.2.1"), 32853)
    ip, port = rfc5769_vector["xor_mapped_address"]
    assert response.address == (IPv4Address(ip), port)


def test_looks_like_stun() -> None:
    assert looks_like_stun(encode_binding_request(TRANSACTION_ID))
    assert looks_like_stun(encode_binding_response(TRANSACTION_ID, (IPv4Address("1.2.3.4"), 1)))
    assert not looks_like_stun(b"")
    assert not looks_like_stun(bytes.fromhex("0001" + "0000" + "2112a442"))  # too short
    assert not looks_like_stun(bytes(20))
    assert not looks_like_stun(bytes.fromhex("c001" + "0000" + HEADER_TAIL))  # top bits set


def test_magic_cookie() -> None:
    assert MAGIC_COOKIE.to_bytes(4, "big") == bytes.fromhex("2112a442")


@pytest.mark.parametrize("transaction_id", [b"", b"\x00" * 11, b"\x00" * 13])
def test_encoders_refuse_bad_transaction_id(transaction_id: bytes) -> None:
    with pytest.raises(ValueError):
        encode_binding_request(transaction_id)
    with pytest.raises(ValueError):
        encode_binding_response(transaction_id, (IPv4Address("1.2.3.4"), 1))


@pytest.mark.parametrize("port", [-1, 65536])
def test_response_encoder_refuses_bad_port(port: int) -> None:
    with pytest.raises(ValueError):
        encode_binding_response(TRANSACTION_ID, (IPv4Address("1.2.3.4"), port))


transaction_ids = st.binary(min_size=12, max_size=12)
addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))


@given(transaction_ids)
def test_request_round_trip(transaction_id: bytes) -> None:
    assert decode_binding_request(encode_binding_request(transaction_id)) == transaction_id


@given(transaction_ids, addresses, st.integers(0, 0xFFFF))
def test_response_round_trip(transaction_id: bytes, ip: IPv4Address, port: int) -> None:
    response = BindingResponse(transaction_id, (ip, port))
    encoded = response.encode()
    assert looks_like_stun(encoded)
    assert decode_binding_response(encoded) == response
