"""The relay cluster's gauges and counters in the server's Prometheus metrics."""

from typing import Any

from p2pvpn.metrics import ServerCollector
from tests.test_metrics import SERVER_STATS, scrape, serving, value


def test_cluster_metrics_are_exported_with_a_cluster_only() -> None:
    stats: dict[str, Any] = {
        **SERVER_STATS,
        "cluster": {
            "connected": 1,
            "outages": 2,
            "published": 30,
            "publish_dropped": 4,
            "received": 25,
            "servers": 3,
        },
    }
    with serving(ServerCollector(lambda: stats)) as server:
        samples, text = scrape(server.url)
    assert value(samples, "p2pvpn_server_cluster_connected") == 1
    assert value(samples, "p2pvpn_server_cluster_outages_total") == 2
    assert value(samples, "p2pvpn_server_cluster_frames_published_total") == 30
    assert value(samples, "p2pvpn_server_cluster_publish_dropped_total") == 4
    assert value(samples, "p2pvpn_server_cluster_frames_received_total") == 25
    assert value(samples, "p2pvpn_server_cluster_servers") == 3
    assert "# TYPE p2pvpn_server_cluster_connected gauge" in text
    assert "# TYPE p2pvpn_server_cluster_outages_total counter" in text
    with serving(ServerCollector(lambda: SERVER_STATS)) as server:
        samples, _ = scrape(server.url)
    assert not any(name.startswith("p2pvpn_server_cluster_") for name, _ in samples)
