"""The client's name and DNS metrics (issue 16): p2pvpn_names, p2pvpn_dns_queries_total."""

from typing import Any

from p2pvpn.metrics import ClientCollector


def samples(snapshot: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in ClientCollector(lambda: snapshot).collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_names_and_dns_queries_by_result() -> None:
    snapshot = {
        "names": [{"address": "10.0.0.1", "name": "a"}, {"address": "10.0.0.2", "name": "b"}],
        "dns": {"queries": 9, "answered": 4, "nxdomain": 2, "refused": 2, "malformed": 1},
    }
    found = samples(snapshot)
    assert found[("p2pvpn_names", ())] == 2
    for result, count in (("answered", 4), ("nxdomain", 2), ("refused", 2), ("malformed", 1)):
        assert found[("p2pvpn_dns_queries_total", (("result", result),))] == count


def test_a_client_without_names_shows_zeros() -> None:
    found = samples({})
    assert found[("p2pvpn_names", ())] == 0
    assert found[("p2pvpn_dns_queries_total", (("result", "refused"),))] == 0
