"""The relay cluster's shared names and records, and one server's view of the others.

Sans-I/O like the relay core: no NATS client, no event loop, no clock.
:mod:`p2pvpn.server.cluster` does the I/O: it subscribes and watches the
key-value buckets named here, feeds what it sees into a :class:`ClusterView`
(passing ``now``), and the relay reads that view synchronously while it
routes a frame or grants an address.

The records travel as JSON so that an operator can read a bucket with the
``nats`` tool; every decoder refuses anything but the exact shape with
:class:`~p2pvpn.wire.errors.DecodeError` (a ValueError), because a record
comes from the network even when the network is our own cluster.
"""

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol, Self

from p2pvpn.wire.errors import DecodeError

__all__ = [
    "BUCKET_KINDS",
    "CLUSTER_NETWORK_PATTERN",
    "ClusterView",
    "ConfigRecord",
    "OwnerRecord",
    "ServerRecord",
    "broadcast_subject",
    "bucket_name",
    "lease_key",
    "unicast_subject",
]

CLUSTER_NETWORK_PATTERN = r"[A-Za-z0-9_-]{1,32}"
BUCKET_KINDS = frozenset({"addresses", "leases", "replay", "servers", "config"})

# scrypt cost of the password check between servers. The hash sits in a bucket
# every cluster member (and whoever reads NATS) can see, so it must be slow to
# brute-force; it is computed once per server start and per config check.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_LENGTH = 32


class SdwanRuleLike(Protocol):
    """The shape of :class:`p2pvpn.config.SdwanRule` (and of the relay's) needed here."""

    @property
    def device(self) -> IPv4Network: ...

    @property
    def destination(self) -> IPv4Network: ...

    @property
    def nexthop(self) -> IPv4Address: ...


def unicast_subject(network: str, address: IPv4Address) -> str:
    """The subject of frames for ``address``; its holder subscribes to it."""
    return f"p2pvpn.{network}.ip.{address}"


def broadcast_subject(network: str) -> str:
    return f"p2pvpn.{network}.broadcast"


def bucket_name(network: str, kind: str) -> str:
    if kind not in BUCKET_KINDS:
        raise ValueError(f"unknown bucket kind {kind!r}")
    return f"p2pvpn_{network}_{kind}"


def lease_key(vmac: str) -> str:
    """A vmac as a KV key: NATS keys allow few characters, a vmac may hold any."""
    return vmac.encode().hex()


# -- records -------------------------------------------------------------------


def _encode(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _decode_object(data: bytes, name: str, keys: frozenset[str]) -> dict[str, Any]:
    try:
        loaded = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"{name}: not JSON ({exc})") from None
    if not isinstance(loaded, dict) or set(loaded) != keys:
        raise DecodeError(f"{name}: expected an object with the keys {sorted(keys)}")
    return loaded


