"""The relay's name table: incremental updates agree with unique_names from scratch."""

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.server.names import NameBook, NamedMember
from p2pvpn.wire.names import unique_names

_ADDRESSES = [IPv4Address(f"10.0.0.{octet}") for octet in (1, 2, 7, 9, 20)]
_MEMBERS = st.builds(
    NamedMember,
    st.sampled_from(_ADDRESSES),
    st.sampled_from(["pc", "pc-7", "laptop", "pc-10-0-0-7"]),
    st.booleans(),
    st.booleans(),
)
# Tables as the relay makes them: each address once, in some priority order.
_TABLES = st.lists(_MEMBERS, max_size=6, unique_by=lambda member: member.address)


@given(st.lists(_TABLES, min_size=1, max_size=8))
def test_updates_agree_with_a_fresh_computation(tables: list[list[NamedMember]]) -> None:
    book = NameBook()
    seen: dict[IPv4Address, str] = {}  # what a receiver of the changes knows
    for table in tables:
        changes = book.update(table)
        assert changes == sorted(changes, key=lambda entry: entry.address)
        for entry in changes:
            if entry.name:
                seen[entry.address] = entry.name
            else:
                del seen[entry.address]
        expected = unique_names([(member.address, member.hostname) for member in table])
        assert seen == expected
        assert {entry.address: entry.name for entry in book.entries()} == expected
        flags = {member.address: (member.exit_node, member.p2pvpn) for member in table}
        assert all(
            (entry.exit_node, entry.p2pvpn) == flags[entry.address] for entry in book.entries()
        )
        assert book.update(table) == []  # nothing changed: nothing to send
