"""What the names and exit-node tests ask inside a namespace: DNS, getent, config files.

Every question runs in the member's namespace (``ip netns exec``), the way a
program on that machine asks: `dns_ask` with dnspython's ``dns.query.udp``
against a given server (the member's own TUN address), `getent_hosts`
through glibc and the namespace's resolv.conf.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from p2pvpn.netns import Client, Namespace

DNS_TIMEOUT = 2.0

_DNS_QUERY = """\
import json, sys
import dns.exception, dns.message, dns.query, dns.rcode, dns.rdatatype, dns.reversename
server, timeout, questions = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
answers = []
for name, kind in questions:
    if kind == "PTR":
        name = dns.reversename.from_address(name).to_text()
    query = dns.message.make_query(name, kind)
    try:
        reply = dns.query.udp(query, server, timeout=timeout)
    except dns.exception.Timeout:
        answers.append({"rcode": "TIMEOUT", "records": []})
        continue
    records = [item.to_text() for rrset in reply.answer for item in rrset]
    answers.append({"rcode": dns.rcode.to_text(reply.rcode()), "records": records})
print(json.dumps(answers))
"""


@dataclass(frozen=True)
class DnsAnswer:
    rcode: str  # NOERROR, NXDOMAIN, REFUSED, ..., or TIMEOUT when nothing came back
    records: tuple[str, ...]  # rdata as text: "10.77.0.11", "alpha.vpn."

    @property
    def address(self) -> str | None:
        """The one A record's address (None unless NOERROR with exactly one record)."""
        return self.records[0] if self.rcode == "NOERROR" and len(self.records) == 1 else None


def dns_ask(
    ns: Namespace, server: IPv4Address | str, questions: Sequence[tuple[str, str]]
) -> list[DnsAnswer]:
    """Ask ``server``:53 each (name, type) from inside ``ns`` with dnspython; "PTR" takes
    an address and asks for its in-addr.arpa name."""
    result = ns.python(
        _DNS_QUERY,
        str(server),
        str(DNS_TIMEOUT),
        json.dumps([list(question) for question in questions]),
        timeout=10 + 2 * DNS_TIMEOUT * len(questions),
    )
    rows = json.loads(result.stdout)
    return [DnsAnswer(row["rcode"], tuple(row["records"])) for row in rows]


def resolve_all(ns: Namespace, server: IPv4Address | str, names: Sequence[str]) -> dict[str, str]:
    """name -> address for every name with one A record (dnspython, from inside ``ns``)."""
    answers = dns_ask(ns, server, [(name, "A") for name in names])
    return {
        name: answer.address
        for name, answer in zip(names, answers, strict=True)
        if answer.address is not None
    }


def getent_hosts(ns: Namespace, *keys: str) -> dict[str, str]:
    """``getent hosts KEYS...`` in ``ns``: name -> address for names, address -> name for
    addresses (a reverse lookup); keys that do not resolve are missing."""
    result = ns.run(["getent", "hosts", *keys], check=False, timeout=30)
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        address, name = fields[0], fields[1]
        if address in keys:
            found[address] = name
        if name in keys:
            found[name] = address
    return found


def write_config(path: Path, values: Mapping[str, str | bool]) -> Path:
    """A TOML config file (``p2pvpn run -c``) with these top-level keys."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def status_names(client: Client) -> dict[str, str]:
    """address -> name of the names table in ``p2pvpn status --json``."""
    rows = client.status().get("names") or []
    return {str(row["address"]): str(row["name"]) for row in rows}