def _text(fields: dict[str, Any], key: str, name: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise DecodeError(f"{name}: {key} must be a string")
    return value


def _optional_text(fields: dict[str, Any], key: str, name: str) -> str | None:
    return None if fields[key] is None else _text(fields, key, name)


def _number(fields: dict[str, Any], key: str, name: str) -> float:
    value = fields[key]
    # bool is an int to Python, never a time to us.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DecodeError(f"{name}: {key} must be a number")
    return float(value)


def _count(fields: dict[str, Any], key: str, name: str) -> int:
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DecodeError(f"{name}: {key} must be a count")
    return value


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """Who holds an address right now: value of the addresses bucket."""

    server: str  # server id
    session: str  # RelaySession.session_id: tells two logins of one address apart
    vmac: str | None
    since: float  # login time, Unix seconds

    def encode(self) -> bytes:
        return _encode(
            {"server": self.server, "session": self.session, "vmac": self.vmac, "since": self.since}
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        name = "owner record"
        fields = _decode_object(data, name, frozenset({"server", "session", "vmac", "since"}))
        return cls(
            _text(fields, "server", name),
            _text(fields, "session", name),
            _optional_text(fields, "vmac", name),
            _number(fields, "since", name),
        )


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """One server of the cluster: value of the servers bucket, refreshed while it runs."""

    server: str  # server id
    name: str  # for people: the host name
    websocket: str  # the URL it listens on
    sessions: int  # logged-in sessions
    started: float  # Unix seconds
    updated: float

    def encode(self) -> bytes:
        return _encode(
            {
                "server": self.server,
                "name": self.name,
                "websocket": self.websocket,
                "sessions": self.sessions,
                "started": self.started,
                "updated": self.updated,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        name = "server record"
        keys = frozenset({"server", "name", "websocket", "sessions", "started", "updated"})
        fields = _decode_object(data, name, keys)
        return cls(
            _text(fields, "server", name),
            _text(fields, "name", name),
            _text(fields, "websocket", name),
            _count(fields, "sessions", name),
            _number(fields, "started", name),
            _number(fields, "updated", name),
        )


def _password_hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=2 * 128 * SCRYPT_R * SCRYPT_N,
        dklen=SCRYPT_LENGTH,
    )


def _dhcp_text(dhcp: IPv4Network | None) -> str | None:
    return None if dhcp is None else str(dhcp)


def _sdwan_texts(sdwan: Sequence[SdwanRuleLike]) -> list[str]:
    # Built from the fields, not str(rule): the canonical form must not depend
    # on which class the rules come in. Sorted: the order of rules carries no meaning.
    return sorted(f"{rule.device},{rule.destination},{rule.nexthop}" for rule in sdwan)


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    """What every server of one network must share; the password only as a scrypt hash."""

    password_salt: str  # hex
    password_hash: str  # hex scrypt(password, salt)
    dhcp: str | None  # the pool's canonical text
    sdwan: list[str]  # canonical rule texts, sorted

    @classmethod
    def of(
        cls,
        password: str,
        dhcp: IPv4Network | None,
        sdwan: Sequence[SdwanRuleLike],
        salt: bytes,
    ) -> Self:
        return cls(
            salt.hex(),
            _password_hash(password, salt).hex(),
            _dhcp_text(dhcp),
            _sdwan_texts(sdwan),
        )

    def differing_key(
        self, password: str, dhcp: IPv4Network | None, sdwan: Sequence[SdwanRuleLike]
    ) -> str | None:
        """The first config key of ours that differs from this record, or None."""
        try:
            salt = bytes.fromhex(self.password_salt)
            stored = bytes.fromhex(self.password_hash)
        except ValueError:
            return "password"
        if not hmac.compare_digest(stored, _password_hash(password, salt)):
            return "password"
        if self.dhcp != _dhcp_text(dhcp):
            return "dhcp"
        if self.sdwan != _sdwan_texts(sdwan):
            return "sdwan"
        return None

    def encode(self) -> bytes:
        return _encode(
            {
                "password_salt": self.password_salt,
                "password_hash": self.password_hash,
                "dhcp": self.dhcp,
                "sdwan": self.sdwan,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        name = "config record"
        keys = frozenset({"password_salt", "password_hash", "dhcp", "sdwan"})
        fields = _decode_object(data, name, keys)
        sdwan = fields["sdwan"]
        if not isinstance(sdwan, list) or not all(isinstance(rule, str) for rule in sdwan):
            raise DecodeError(f"{name}: sdwan must be a list of strings")
        return cls(
            _text(fields, "password_salt", name),
            _text(fields, "password_hash", name),
            _optional_text(fields, "dhcp", name),
            list(sdwan),
        )


# -- the view ------------------------------------------------------------------


class ClusterView:
    """This server's picture of the others, fed from the KV watches, read by the relay.

    Owner and server entries expire ``ttl`` seconds after they were last put:
    their holder refreshes them every ttl/3, and NATS does not tell watchers
    when a key's age runs out, so a server that died would otherwise hold its
    addresses here for ever. Reads compare against the latest ``now`` the view
    was given, so an entry is gone on time even between two :meth:`expire` calls.
    """

    def __init__(self, server_id: str, ttl: float) -> None:
        self.server_id = server_id
        self.ttl = ttl
        self._now = float("-inf")  # the latest time fed in
        # address -> (record, deadline); records of this server are kept too,
        # so that a later put by another server simply replaces them.
        self._owners: dict[IPv4Address, tuple[OwnerRecord, float]] = {}
        self._leases: dict[str, IPv4Address] = {}  # vmac -> address
        self._lease_owner: dict[IPv4Address, str] = {}  # address -> vmac
        self._servers: dict[str, tuple[ServerRecord, float]] = {}

    def _advance(self, now: float) -> None:
        self._now = max(self._now, now)

    # -- fed by the I/O layer ------------------------------------------------

    def owner_put(self, address: IPv4Address, record: OwnerRecord, now: float) -> None:
        self._advance(now)
        self._owners[address] = (record, now + self.ttl)

    def owner_deleted(self, address: IPv4Address) -> None:
        self._owners.pop(address, None)

    def lease_put(self, vmac: str, address: IPv4Address) -> None:
        """One-to-one like the relay's own table: a vmac one address, an address one vmac."""
        old_address = self._leases.get(vmac)
        if old_address is not None and self._lease_owner.get(old_address) == vmac:
            del self._lease_owner[old_address]
        old_vmac = self._lease_owner.get(address)
        if old_vmac is not None and old_vmac != vmac:
            del self._leases[old_vmac]
        self._leases[vmac] = address
        self._lease_owner[address] = vmac

    def lease_deleted(self, vmac: str) -> None:
        address = self._leases.pop(vmac, None)
        if address is not None and self._lease_owner.get(address) == vmac:
            del self._lease_owner[address]

    def server_put(self, record: ServerRecord, now: float) -> None:
        self._advance(now)
        self._servers[record.server] = (record, now + self.ttl)

    def server_deleted(self, server_id: str) -> None:
        self._servers.pop(server_id, None)

    def expire(self, now: float) -> None:
        """Drop the owner and server entries not refreshed within ttl."""
        self._advance(now)
        now = self._now
        for address in [a for a, (_, deadline) in self._owners.items() if deadline < now]:
            del self._owners[address]
        for server in [s for s, (_, deadline) in self._servers.items() if deadline < now]:
            del self._servers[server]

    def clear_remote(self) -> None:
        """NATS lost for good or refused: forget the other servers and their addresses.

        Leases stay: they only make DHCP prefer an address, and sticky
        addresses are what a rejoin should find again.
        """
        self._owners = {
            address: entry
            for address, entry in self._owners.items()
            if entry[0].server == self.server_id
        }
        self._servers = {
            server: entry for server, entry in self._servers.items() if server == self.server_id
        }

    # -- read by the relay ---------------------------------------------------

    def remote_owner(self, address: IPv4Address) -> OwnerRecord | None:
        """The holder of ``address`` if it is ANOTHER server and its record is fresh."""
        entry = self._owners.get(address)
        if entry is None:
            return None
        record, deadline = entry
        if record.server == self.server_id or deadline < self._now:
            return None
        return record

    def lease_of(self, vmac: str) -> IPv4Address | None:
        return self._leases.get(vmac)

    def lease_owner(self, address: IPv4Address) -> str | None:
        return self._lease_owner.get(address)

    def servers(self) -> list[ServerRecord]:
        """The other servers with a fresh record, by name (then id)."""
        others = [
            record
            for record, deadline in self._servers.values()
            if record.server != self.server_id and deadline >= self._now
        ]
        return sorted(others, key=lambda record: (record.name, record.server))

    def remote_sessions(self) -> int:
        return sum(record.sessions for record in self.servers())
