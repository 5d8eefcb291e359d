"""The client's table of peer names (issue 16): the server's NAMES and the peers' announcements.

Sans-I/O: messages and ``now`` in, answers out. Two sources feed it. A p2pvpn
server sends NAMES (its table of every member's ping host name, made unique
by it); peers broadcast NameAnnouncements through any server, Candy's too.
The merge rule: a server entry wins for its address; an announcement fills an
address the server does not list; a server removal (an empty name) also drops
the announcement of that address, and a leaving announcement drops itself.
Without any server table (a Candy server) the names are made unique here,
with ``unique_names`` in address order, this member's own name included.
"""

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from p2pvpn.wire.names import clean_label, unique_names
from p2pvpn.wire.ws import NameAnnouncement, NameEntry, Names

__all__ = [
    "ANNOUNCE_INTERVAL",
    "ANNOUNCE_TTL",
    "MAX_PEER_NAMES",
    "NameRecord",
    "NameSource",
    "NameTable",
]

ANNOUNCE_INTERVAL = 60.0  # seconds between a member's announcements
ANNOUNCE_TTL = 180.0  # an announcement not renewed for this long is forgotten (3 missed)
# Announcements come from any member through the server: bound what they can make us hold.
MAX_PEER_NAMES = 4096

NameSource = Literal["server", "peer", "self"]


@dataclass(frozen=True, slots=True)
class NameRecord:
    """One resolved name: unique in the table, as DNS answers it."""

    address: IPv4Address
    name: str
    exit_node: bool
    p2pvpn: bool
    source: NameSource


@dataclass(frozen=True, slots=True)
class _Announced:
    name: str
    exit_node: bool
    seen: float


class NameTable:
    """Every member's name, merged from the server's table and the peers' announcements.

    ``generation`` goes up by one whenever what `records` returns changes, so that
    watchers (DNS, exit routing, status) compare a number instead of the table.
    The merge runs when the table is read after a change, not on every message:
    a burst of announcements costs one merge.
    """

    def __init__(self, own_address: IPv4Address, own_name: str, own_exit_node: bool) -> None:
        self.own_address = own_address
        self.own_name = own_name
        self.own_exit_node = own_exit_node
        self._generation = 0
        self._dirty = True
        self._server: dict[IPv4Address, NameEntry] | None = None  # None: no NAMES yet
        self._announced: dict[IPv4Address, _Announced] = {}
        self._records: list[NameRecord] = []
        self._by_name: dict[str, IPv4Address] = {}
        self._by_address: dict[IPv4Address, NameRecord] = {}

    # -- feeding ----------------------------------------------------------------

    def set_own(self, name: str, exit_node: bool) -> None:
        self.own_name = name
        self.own_exit_node = exit_node
        self._dirty = True

    def on_server_names(self, message: Names, now: float) -> None:
        """A NAMES message: a full table (``replace``) or changed entries."""
        if message.replace or self._server is None:
            self._server = {}
        for entry in message.entries:
            if entry.name:
                self._server[entry.address] = entry
            else:
                # The member left (or lost its name): what it announced goes with it.
                self._server.pop(entry.address, None)
                self._announced.pop(entry.address, None)
        self._dirty = True

    def on_announcement(self, message: NameAnnouncement, now: float) -> bool:
        """A peer's announcement; True when it asks for ours in reply."""
        source = message.src
        if source == self.own_address:
            return False
        if not message.name:
            if self._announced.pop(source, None) is not None:
                self._dirty = True
            return False
        if clean_label(message.name) != message.name:
            return False  # the decoder checks this; a table must not depend on it
        if source not in self._announced and len(self._announced) >= MAX_PEER_NAMES:
            return False
        previous = self._announced.get(source)
        self._announced[source] = _Announced(message.name, message.exit_node, now)
        if previous is None or (previous.name, previous.exit_node) != (
            message.name,
            message.exit_node,
        ):
            self._dirty = True
        return message.reply_wanted

    def expire(self, now: float) -> None:
        """Forget announcements not renewed within ANNOUNCE_TTL."""
        stale = [
            address
            for address, announced in self._announced.items()
            if now - announced.seen > ANNOUNCE_TTL
        ]
        for address in stale:
            del self._announced[address]
        if stale:
            self._dirty = True

    # -- reading ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """+1 on every change of `records`."""
        self._merge_if_changed()
        return self._generation

    def lookup(self, name: str) -> IPv4Address | None:
        """The address of ``name`` (without the domain), case-insensitively."""
        self._merge_if_changed()
        return self._by_name.get(name.lower())

    def name_of(self, address: IPv4Address) -> str | None:
        self._merge_if_changed()
        record = self._by_address.get(address)
        return None if record is None else record.name

    def records(self) -> list[NameRecord]:
        """The resolved (unique) names, sorted by address."""
        self._merge_if_changed()
        return list(self._records)

    def exit_nodes(self) -> dict[IPv4Address, str]:
        """Address -> name of the other members that offer themselves as exit nodes."""
        self._merge_if_changed()
        return {
            record.address: record.name
            for record in self._records
            if record.exit_node and record.source != "self"
        }

    @property
    def has_server_table(self) -> bool:
        return self._server is not None

    # -- merging ----------------------------------------------------------------

    def _merge_if_changed(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        records = self._merge()
        if records != self._records:
            self._records = records
            self._by_name = {record.name: record.address for record in records}
            self._by_address = {record.address: record for record in records}
            self._generation += 1

    def _merge(self) -> list[NameRecord]:
        """Candidates in priority order, made unique, sorted by address."""
        candidates: dict[IPv4Address, tuple[str, bool, bool, NameSource]] = {}
        if self._server is not None:
            # The server's names are unique already (suffixes and all); they come first.
            for address in sorted(self._server):
                entry = self._server[address]
                source: NameSource = "self" if address == self.own_address else "server"
                candidates[address] = (entry.name, entry.exit_node, entry.p2pvpn, source)
        own = self.own_address
        if own in candidates:
            name, _, _, _ = candidates[own]
            candidates[own] = (name, self.own_exit_node, True, "self")
        elif self.own_name:
            candidates[own] = (self.own_name, self.own_exit_node, True, "self")
        for address in sorted(self._announced):
            if address not in candidates:
                announced = self._announced[address]
                candidates[address] = (announced.name, announced.exit_node, True, "peer")
        if self._server is None:
            # Nobody ranked the names: address order, the same on every member.
            candidates = dict(sorted(candidates.items()))
        unique = unique_names([(address, fields[0]) for address, fields in candidates.items()])
        return [
            NameRecord(address, unique[address], exit_node, p2pvpn, source)
            for address, (_, exit_node, p2pvpn, source) in sorted(candidates.items())
        ]
