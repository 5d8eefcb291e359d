"""STUN binding request and response (RFC 5389), IPv4 only, sans I/O.

Only what a Candy client needs to learn its public UDP mapping and what the
p2pvpn server needs to answer it. Decoders raise only DecodeError.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

from p2pvpn.wire.errors import DecodeError

__all__ = [
    "MAGIC_COOKIE",
    "TRANSACTION_ID_SIZE",
    "BindingResponse",
    "decode_binding_request",
    "decode_binding_response",
    "encode_binding_request",
    "encode_binding_response",
    "looks_like_binding_response",
    "looks_like_stun",
]

MAGIC_COOKIE = 0x2112A442
TRANSACTION_ID_SIZE = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS_RESPONSE = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_XOR_MAPPED_ADDRESS = 0x0020
FAMILY_IPV4 = 0x01

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_CHANGE_REQUEST = struct.Struct("!HHI")
# reserved(1) | family(1) | port(2) | IPv4 address(4): the body of both
# MAPPED-ADDRESS and XOR-MAPPED-ADDRESS for the IPv4 family.
_IPV4_ADDRESS_VALUE = struct.Struct("!xBH4s")
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """The public address a STUN server saw for a binding request."""

    transaction_id: bytes
    address: tuple[IPv4Address, int]

    def encode(self) -> bytes:
        return encode_binding_response(self.transaction_id, self.address)


def _require_transaction_id(transaction_id: bytes) -> None:
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError(
            f"transaction id must be {TRANSACTION_ID_SIZE} bytes, got {len(transaction_id)}"
        )


def looks_like_stun(data: bytes) -> bool:
    """Whether a datagram is STUN rather than an encrypted peer message.

    The two top bits of every STUN message are zero and the cookie is fixed,
    so a random IV matches with probability 2**-34.
    """
    return len(data) >= _HEADER.size and data[0] & 0xC0 == 0 and data[4:8] == _COOKIE_BYTES


def looks_like_binding_response(data: bytes) -> bool:
    """Whether a datagram has the header of a binding success response.

    The data planes hand a datagram from the STUN server's address up as STUN
    only when this holds; anything else from that address is opened like any
    other datagram, so that address cannot be used to smuggle junk upward.
    """
    if len(data) < _HEADER.size:
        return False
    fields: tuple[int, int, int, bytes] = _HEADER.unpack_from(data)
    message_type, length, cookie, _ = fields
    return bool(
        message_type == BINDING_SUCCESS_RESPONSE
        and cookie == MAGIC_COOKIE
        and _HEADER.size + length <= len(data)
    )


def encode_binding_request(transaction_id: bytes) -> bytes:
    """A binding request with CHANGE-REQUEST=0, byte for byte what Candy sends."""
    _require_transaction_id(transaction_id)
    attribute = _CHANGE_REQUEST.pack(ATTR_CHANGE_REQUEST, 4, 0)
    header = _HEADER.pack(BINDING_REQUEST, len(attribute), MAGIC_COOKIE, transaction_id)
    return header + attribute


def _decode_header(data: bytes, expected_type: int) -> tuple[int, bytes]:
    """Check type and cookie; returns (end of the message, transaction id)."""
    if len(data) < _HEADER.size:
        raise DecodeError(f"STUN message needs {_HEADER.size} bytes, got {len(data)}")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type != expected_type:
        raise DecodeError(f"STUN message type {message_type:#06x}, expected {expected_type:#06x}")
    if cookie != MAGIC_COOKIE:
        raise DecodeError(f"STUN magic cookie {cookie:#010x} is wrong")
    end = _HEADER.size + length
    if end > len(data):
        raise DecodeError(f"STUN message announces {end} bytes, got {len(data)}")
    return end, transaction_id


def decode_binding_request(data: bytes) -> bytes:
    """The transaction id of a binding request (its attributes are ignored)."""
    _, transaction_id = _decode_header(data, BINDING_REQUEST)
    return bytes(transaction_id)


def _xor_address(address: IPv4Address, port: int) -> tuple[bytes, int]:
    xored_ip = (int(address) ^ MAGIC_COOKIE).to_bytes(4, "big")
    return xored_ip, port ^ (MAGIC_COOKIE >> 16)


def encode_binding_response(transaction_id: bytes, address: tuple[IPv4Address, int]) -> bytes:
    """A binding success response with XOR-MAPPED-ADDRESS and MAPPED-ADDRESS.

    MAPPED-ADDRESS is there for RFC 3489 clients that predate XOR-MAPPED.
    """
    _require_transaction_id(transaction_id)
    ip, port = address
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    xored_ip, xored_port = _xor_address(ip, port)
    body = b"".join(
        (
            _ATTRIBUTE_HEADER.pack(ATTR_XOR_MAPPED_ADDRESS, _IPV4_ADDRESS_VALUE.size),
            _IPV4_ADDRESS_VALUE.pack(FAMILY_IPV4, xored_port, xored_ip),
            _ATTRIBUTE_HEADER.pack(ATTR_MAPPED_ADDRESS, _IPV4_ADDRESS_VALUE.size),
            _IPV4_ADDRESS_VALUE.pack(FAMILY_IPV4, port, ip.packed),
        )
    )
    header = _HEADER.pack(BINDING_SUCCESS_RESPONSE, len(body), MAGIC_COOKIE, transaction_id)
    return header + body


def _attributes(data: bytes, end: int) -> Iterator[tuple[int, bytes]]:
    offset = _HEADER.size
    while offset + _ATTRIBUTE_HEADER.size <= end:
        attribute_type, length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        value_start = offset + _ATTRIBUTE_HEADER.size
        value_end = value_start + length
        if value_end > end:
            raise DecodeError(f"STUN attribute {attribute_type:#06x} runs past the message")
        yield attribute_type, data[value_start:value_end]
        # Values are padded to a multiple of 4 bytes; the length excludes the padding.
        offset = value_end + (-length % 4)


def _ipv4_address_value(value: bytes) -> tuple[IPv4Address, int] | None:
    """(address, port) from a MAPPED-ADDRESS style value; None for IPv6 or junk."""
    if len(value) < _IPV4_ADDRESS_VALUE.size:
        return None
    family, port, raw_ip = _IPV4_ADDRESS_VALUE.unpack_from(value)
    if family != FAMILY_IPV4:
        return None
    return IPv4Address(raw_ip), port


def decode_binding_response(data: bytes) -> BindingResponse:
    """Transaction id and mapped IPv4 address of a binding success response."""
    end, transaction_id = _decode_header(data, BINDING_SUCCESS_RESPONSE)
    xor_mapped: tuple[IPv4Address, int] | None = None
    mapped: tuple[IPv4Address, int] | None = None
    for attribute_type, value in _attributes(data, end):
        if attribute_type == ATTR_XOR_MAPPED_ADDRESS and xor_mapped is None:
            xor_mapped = _ipv4_address_value(value)
        elif attribute_type == ATTR_MAPPED_ADDRESS and mapped is None:
            mapped = _ipv4_address_value(value)
    if xor_mapped is not None:
        xored_ip, xored_port = xor_mapped
        # XOR is its own inverse, so the encoder's helper also decodes.
        raw_ip, port = _xor_address(xored_ip, xored_port)
        return BindingResponse(bytes(transaction_id), (IPv4Address(raw_ip), port))
    if mapped is not None:
        return BindingResponse(bytes(transaction_id), mapped)
    raise DecodeError("STUN binding response carries no IPv4 mapped address")
