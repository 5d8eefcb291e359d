"""client/dns.py: the responder's answers, and the server on real sockets (127.0.0.1)."""

import asyncio
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from p2pvpn.client.dns import DNS_TTL, DnsResponder, DnsServer
from p2pvpn.client.names import NameTable
from p2pvpn.wire.ws import NameAnnouncement

NETWORK = IPv4Network("10.0.0.0/24")
OWN = IPv4Address("10.0.0.1")
NAS = IPv4Address("10.0.0.5")


@pytest.fixture
def responder() -> DnsResponder:
    table = NameTable(OWN, "laptop", own_exit_node=False)
    table.on_announcement(NameAnnouncement(NAS, IPv4Address("255.255.255.255"), "nas"), 0.0)
    return DnsResponder(table, "vpn", NETWORK)


def ask(responder: DnsResponder, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    wire = responder.answer(query.to_wire())
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    return response


def addresses(response: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in response.answer for item in rrset]


def test_a_record_of_a_known_name_is_authoritative_with_a_short_ttl(
    responder: DnsResponder,
) -> None:
    response = ask(responder, "nas.vpn.")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == ["10.0.0.5"]
    assert response.answer[0].ttl == DNS_TTL
    assert addresses(ask(responder, "laptop.vpn.")) == ["10.0.0.1"]


def test_names_are_case_insensitive(responder: DnsResponder) -> None:
    response = ask(responder, "NaS.VpN.")
    assert addresses(response) == ["10.0.0.5"]
    assert response.answer[0].name.to_text() == "NaS.VpN."  # the question's spelling


def test_other_types_of_a_known_name_have_no_data(responder: DnsResponder) -> None:
    for rdtype in ("AAAA", "MX", "TXT"):
        response = ask(responder, "nas.vpn.", rdtype)
        assert response.rcode() == dns.rcode.NOERROR
        assert response.flags & dns.flags.AA
        assert response.answer == []


def test_unknown_names_in_the_domain_do_not_exist(responder: DnsResponder) -> None:
    for name in ("printer.vpn.", "a.nas.vpn."):
        response = ask(responder, name)
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.flags & dns.flags.AA


def test_the_domain_itself_exists_without_records(responder: DnsResponder) -> None:
    response = ask(responder, "vpn.", "SOA")
    assert (response.rcode(), response.answer) == (dns.rcode.NOERROR, [])


def test_reverse_lookups_inside_the_network(responder: DnsResponder) -> None:
    response = ask(responder, dns.reversename.from_address("10.0.0.5").to_text(), "PTR")
    assert response.flags & dns.flags.AA
    assert addresses(response) == ["nas.vpn."]
    unknown = ask(responder, "9.0.0.10.in-addr.arpa.", "PTR")
    assert unknown.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("example.com.", "A"),
        ("nas.vpn.example.", "A"),
        ("vpnx.", "A"),
        ("8.8.8.8.in-addr.arpa.", "PTR"),  # another reverse zone
        ("0.10.in-addr.arpa.", "PTR"),  # not a whole address
        ("5.0.0.10.in-addr.arpa.x.", "PTR"),
    ],
)
def test_everything_else_is_refused(responder: DnsResponder, name: str, rdtype: str) -> None:
    response = ask(responder, name, rdtype)
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert response.answer == []


def test_counters(responder: DnsResponder) -> None:
    ask(responder, "nas.vpn.")
    ask(responder, "nope.vpn.")
    ask(responder, "example.com.")
    responder.answer(b"junk")
    counters = responder.counters
    assert (counters.queries, counters.answered, counters.nxdomain, counters.refused) == (
        4,
        1,
        1,
        1,
    )
    assert counters.malformed == 1


def test_junk_with_a_header_gets_formerr_and_junk_without_none(responder: DnsResponder) -> None:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)  # one question, missing
    reply = responder.answer(header + b"\x05trunc")
    assert reply is not None
    identifier, flags = struct.unpack_from("!HH", reply)
    assert identifier == 0x1234
    assert flags & 0x8000 and flags & 0x000F == dns.rcode.FORMERR
    assert responder.answer(b"\x00" * 5) is None
    # A response is never answered (two responders must not talk forever).
    response = dns.message.make_response(dns.message.make_query("nas.vpn.", "A"))
    assert responder.answer(response.to_wire()) is None


def test_two_questions_are_a_format_error(responder: DnsResponder) -> None:
    query = dns.message.make_query("nas.vpn.", "A")
    query.question.append(dns.message.make_query("laptop.vpn.", "A").question[0])
    reply = responder.answer(query.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


def test_edns_queries_get_edns_answers(responder: DnsResponder) -> None:
    query = dns.message.make_query("nas.vpn.", "A", use_edns=0)
    wire = responder.answer(query.to_wire())
    assert wire is not None
    assert dns.message.from_wire(wire).edns == 0


def test_the_server_answers_over_udp_and_tcp_and_moves(responder: DnsResponder) -> None:
    async def test() -> None:
        server = DnsServer(responder)
        await server.start("127.0.0.1", 0)
        assert server.endpoint is not None
        host, port = server.endpoint
        assert server.listening == f"127.0.0.1:{port}"
        query = dns.message.make_query("nas.vpn.", "A")
        udp = await asyncio.to_thread(dns.query.udp, query, host, timeout=5, port=port)
        assert addresses(udp) == ["10.0.0.5"]
        tcp = await asyncio.to_thread(
            dns.query.tcp, dns.message.make_query("laptop.vpn.", "A"), host, timeout=5, port=port
        )
        assert addresses(tcp) == ["10.0.0.1"]
        await server.start("127.0.0.2", 0)  # an address change moves it
        assert server.endpoint is not None and server.endpoint[0] == "127.0.0.2"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # The old address is free again: a new socket can take the old port.
            probe.bind((host, port))
        await server.close()
        assert server.endpoint is None and server.listening is None

    asyncio.run(test())
