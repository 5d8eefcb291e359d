"""The server's table of member names (issue 16), sans I/O.

Every member's ping payload carries its host name (a Candy client's too);
the relay keeps the names of its logged-in sessions here, made unique in
login order, and sends p2pvpn clients (those that sent HELLO) the changes
as NAMES messages. This module only computes the table and what changed;
the relay decides who is sent what.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from p2pvpn.wire.names import unique_name
from p2pvpn.wire.ws import NameEntry

__all__ = ["NAME_CHANGE_BURST", "NAME_CHANGE_RATE", "NameBook", "NamedMember"]

# Every name change is a NAMES frame to every p2pvpn session: one change per
# second and session (bursts of five) keeps that amplification small.
NAME_CHANGE_RATE = 1.0
NAME_CHANGE_BURST = 5.0


@dataclass(frozen=True, slots=True)
class NamedMember:
    """A logged-in session with a host name, as the table needs it."""

    address: IPv4Address
    hostname: str
    exit_node: bool
    p2pvpn: bool


class NameBook:
    """The unique names last sent, by address; ``update`` says what changed.

    Members keep their rank as others join after them, so an update only
    assigns names again from the first member that differs from the last
    update on: a login (ranked last) costs one assignment, not a pass over
    the whole network with a name cleaned per member.
    """

    def __init__(self) -> None:
        self._members: list[NamedMember] = []
        self._names: list[str] = []  # the unique name of each of _members
        self._entries: dict[IPv4Address, NameEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def name_of(self, address: IPv4Address) -> str | None:
        entry = self._entries.get(address)
        return None if entry is None else entry.name

    def entries(self) -> list[NameEntry]:
        """The whole table, by address."""
        return [self._entries[address] for address in sorted(self._entries)]

    def update(self, members: Sequence[NamedMember]) -> list[NameEntry]:
        """Take the table of ``members``; the changed entries, by address.

        ``members`` are in priority order, with different addresses and clean
        (non-empty) host names. An address that left the table comes back as
        an entry with an empty name; one whose name or flags changed, with its
        new entry.
        """
        same = _common_prefix(self._members, members)
        names = self._names[:same]
        taken = set(names)
        changes: list[NameEntry] = []
        for member in members[same:]:
            name = unique_name(member.hostname, member.address, taken)
            names.append(name)
            taken.add(name)
            entry = NameEntry(member.address, name, member.exit_node, member.p2pvpn)
            if self._entries.get(member.address) != entry:
                changes.append(entry)
                self._entries[member.address] = entry
        # The members before `same` are the same as before: none of them left.
        staying = {member.address for member in members[same:]}
        for member in self._members[same:]:
            if member.address not in staying:
                del self._entries[member.address]
                changes.append(NameEntry(member.address, ""))
        self._members = list(members)
        self._names = names
        return sorted(changes, key=lambda entry: entry.address)


def _common_prefix(old: Sequence[NamedMember], new: Sequence[NamedMember]) -> int:
    """How many members at the start of both are the same."""
    for index, (before, after) in enumerate(zip(old, new, strict=False)):
        if before != after:
            return index
    return min(len(old), len(new))
