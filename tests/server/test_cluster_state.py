"""The cluster's names, records and view (server/cluster_state.py): no NATS, no clock."""

import contextlib
import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.config import SdwanRule
from p2pvpn.server.cluster_state import (
    CLUSTER_NETWORK_PATTERN,
    ClusterView,
    ConfigRecord,
    OwnerRecord,
    ServerRecord,
    broadcast_subject,
    bucket_name,
    lease_key,
    unicast_subject,
)
from p2pvpn.wire.errors import DecodeError

TTL = 15.0
NOW = 1_800_000_000.0
SALT = bytes(range(16))
DHCP = IPv4Network("10.77.0.0/24")
RULE_A = SdwanRule(DHCP, IPv4Network("172.30.0.0/16"), IPv4Address("10.77.0.20"))
RULE_B = SdwanRule(DHCP, IPv4Network("172.31.0.0/16"), IPv4Address("10.77.0.21"))


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def owner(server: str = "s2", session: str = "aa", vmac: str | None = None) -> OwnerRecord:
    return OwnerRecord(server, session, vmac, NOW)


def server_record(server: str, name: str, sessions: int = 0) -> ServerRecord:
    return ServerRecord(server, name, f"ws://{name}:8080/", sessions, NOW, NOW)


# -- names ---------------------------------------------------------------------


def test_subjects_and_buckets_follow_the_api() -> None:
    assert unicast_subject("p2pvpn", ip("10.0.0.7")) == "p2pvpn.p2pvpn.ip.10.0.0.7"
    assert broadcast_subject("lab-1") == "p2pvpn.lab-1.broadcast"
    assert bucket_name("lab_1", "addresses") == "p2pvpn_lab_1_addresses"
    for kind in ("leases", "replay", "servers", "config"):
        assert bucket_name("n", kind) == f"p2pvpn_n_{kind}"
    with pytest.raises(ValueError, match="unknown bucket kind"):
        bucket_name("n", "sessions")


def test_lease_keys_are_hex_of_the_vmac() -> None:
    assert lease_key("0123456789abcdef") == b"0123456789abcdef".hex()
    # Whatever a vmac holds, its key is made of NATS-safe characters.
    assert re.fullmatch(r"[0-9a-f]+", lease_key("a.b*c>d e\u00e9"))


def test_network_pattern() -> None:
    assert re.fullmatch(CLUSTER_NETWORK_PATTERN, "p2pvpn")
    assert re.fullmatch(CLUSTER_NETWORK_PATTERN, "A-z_09")
    assert not re.fullmatch(CLUSTER_NETWORK_PATTERN, "a.b")
    assert not re.fullmatch(CLUSTER_NETWORK_PATTERN, "x" * 33)
    assert not re.fullmatch(CLUSTER_NETWORK_PATTERN, "")


# -- records -------------------------------------------------------------------


def test_owner_record_round_trip() -> None:
    for record in (owner(vmac="0123456789abcdef"), owner(vmac=None)):
        assert OwnerRecord.decode(record.encode()) == record


def test_server_record_round_trip() -> None:
    record = server_record("ab12cd34", "relay-1", sessions=7)
    assert ServerRecord.decode(record.encode()) == record


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"server": "s", "session": "x", "vmac": null}',  # a key missing
        b'{"server": "s", "session": "x", "vmac": null, "since": 1, "more": 2}',
        b'{"server": 1, "session": "x", "vmac": null, "since": 1}',
        b'{"server": "s", "session": "x", "vmac": 5, "since": 1}',
        b'{"server": "s", "session": "x", "vmac": null, "since": true}',
        b'{"server": "s", "session": "x", "vmac": null, "since": "1"}',
        b'{"server": "s", "session": "x", "vmac": null, "since": NaN}',
        b"[" * 100_000,
    ],
)
def test_owner_record_refuses_junk(data: bytes) -> None:
    with pytest.raises(DecodeError):
        OwnerRecord.decode(data)


