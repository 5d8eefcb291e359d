"""Bytes captured from a real Candy client and server (tests/vectors)."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest

from p2pvpn.wire.crypto import DatagramCipher, peer_key
from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.ipv4 import (
    decapsulate_ipip,
    encapsulate_ipip,
    ipv4_checksum,
    parse_ipv4_header,
)
from p2pvpn.wire.peer import Delay, Heartbeat, decode_peer_message
from p2pvpn.wire.stun import decode_binding_request, encode_binding_request
from p2pvpn.wire.ws import (
    Auth,
    ExptTun,
    Forward,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    Vmac,
    decode_ws_message,
)

EXPECTED_CLASS = {
    "AUTH": Auth,
    "FORWARD": Forward,
    "EXPTTUN": ExptTun,
    "UDP4CONN": Udp4Conn,
    "VMAC": Vmac,
}
CLIENT_TUN_IP = IPv4Address("192.168.202.1")
PEER_TUN_IP = IPv4Address("192.168.202.9")
IPPROTO_ICMP = 1
ICMP_HEADER_SIZE = 8


def _client_frame(vectors: dict[str, Any], frame_type: str) -> bytes:
    (frame_hex,) = [f["hex"] for f in vectors["client_to_server_ws"] if f["type"] == frame_type]
    return bytes.fromhex(frame_hex)


def _server_frame(vectors: dict[str, Any], name_prefix: str) -> bytes:
    (frame_hex,) = [
        value
        for name, value in vectors["server_to_client_ws"].items()
        if name.startswith(name_prefix)
    ]
    return bytes.fromhex(frame_hex)


def test_client_frames_decode_and_reencode_identically(candy_vectors: dict[str, Any]) -> None:
    for frame in candy_vectors["client_to_server_ws"]:
        raw = bytes.fromhex(frame["hex"])
        message = decode_ws_message(raw)
        assert isinstance(message, EXPECTED_CLASS[frame["type"]]), frame["type"]
        assert message.encode() == raw, frame["type"]


@pytest.mark.parametrize("frame_type", ["VMAC", "EXPTTUN", "AUTH"])
def test_client_hashes_verify_with_the_password_only(
    candy_vectors: dict[str, Any], frame_type: str
) -> None:
    message = decode_ws_message(_client_frame(candy_vectors, frame_type))
    assert isinstance(message, Auth | ExptTun | Vmac)
    assert message.verify(candy_vectors["password"])
    assert not message.verify("another-password")
    assert not message.verify("")


def test_client_login_fields(candy_vectors: dict[str, Any]) -> None:
    vmac = decode_ws_message(_client_frame(candy_vectors, "VMAC"))
    expttun = decode_ws_message(_client_frame(candy_vectors, "EXPTTUN"))
    auth = decode_ws_message(_client_frame(candy_vectors, "AUTH"))
    assert isinstance(vmac, Vmac)
    assert isinstance(expttun, ExptTun)
    assert isinstance(auth, Auth)
    assert vmac.vmac == "1eb9fcc6f6a90f6f"
    assert expttun.cidr == IPv4Interface("0.0.0.0/0")
    assert auth.tun_ip == CLIENT_TUN_IP
    assert vmac.timestamp == expttun.timestamp == auth.timestamp == 0x6B06A41A


def test_client_udp4conn(candy_vectors: dict[str, Any]) -> None:
    message = decode_ws_message(_client_frame(candy_vectors, "UDP4CONN"))
    assert message == Udp4Conn(CLIENT_TUN_IP, PEER_TUN_IP, IPv4Address("10.98.0.2"), 55658)


def test_client_forward_is_a_valid_ipv4_packet(candy_vectors: dict[str, Any]) -> None:
    # The capture is an ICMP port-unreachable from the client back to the peer
    # (quoting the peer's UDP datagram), not an IPIP packet.
    message = decode_ws_message(_client_frame(candy_vectors, "FORWARD"))
    assert isinstance(message, Forward)
    header = parse_ipv4_header(message.packet)
    assert (header.source, header.destination) == (CLIENT_TUN_IP, PEER_TUN_IP)
    assert header.total_length == len(message.packet)
    assert header.protocol == IPPROTO_ICMP
    assert ipv4_checksum(message.packet[: header.header_length]) == 0
    with pytest.raises(DecodeError, match="not IPIP"):
        decapsulate_ipip(message.packet)

    quoted = parse_ipv4_header(message.packet[header.header_length + ICMP_HEADER_SIZE :])
    assert (quoted.source, quoted.destination) == (PEER_TUN_IP, CLIENT_TUN_IP)
    assert ipv4_checksum(message.packet[28:48]) == 0


def test_client_forward_survives_ipip_encapsulation(candy_vectors: dict[str, Any]) -> None:
    message = decode_ws_message(_client_frame(candy_vectors, "FORWARD"))
    assert isinstance(message, Forward)
    outer = encapsulate_ipip(message.packet, CLIENT_TUN_IP, IPv4Address("10.77.0.9"))
    assert ipv4_checksum(outer[:20]) == 0
    inner = decapsulate_ipip(outer)
    assert inner == message.packet
    header = parse_ipv4_header(inner)
    assert (header.source, header.destination) == (CLIENT_TUN_IP, PEER_TUN_IP)


def test_udp_datagrams_open_with_the_peer_key(candy_vectors: dict[str, Any]) -> None:
    udp = candy_vectors["udp_client_to_peer"]
    password = candy_vectors["password"]
    client_ip = IPv4Address(udp["client_tun_ip"])
    peer_ip = IPv4Address(udp["peer_tun_ip"])
    cipher = DatagramCipher(peer_key(password, peer_ip))
    kinds = set()
    for datagram in udp["datagrams"]:
        plaintext = cipher.open(bytes.fromhex(datagram["hex"]))
        assert plaintext.hex() == datagram["plaintext"]
        message = decode_peer_message(plaintext)
        assert message.encode() == plaintext
        if isinstance(message, Heartbeat):
            assert message.tun_ip == client_ip
        else:
            assert isinstance(message, Delay)
            assert (message.src, message.dst) == (client_ip, peer_ip)
        kinds.add(type(message))
    assert kinds == {Heartbeat, Delay}


def test_udp_heartbeats_carry_ack(candy_vectors: dict[str, Any]) -> None:
    plaintexts = [
        bytes.fromhex(d["plaintext"]) for d in candy_vectors["udp_client_to_peer"]["datagrams"]
    ]
    acks = [m.ack for m in map(decode_peer_message, plaintexts) if isinstance(m, Heartbeat)]
    assert acks == [False, True, True, True, True]


def test_udp_datagrams_do_not_open_with_other_keys(candy_vectors: dict[str, Any]) -> None:
    udp = candy_vectors["udp_client_to_peer"]
    password = candy_vectors["password"]
    wrong_keys = [
        peer_key(password, IPv4Address(udp["client_tun_ip"])),
        peer_key("another-password", IPv4Address(udp["peer_tun_ip"])),
    ]
    datagram = bytes.fromhex(udp["datagrams"][0]["hex"])
    for key in wrong_keys:
        with pytest.raises(DecodeError):
            DatagramCipher(key).open(datagram)


def test_server_expttun_grant(candy_vectors: dict[str, Any]) -> None:
    raw = _server_frame(candy_vectors, "expttun_grant")
    message = decode_ws_message(raw)
    assert isinstance(message, ExptTun)
    assert message.cidr == IPv4Interface("10.77.0.1/24")
    assert message.verify(candy_vectors["password"])
    assert not message.verify("another-password")
    assert message.encode() == raw


def test_server_route(candy_vectors: dict[str, Any]) -> None:
    raw = _server_frame(candy_vectors, "route_after_auth")
    message = decode_ws_message(raw)
    assert isinstance(message, SystemRoutes)
    assert message == SystemRoutes(
        (
            SystemRoute(
                IPv4Address("172.30.0.0"), IPv4Address("255.255.0.0"), IPv4Address("10.77.0.9")
            ),
        )
    )
    assert message.routes[0].network == IPv4Network("172.30.0.0/16")
    assert message.encode() == raw


def test_server_forward_relayed(candy_vectors: dict[str, Any]) -> None:
    raw = _server_frame(candy_vectors, "forward_relayed")
    message = decode_ws_message(raw)
    assert isinstance(message, Forward)
    header = parse_ipv4_header(message.packet)
    assert (header.source, header.destination) == (
        IPv4Address("10.77.0.1"),
        IPv4Address("10.77.0.2"),
    )
    assert message.encode() == raw


def test_stun_binding_request_matches_capture(candy_vectors: dict[str, Any]) -> None:
    captured = bytes.fromhex(candy_vectors["stun_binding_request"])
    transaction_id = decode_binding_request(captured)
    assert transaction_id == captured[8:20]
    assert encode_binding_request(transaction_id) == captured
