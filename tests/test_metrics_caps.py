"""The resource caps' counters in the server's Prometheus metrics."""

from typing import Any

from p2pvpn.metrics import ServerCollector
from tests.test_metrics import SERVER_STATS, scrape, serving, value


def test_every_cap_and_the_stun_rate_limit_are_exported() -> None:
    stats: dict[str, Any] = {
        **SERVER_STATS,
        "limits": {"broadcast_rate": 7, "unauthenticated_per_ip": 2},
        "stun": {"requests": 11, "responses": 4, "ignored": 0, "rate_limited": 7},
    }
    with serving(ServerCollector(lambda: stats)) as server:
        samples, text = scrape(server.url)
    assert value(samples, "p2pvpn_server_limits_total", reason="broadcast_rate") == 7
    assert value(samples, "p2pvpn_server_limits_total", reason="unauthenticated_per_ip") == 2
    assert value(samples, "p2pvpn_server_stun_rate_limited_total") == 7
    assert "# TYPE p2pvpn_server_limits_total counter" in text
