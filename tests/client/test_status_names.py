"""`p2pvpn status` with names (issue 16): the name line, the NAME column, the names table."""

from typing import Any

from p2pvpn.client.status import format_status
from tests.client.control_support import EXAMPLE, NOW

NAMED: dict[str, Any] = {
    **EXAMPLE,
    "hostname": "laptop",
    "domain": "vpn",
    "names": [
        {
            "address": "10.0.0.2",
            "name": "nas",
            "exit_node": True,
            "p2pvpn": True,
            "source": "server",
        },
        {
            "address": "10.0.0.1",
            "name": "laptop",
            "exit_node": False,
            "p2pvpn": True,
            "source": "self",
        },
        {
            "address": "10.0.0.10",
            "name": "candy-box",
            "exit_node": False,
            "p2pvpn": False,
            "source": "server",
        },
    ],
    "dns": {
        "listening": "10.0.0.1:53",
        "resolved": "not running",
        "queries": 7,
        "answered": 5,
        "nxdomain": 1,
        "refused": 1,
    },
    "peers": [{**EXAMPLE["peers"][0], "name": "nas"}],
}


def test_the_name_and_dns_lines_follow_the_server_line() -> None:
    lines = format_status(NAMED, now=NOW).splitlines()
    assert lines[2] == "name      laptop.vpn"
    assert lines[3] == (
        "dns       on 10.0.0.1:53  systemd-resolved: not running  "
        "(7 queries, 5 answered, 1 nxdomain, 1 refused)"
    )


def test_dns_off_is_said() -> None:
    snapshot = {**NAMED, "dns": {"listening": None, "resolved": None}}
    text = format_status(snapshot, now=NOW)
    assert "dns       off  (0 queries, 0 answered, 0 nxdomain, 0 refused)" in text


def test_the_peers_table_has_a_name_column() -> None:
    lines = format_status(NAMED, now=NOW).splitlines()
    header = next(line for line in lines if line.startswith("PEER"))
    peer = lines[lines.index(header) + 1]
    assert header.index("NAME") == peer.index("nas")
    assert header.index("STATE") == peer.index("CONNECTED")


def test_the_names_table_in_address_order() -> None:
    lines = format_status(NAMED, now=NOW).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ADDRESS")))
    assert lines[start - 1] == ""
    assert lines[start : start + 4] == [
        "ADDRESS    NAME       EXIT NODE  SOURCE",
        "10.0.0.1   laptop     -          self",
        "10.0.0.2   nas        yes        server",
        "10.0.0.10  candy-box  -          server (candy)",
    ]


def test_a_client_without_names_shows_none_of_it() -> None:
    text = format_status(EXAMPLE, now=NOW)
    assert "name      " not in text and "ADDRESS" not in text and "NAME" not in text