def test_server_record_refuses_a_negative_or_boolean_count() -> None:
    good = server_record("s", "n").encode()
    for bad in (b'"sessions":-1', b'"sessions":true', b'"sessions":1.5'):
        with pytest.raises(DecodeError):
            ServerRecord.decode(good.replace(b'"sessions":0', bad))


@given(st.binary(max_size=200))
def test_record_decoders_raise_only_decode_error(data: bytes) -> None:
    for decoder in (OwnerRecord.decode, ServerRecord.decode, ConfigRecord.decode):
        with contextlib.suppress(DecodeError):
            decoder(data)


def test_config_record_holds_no_password_and_round_trips() -> None:
    record = ConfigRecord.of("s3cret-pass", DHCP, [RULE_B, RULE_A], SALT)
    encoded = record.encode()
    assert b"s3cret-pass" not in encoded
    assert record.password_salt == SALT.hex()
    assert ConfigRecord.decode(encoded) == record
    # Rules sorted: their order in the config file carries no meaning.
    assert record.sdwan == sorted(record.sdwan)
    assert record.sdwan[0] == "10.77.0.0/24,172.30.0.0/16,10.77.0.20"
    assert record.dhcp == "10.77.0.0/24"


def test_config_record_names_the_key_that_differs() -> None:
    record = ConfigRecord.of("pw", DHCP, [RULE_A, RULE_B], SALT)
    assert record.differing_key("pw", DHCP, [RULE_B, RULE_A]) is None
    assert record.differing_key("other", DHCP, [RULE_A, RULE_B]) == "password"
    assert record.differing_key("pw", IPv4Network("10.78.0.0/24"), [RULE_A, RULE_B]) == "dhcp"
    assert record.differing_key("pw", None, [RULE_A, RULE_B]) == "dhcp"
    assert record.differing_key("pw", DHCP, [RULE_A]) == "sdwan"
    # The password is compared first: a server with the wrong one learns nothing else.
    assert record.differing_key("other", None, []) == "password"


def test_config_record_with_another_salt_still_checks_the_password() -> None:
    ours = ConfigRecord.of("pw", None, [], b"\x01" * 16)
    theirs = ConfigRecord.of("pw", None, [], b"\x02" * 16)
    assert ours.password_hash != theirs.password_hash
    assert theirs.differing_key("pw", None, []) is None


def test_config_record_with_a_broken_hash_differs_in_the_password() -> None:
    record = ConfigRecord("zz", "not hex", None, [])
    assert record.differing_key("pw", None, []) == "password"


def test_config_record_refuses_a_bad_sdwan_list() -> None:
    good = ConfigRecord.of("pw", None, [], SALT).encode()
    with pytest.raises(DecodeError):
        ConfigRecord.decode(good.replace(b'"sdwan":[]', b'"sdwan":[1]'))
    with pytest.raises(DecodeError):
        ConfigRecord.decode(good.replace(b'"sdwan":[]', b'"sdwan":"x"'))


# -- the view ------------------------------------------------------------------


def test_remote_owner_names_only_other_servers() -> None:
    view = ClusterView("s1", TTL)
    view.owner_put(ip("10.0.0.1"), owner(server="s1"), NOW)
    view.owner_put(ip("10.0.0.2"), owner(server="s2"), NOW)
    assert view.remote_owner(ip("10.0.0.1")) is None
    assert view.remote_owner(ip("10.0.0.2")) == owner(server="s2")
    assert view.remote_owner(ip("10.0.0.3")) is None
    # Another server's claim replaces ours.
    view.owner_put(ip("10.0.0.1"), owner(server="s3"), NOW)
    assert view.remote_owner(ip("10.0.0.1")) == owner(server="s3")
    view.owner_deleted(ip("10.0.0.1"))
    view.owner_deleted(ip("10.0.0.9"))  # not known: nothing happens
    assert view.remote_owner(ip("10.0.0.1")) is None


