"""The demo's name lookup: one dnspython query for a member's name, asked inside a namespace.

A member's DNS answers on its VPN address, which only the namespaces of the
VPN reach, so the query runs there: `lookup` starts this module
(``python -m p2pvpn.demo.lookup SERVER NAME``) in the asking member's
namespace, and it prints one JSON line with the answer.
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from p2pvpn.netns import CommandError, Namespace, python_argv

__all__ = ["QUERY_TIMEOUT", "NameLookup", "ask", "lookup", "main"]

QUERY_TIMEOUT = 2.0


@dataclass(frozen=True)
class NameLookup:
    """``asker`` asked the DNS at ``server`` for ``name`` (an A record); the answer."""

    asker: str
    server: IPv4Address
    name: str  # fully qualified, without the trailing dot: bob.vpn
    expected: IPv4Address
    rcode: str | None = None  # None: no answer came back
    addresses: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.rcode == "NOERROR" and self.addresses == (str(self.expected),)

    def describe(self) -> str:
        """``bob.vpn -> 10.77.0.2``, or what came instead."""
        if self.rcode == "NOERROR" and self.addresses:
            return f"{self.name} -> {', '.join(self.addresses)}"
        return f"{self.name}: {self.rcode or 'no answer'}"


def ask(
    server: str, name: str, timeout: float = QUERY_TIMEOUT, port: int = 53
) -> dict[str, object]:
    """One A query to ``server``:``port`` over UDP (dnspython); what came back, JSON-ready."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        reply = dns.query.udp(query, server, timeout=timeout, port=port)
    except (dns.exception.Timeout, OSError) as exc:
        return {"rcode": None, "addresses": [], "error": str(exc) or type(exc).__name__}
    addresses = [
        item.to_text()
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.A
        for item in rrset
    ]
    return {"rcode": dns.rcode.to_text(reply.rcode()), "addresses": addresses}


def lookup(
    ns: Namespace, asker: str, server: IPv4Address, name: str, expected: IPv4Address
) -> NameLookup:
    """Ask from inside ``ns`` (the member ``asker``); never raises for a missing answer."""
    argv = python_argv("-m", "p2pvpn.demo.lookup", str(server), name)
    try:
        result = ns.run(argv, timeout=QUERY_TIMEOUT + 20)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (CommandError, ValueError, IndexError):
        return NameLookup(asker, server, name, expected)
    rcode = answer.get("rcode")
    return NameLookup(
        asker,
        server,
        name,
        expected,
        rcode=str(rcode) if rcode is not None else None,
        addresses=tuple(str(address) for address in answer.get("addresses", [])),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m p2pvpn.demo.lookup SERVER NAME", file=sys.stderr)
        return 2
    print(json.dumps(ask(args[0], args[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
