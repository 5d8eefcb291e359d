"""client/names.py: the merge of the server's NAMES and the peers' announcements."""

from ipaddress import IPv4Address
from random import Random

from hypothesis import assume, given
from hypothesis import strategies as st

from p2pvpn.client.names import ANNOUNCE_TTL, MAX_PEER_NAMES, NameRecord, NameTable
from p2pvpn.wire.names import unique_names
from p2pvpn.wire.ws import NameAnnouncement, NameEntry, Names

OWN = IPv4Address("10.0.0.1")
BROADCAST = IPv4Address("255.255.255.255")


def ip(last: int) -> IPv4Address:
    return IPv4Address(f"10.0.0.{last}")


def announce(
    source: IPv4Address, name: str, exit_node: bool = False, reply_wanted: bool = False
) -> NameAnnouncement:
    return NameAnnouncement(source, BROADCAST, name, exit_node, reply_wanted)


def names(
    *entries: tuple[IPv4Address, str], replace: bool = True, exit_node: bool = False
) -> Names:
    return Names(
        replace, tuple(NameEntry(address, name, exit_node, True) for address, name in entries)
    )


def table_names(table: NameTable) -> dict[IPv4Address, str]:
    return {record.address: record.name for record in table.records()}


def test_own_name_alone() -> None:
    table = NameTable(OWN, "laptop", own_exit_node=False)
    assert table.records() == [NameRecord(OWN, "laptop", False, True, "self")]
    assert table.lookup("LAPTOP") == OWN
    assert table.name_of(OWN) == "laptop"
    assert table.exit_nodes() == {}


def test_announcements_fill_the_table_and_leaving_drops_them() -> None:
    table = NameTable(OWN, "laptop", own_exit_node=False)
    generation = table.generation
    assert table.on_announcement(announce(ip(5), "nas", exit_node=True, reply_wanted=True), 0.0)
    assert table.generation == generation + 1
    assert table.lookup("nas") == ip(5)
    assert table.exit_nodes() == {ip(5): "nas"}
    assert table.records()[1] == NameRecord(ip(5), "nas", True, True, "peer")
    # The same again changes nothing and wants no reply.
    assert not table.on_announcement(announce(ip(5), "nas", exit_node=True), 1.0)
    assert table.generation == generation + 1
    assert not table.on_announcement(announce(ip(5), ""), 2.0)
    assert table.lookup("nas") is None
    assert table.generation == generation + 2


def test_our_own_echo_and_unclean_names_are_ignored() -> None:
    table = NameTable(OWN, "laptop", own_exit_node=False)
    assert not table.on_announcement(announce(OWN, "impostor", reply_wanted=True), 0.0)
    table.on_announcement(announce(ip(5), "Not Clean"), 0.0)
    assert table_names(table) == {OWN: "laptop"}


def test_without_a_server_duplicates_get_suffixes_in_address_order() -> None:
    table = NameTable(ip(7), "laptop", own_exit_node=False)
    table.on_announcement(announce(ip(9), "laptop"), 0.0)
    table.on_announcement(announce(ip(3), "laptop"), 0.0)
    assert table_names(table) == {ip(3): "laptop", ip(7): "laptop-7", ip(9): "laptop-9"}
    assert table.lookup("laptop-7") == ip(7)


def test_server_entries_win_and_announcements_fill_the_rest() -> None:
    table = NameTable(OWN, "laptop", own_exit_node=True)
    table.on_announcement(announce(ip(5), "peer-says"), 0.0)
    table.on_announcement(announce(ip(6), "candy-less"), 0.0)
    table.on_server_names(names((OWN, "laptop"), (ip(5), "server-says"), (ip(8), "candy")), 1.0)
    assert table.records() == [
        NameRecord(OWN, "laptop", True, True, "self"),
        NameRecord(ip(5), "server-says", False, True, "server"),
        NameRecord(ip(6), "candy-less", False, True, "peer"),
        NameRecord(ip(8), "candy", False, True, "server"),
    ]
    # The server learns our final name (suffix and all): that is the one we answer to.
    table.on_server_names(names((OWN, "laptop-1"), replace=False), 2.0)
    assert table.name_of(OWN) == "laptop-1"
    # A removal drops the announcement of that address too.
    table.on_server_names(names((ip(5), ""), replace=False), 3.0)
    assert table.name_of(ip(5)) is None
    # A full table replaces the old one.
    table.on_server_names(names((OWN, "laptop")), 4.0)
    assert table_names(table) == {OWN: "laptop", ip(6): "candy-less"}


def test_a_peer_name_that_collides_with_a_server_name_gets_the_suffix() -> None:
    table = NameTable(OWN, "me", own_exit_node=False)
    table.on_server_names(names((OWN, "me"), (ip(9), "nas")), 0.0)
    table.on_announcement(announce(ip(4), "nas"), 0.0)
    assert table_names(table) == {OWN: "me", ip(4): "nas-4", ip(9): "nas"}


