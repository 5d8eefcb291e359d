"""`p2pvpn status` and metrics for a client with several server URLs: which one, of how many."""

from p2pvpn.client.status import format_status
from p2pvpn.metrics import ClientCollector, start_metrics_server
from tests.client.control_support import EXAMPLE
from tests.test_metrics import scrape, value

NOW = 1_700_000_000.0


def server_line(server: dict[str, object]) -> str:
    snapshot = {**EXAMPLE, "server": server}
    return format_status(snapshot, now=NOW).splitlines()[1]


def test_the_current_server_and_its_place_in_the_list() -> None:
    line = server_line(
        {
            "url": "ws://b:80/",
            "index": 2,
            "servers": 3,
            "switches": 1,
            "state": "connected",
            "connected_since": NOW - 5,
            "reconnects": 1,
        }
    )
    assert line == (
        "server    ws://b:80/ (2 of 3)  connected for 5s  (reconnects: 1; server switches: 1)"
    )


def test_one_server_shows_no_position_and_no_switches() -> None:
    line = server_line(
        {
            "url": "ws://a/",
            "index": 1,
            "servers": 1,
            "switches": 0,
            "state": "connected",
            "connected_since": NOW - 5,
            "reconnects": 0,
        }
    )
    assert line == "server    ws://a/  connected for 5s  (reconnects: 0)"


def test_a_url_with_credentials_is_shown_without_them() -> None:
    line = server_line({"url": "ws://u:pw@b/?t=x", "index": 1, "servers": 2, "state": "connecting"})
    assert line.startswith("server    ws://b/ (1 of 2)  connecting")


def test_metrics_count_the_server_switches() -> None:
    snapshot = {**EXAMPLE, "server": {"url": "ws://b/", "state": "connected", "switches": 4}}
    server = start_metrics_server("127.0.0.1", 0, ClientCollector(lambda: snapshot))
    try:
        samples, _ = scrape(server.url)
    finally:
        server.close()
    assert value(samples, "p2pvpn_server_switches_total") == 4
