"""The exit node's side of the data plane (set_forwarded_wrap), run once per backend.

An exit node's kernel forwards a member's internet traffic and routes the
replies back into the TUN: their source is an internet host, their
destination the member. Wrapped in IPIP from the exit node's own address,
a relay and Candy peers carry them like any packet of the exit node, and the
member, whose exit routes (the complement of the VPN network via the exit
node) put the internet behind the exit node, unwraps them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from p2pvpn.dataplane.base import DropReason
from p2pvpn.wire.crypto import DatagramCipher
from p2pvpn.wire.ipv4 import encapsulate_ipip, ipv4_checksum
from tests.dataplane.conftest import Node, NodeFactory, eventually, ipv4_packet, settle
from tests.dataplane.offload_reference import (
    Ipv4Fields,
    TcpFields,
    same_packets,
    segment_frame,
    tcp_super_packet,
)

VPN = IPv4Network("10.9.0.0/24")
EXIT, MEMBER, OTHER = "10.9.0.1", "10.9.0.2", "10.9.0.3"
INTERNET = "198.51.100.1"


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(body)


def exit_routes(exit_address: str) -> list[tuple[IPv4Network, IPv4Address]]:
    """What a member using the exit node gives its data plane (API section 6)."""
    everything = IPv4Network("0.0.0.0/0")
    return [(network, IPv4Address(exit_address)) for network in everything.address_exclude(VPN)]


def started_exit_node(make_node: NodeFactory) -> Node:
    node = make_node(EXIT)
    node.plane.set_forwarded_wrap(VPN)
    node.plane.start()
    return node


def test_a_forwarded_reply_is_wrapped_toward_its_member(make_node: NodeFactory) -> None:
    async def body() -> None:
        exit_node = started_exit_node(make_node)
        replies = [ipv4_packet(INTERNET, MEMBER, b"r" * size, ident=size) for size in (0, 1400)]
        exit_node.inject(*replies)
        # No direct path to the member: up for the server, wrapped byte for byte
        # as the reference wraps it.
        await eventually(lambda: len(exit_node.events.relay) == len(replies))
        assert exit_node.events.relay == [
            encapsulate_ipip(reply, exit_node.tun_ip, IPv4Address(MEMBER)) for reply in replies
        ]
        assert all(ipv4_checksum(wrapped[:20]) == 0 for wrapped in exit_node.events.relay)

    run(body())


def test_own_and_member_sources_and_outside_destinations_stay_plain(
    make_node: NodeFactory,
) -> None:
    async def body() -> None:
        exit_node = started_exit_node(make_node)
        plain = [
            ipv4_packet(EXIT, MEMBER),  # the exit node's own packet
            ipv4_packet(OTHER, MEMBER),  # a member's source (relayed by the kernel)
            ipv4_packet(INTERNET, "203.0.113.9"),  # not to a member
            ipv4_packet(INTERNET, EXIT),  # to ourselves
        ]
        exit_node.inject(*plain)
        await eventually(lambda: len(exit_node.events.relay) == len(plain))
        assert exit_node.events.relay == plain

    run(body())


def test_none_turns_the_wrapping_off(make_node: NodeFactory) -> None:
    async def body() -> None:
        exit_node = started_exit_node(make_node)
        reply = ipv4_packet(INTERNET, MEMBER)
        exit_node.plane.set_forwarded_wrap(None)
        exit_node.inject(reply)
        await eventually(lambda: len(exit_node.events.relay) == 1)
        assert exit_node.events.relay == [reply]
        exit_node.plane.set_forwarded_wrap(VPN)
        exit_node.inject(reply)
        await eventually(lambda: len(exit_node.events.relay) == 2)
        assert exit_node.events.relay[1] == encapsulate_ipip(
            reply, exit_node.tun_ip, IPv4Address(MEMBER)
        )

    run(body())


def test_sysroutes_still_wrap_the_exit_nodes_own_packets(make_node: NodeFactory) -> None:
    async def body() -> None:
        exit_node = started_exit_node(make_node)
        exit_node.plane.set_sysroutes([(IPv4Network("172.30.0.0/16"), IPv4Address(OTHER))])
        own = ipv4_packet(EXIT, "172.30.0.5")
        reply = ipv4_packet(INTERNET, MEMBER)
        exit_node.inject(own, reply)
        await eventually(lambda: len(exit_node.events.relay) == 2)
        assert exit_node.events.relay == [
            encapsulate_ipip(own, exit_node.tun_ip, IPv4Address(OTHER)),
            encapsulate_ipip(reply, exit_node.tun_ip, IPv4Address(MEMBER)),
        ]

    run(body())


def test_the_member_takes_the_reply_from_its_exit_node_only(make_node: NodeFactory) -> None:
    async def body() -> None:
        exit_node = started_exit_node(make_node)
        member = make_node(MEMBER)
        member.plane.set_sysroutes(exit_routes(EXIT))
        member.plane.start()
        exit_node.plane.set_peer(member.tun_ip, member.address, member.key)
        reply = ipv4_packet(INTERNET, MEMBER, b"the reply")
        exit_node.inject(reply)
        await eventually(lambda: member.delivered() == [reply])
        assert exit_node.events.relay == []

        # The same wrapped reply from another member: not behind it, refused.
        forged = b"\x01" + encapsulate_ipip(reply, IPv4Address(OTHER), member.tun_ip)
        exit_node.udp.sendto(DatagramCipher(member.key).seal(forged), member.address)
        await eventually(lambda: member.plane.stats().drops.get(DropReason.IPIP_SOURCE, 0) == 1)
        await settle()
        assert member.delivered() == []

    run(body())


@pytest.mark.fastpath
def test_a_forwarded_super_packet_reaches_the_member_as_wrapped_segments() -> None:
    """The kernel hands an exit node's TUN GRO'd replies as TSO super-packets:
    each segment is wrapped in the room the segmenter leaves before it."""
    frame = tcp_super_packet(
        Ipv4Fields(INTERNET, MEMBER), TcpFields(), bytes(range(256)) * 20, segment_size=1200
    )
    segments = segment_frame(frame)

    async def body() -> None:
        exit_node, member = Node("fast-offload", EXIT), Node("fast", MEMBER)
        try:
            exit_node.plane.set_forwarded_wrap(VPN)
            member.plane.set_sysroutes(exit_routes(EXIT))
            exit_node.plane.start()
            member.plane.start()
            exit_node.plane.set_peer(member.tun_ip, member.address, member.key)
            exit_node.inject_frames(frame)
            received: list[bytes] = []
            await eventually(
                lambda: bool(received.extend(member.delivered())) or len(received) >= 5
            )
            assert same_packets(received, segments)
        finally:
            exit_node.close()
            member.close()

    run(body())