def test_set_own_renames_us_until_the_server_says_otherwise() -> None:
    table = NameTable(OWN, "old", own_exit_node=False)
    table.set_own("new", exit_node=True)
    assert table.records() == [NameRecord(OWN, "new", True, True, "self")]


def test_announcements_expire_after_the_ttl() -> None:
    table = NameTable(OWN, "me", own_exit_node=False)
    table.on_announcement(announce(ip(5), "a"), 0.0)
    table.on_announcement(announce(ip(6), "b"), 100.0)
    table.expire(ANNOUNCE_TTL + 1.0)
    assert table_names(table) == {OWN: "me", ip(6): "b"}


def test_the_number_of_announced_names_is_bounded() -> None:
    table = NameTable(OWN, "me", own_exit_node=False)
    for number in range(MAX_PEER_NAMES + 10):
        table.on_announcement(announce(IPv4Address(0x0A010000 + number), f"n{number}"), 0.0)
    assert len(table.records()) == MAX_PEER_NAMES + 1


# -- the merge rule, for any order of messages ------------------------------------------

ADDRESSES = st.integers(min_value=1, max_value=12).map(ip)
LABELS = st.sampled_from(["a", "b", "laptop", "laptop-7", "nas", "x-1"])
ANNOUNCEMENTS = st.builds(announce, ADDRESSES, st.one_of(LABELS, st.just("")), st.booleans())


@st.composite
def server_tables(draw: st.DrawFn) -> Names:
    """A NAMES message like a server's: unique names, in some order."""
    wanted = draw(st.lists(st.tuples(ADDRESSES, LABELS), max_size=8))
    unique = unique_names(wanted)
    removals = draw(st.lists(ADDRESSES, max_size=2))
    entries = [*unique.items(), *((address, "") for address in removals if address not in unique)]
    return names(*entries, replace=draw(st.booleans()))


EVENTS = st.lists(st.one_of(ANNOUNCEMENTS, server_tables()), max_size=12)


def apply(table: NameTable, events: list[NameAnnouncement | Names]) -> None:
    for now, event in enumerate(events):
        if isinstance(event, Names):
            table.on_server_names(event, float(now))
        else:
            table.on_announcement(event, float(now))


def check_generation(table: NameTable, events: list[NameAnnouncement | Names]) -> None:
    for now, event in enumerate(events):
        before, generation = table.records(), table.generation
        if isinstance(event, Names):
            table.on_server_names(event, float(now))
        else:
            table.on_announcement(event, float(now))
        changed = table.records() != before
        assert table.generation == generation + (1 if changed else 0)


@given(EVENTS, LABELS)
def test_names_are_always_unique_and_every_lookup_agrees(
    events: list[NameAnnouncement | Names], own_name: str
) -> None:
    table = NameTable(OWN, own_name, own_exit_node=False)
    check_generation(table, events)
    records = table.records()
    assert len({record.name for record in records}) == len(records)
    assert [record.address for record in records] == sorted(record.address for record in records)
    for record in records:
        assert table.lookup(record.name.upper()) == record.address
        assert table.name_of(record.address) == record.name
    assert [record.source for record in records if record.address == OWN] == ["self"]


@given(EVENTS)
def test_the_server_table_wins_for_its_addresses(events: list[NameAnnouncement | Names]) -> None:
    table = NameTable(OWN, "me", own_exit_node=False)
    apply(table, events)
    server: dict[IPv4Address, str] | None = None
    announced: dict[IPv4Address, str] = {}
    for event in events:  # the rule, replayed on plain dictionaries
        if isinstance(event, Names):
            server = {} if event.replace or server is None else server
            for entry in event.entries:
                if entry.name:
                    server[entry.address] = entry.name
                else:
                    server.pop(entry.address, None)
                    announced.pop(entry.address, None)
        elif event.src == OWN:
            continue  # our own name is ours, whoever claims it
        elif event.name:
            announced[event.src] = event.name
        else:
            announced.pop(event.src, None)
    resolved = table_names(table)
    if server is None:
        expected = unique_names(sorted({**announced, OWN: "me"}.items()))
        assert resolved == expected
        return
    # A server's table is unique as a whole; changed entries drawn apart may not be.
    assume(len(set(server.values())) == len(server))
    for address, name in server.items():
        assert resolved[address] == name
    for address in announced.keys() - server.keys():
        assert (
            resolved[address]
            == unique_names(
                [
                    *server.items(),
                    *([] if OWN in server else [(OWN, "me")]),
                    *sorted(announced.items()),
                ]
            )[address]
        )


@given(st.lists(ANNOUNCEMENTS, max_size=10), st.randoms())
def test_without_a_server_the_order_of_announcements_does_not_matter(
    events: list[NameAnnouncement], random: Random
) -> None:
    # Only the last announcement of each address counts: keep one per address.
    last = {event.src: event for event in events}
    ordered = list(last.values())
    shuffled = list(ordered)
    random.shuffle(shuffled)
    first, second = NameTable(OWN, "me", False), NameTable(OWN, "me", False)
    apply(first, list(ordered))
    apply(second, list(shuffled))
    assert first.records() == second.records()
