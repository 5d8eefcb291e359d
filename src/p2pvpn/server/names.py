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

from p2pvpn.wire.names import unique_names
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
    """The unique names last sent, by address; ``update`` says what changed."""

    def __init__(self) -> None:
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
        """Take the table of ``members`` (in priority order); the changed entries, by address.

        An address that left the table comes back as an entry with an empty
        name; one whose name or flags changed, with its new entry.
        """
        names = unique_names([(member.address, member.hostname) for member in members])
        entries = {
            member.address: NameEntry(
                member.address, names[member.address], member.exit_node, member.p2pvpn
            )
            for member in members
            if member.address in names
        }
        changes = [entry for entry in entries.values() if self._entries.get(entry.address) != entry]
        changes += [NameEntry(address, "") for address in self._entries if address not in entries]
        self._entries = entries
        return sorted(changes, key=lambda entry: entry.address)