def test_owner_records_expire_without_a_refresh() -> None:
    view = ClusterView("s1", TTL)
    view.owner_put(ip("10.0.0.2"), owner(), NOW)
    view.owner_put(ip("10.0.0.3"), owner(), NOW + 10)
    view.expire(NOW + TTL)
    assert view.remote_owner(ip("10.0.0.2")) is not None  # exactly ttl: still fresh
    view.expire(NOW + TTL + 1)
    assert view.remote_owner(ip("10.0.0.2")) is None
    assert view.remote_owner(ip("10.0.0.3")) is not None
    # A refresh restarts the time.
    view.owner_put(ip("10.0.0.3"), owner(), NOW + 20)
    view.expire(NOW + 30)
    assert view.remote_owner(ip("10.0.0.3")) is not None


def test_expiry_holds_between_expire_calls() -> None:
    """Any later ``now`` fed in (here a server put) ages the owner entries."""
    view = ClusterView("s1", TTL)
    view.owner_put(ip("10.0.0.2"), owner(), NOW)
    view.server_put(server_record("s3", "c"), NOW + TTL + 1)
    assert view.remote_owner(ip("10.0.0.2")) is None
    # A clock stepping back does not bring it back.
    view.expire(NOW)
    assert view.remote_owner(ip("10.0.0.2")) is None


def test_leases_are_one_to_one() -> None:
    view = ClusterView("s1", TTL)
    view.lease_put("vmac-a", ip("10.0.0.5"))
    assert view.lease_of("vmac-a") == ip("10.0.0.5")
    assert view.lease_owner(ip("10.0.0.5")) == "vmac-a"
    # vmac-a moves: its old address is free.
    view.lease_put("vmac-a", ip("10.0.0.6"))
    assert view.lease_owner(ip("10.0.0.5")) is None
    # vmac-b takes vmac-a's address: vmac-a has none.
    view.lease_put("vmac-b", ip("10.0.0.6"))
    assert view.lease_of("vmac-a") is None
    assert view.lease_owner(ip("10.0.0.6")) == "vmac-b"
    view.lease_deleted("vmac-b")
    view.lease_deleted("vmac-b")
    assert view.lease_owner(ip("10.0.0.6")) is None
    assert view.lease_of("vmac-b") is None


def test_leases_do_not_expire_with_the_owner_ttl() -> None:
    view = ClusterView("s1", TTL)
    view.lease_put("vmac-a", ip("10.0.0.5"))
    view.expire(NOW + 3600)
    assert view.lease_of("vmac-a") == ip("10.0.0.5")


def test_servers_are_the_others_by_name_and_expire() -> None:
    view = ClusterView("s1", TTL)
    view.server_put(server_record("s1", "me", sessions=100), NOW)
    view.server_put(server_record("s3", "bravo", sessions=2), NOW)
    view.server_put(server_record("s2", "alpha", sessions=3), NOW + 5)
    assert [record.name for record in view.servers()] == ["alpha", "bravo"]
    assert view.remote_sessions() == 5
    view.expire(NOW + TTL + 1)
    assert [record.name for record in view.servers()] == ["alpha"]
    view.server_deleted("s2")
    assert view.servers() == []
    assert view.remote_sessions() == 0


def test_clear_remote_forgets_the_others_but_keeps_leases() -> None:
    view = ClusterView("s1", TTL)
    view.owner_put(ip("10.0.0.1"), owner(server="s1"), NOW)
    view.owner_put(ip("10.0.0.2"), owner(server="s2"), NOW)
    view.server_put(server_record("s2", "b"), NOW)
    view.lease_put("vmac-a", ip("10.0.0.2"))
    view.clear_remote()
    assert view.remote_owner(ip("10.0.0.2")) is None
    assert view.servers() == []
    assert view.lease_of("vmac-a") == ip("10.0.0.2")
    # Ours stays: a later put by another server still replaces it as before.
    view.owner_put(ip("10.0.0.1"), owner(server="s2"), NOW)
    assert view.remote_owner(ip("10.0.0.1")) is not None
