"""The relay cluster's NATS side: every byte this server exchanges with the other servers.

:class:`ClusterLink` performs the relay's cluster actions (:class:`Publish`,
:class:`Claim`, :class:`Release`, :class:`RecordLease`) on NATS and feeds what
the other servers do into the relay's :class:`ClusterView`:

* frames for an address held elsewhere go to the subject of that address,
  broadcasts to the network's broadcast subject; this server subscribes to the
  subjects of the addresses it holds and to the broadcast subject;
* JetStream key-value buckets hold who holds which address (refreshed every
  ttl/3, so a dead server's addresses run out after the ttl), the sticky DHCP
  leases, the login replay keys, the servers and the configuration they share.

NATS is never needed to serve this server's own sessions: when it is
unreachable at start or lost later, the link logs it once, keeps trying in the
background and rejoins when NATS answers, writing this server's records again.
nats-py is imported only when a cluster is configured (the ``cluster`` extra).
"""

import asyncio
import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from p2pvpn.config import ServerConfig, display_url
from p2pvpn.server.cluster_state import (
    ClusterView,
    ConfigRecord,
    OwnerRecord,
    ServerRecord,
    broadcast_subject,
    bucket_name,
    lease_key,
    unicast_subject,
)
from p2pvpn.server.relay import (
    REPLAY_WINDOW,
    Action,
    Claim,
    Publish,
    RecordLease,
    Relay,
    RelaySession,
    Release,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = [
    "NATS_MISSING",
    "ClusterAction",
    "ClusterError",
    "ClusterLink",
    "ClusterState",
    "require_nats",
]

logger = logging.getLogger(__name__)

NATS_MISSING = "p2pvpn server --cluster needs nats-py: pip install 'p2pvpn[cluster]'"
# How long start() waits to join before it serves alone and keeps trying.
START_DEADLINE = 5.0
CONNECT_TIMEOUT = 2  # seconds per connection attempt (nats-py takes an int)
RECONNECT_WAIT = 1  # seconds between attempts to reach NATS again
JOIN_RETRY = 1.0  # connected but JetStream not answering (yet): try again after this
REQUEST_TIMEOUT = 2.0  # a JetStream request (KV read, write acknowledgement)
CLOSE_TIMEOUT = 3.0  # shutdown: deleting our records and closing the connection
LEASE_TTL = 24 * 3600.0
# Frames from other servers that nats-py may hold for us before it drops them
# (slow consumer): a server that cannot keep up drops, as a full session queue
# does, instead of buffering nats-py's default 128 MB.
SUBSCRIPTION_PENDING_BYTES = 8 * 1024 * 1024
CONFIG_KEY = "settings"
# KV writes in flight at once when many addresses are written (a rejoin, a refresh).
WRITE_CHUNK = 256
# At most one WARNING per this many seconds for per-frame NATS trouble.
WARNING_INTERVAL = 10.0
# JetStream's "wrong last sequence" error codes: someone else wrote the key.
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
# The bucket already exists with other settings.
_STREAM_NAME_IN_USE = 10058

ClusterAction = Publish | Claim | Release | RecordLease
ClusterState = Literal["joined", "connecting", "unreachable", "refused"]
PerformActions = Callable[[list[Action]], None]


class ClusterError(Exception):
    """The server cannot start with this cluster; the message names the key, URL or extra."""


class _MismatchError(Exception):
    """This server's configuration differs from the cluster's; the message says how."""


def require_nats(config: ServerConfig) -> None:
    """Raise ClusterError when what ``config.cluster`` needs is not installed."""
    if importlib.util.find_spec("nats") is None:
        raise ClusterError(NATS_MISSING)
    try:
        import nats  # noqa: F401 - a broken install fails here rather than at connect time
    except ImportError:
        raise ClusterError(NATS_MISSING) from None
    if config.cluster_credentials is not None and importlib.util.find_spec("nkeys") is None:
        raise ClusterError(
            "cluster_credentials needs the nkeys package: pip install 'p2pvpn[cluster]'"
        )
    websocket = any(urlsplit(url).scheme in {"ws", "wss"} for url in config.cluster)
    if websocket and importlib.util.find_spec("aiohttp") is None:
        raise ClusterError("cluster: ws:// and wss:// NATS URLs need aiohttp: pip install aiohttp")


@dataclass(slots=True)
class _Claim:
    """An address a session of ours holds: what NATS should say about it."""

    session: RelaySession
    record: OwnerRecord


@dataclass(slots=True)
class _Written:
    """What we last wrote on NATS for an address."""

    session_id: str
    revision: int | None  # None: write it again (after a rejoin)


class ClusterLink:
    """This server's membership in the cluster of ``config.cluster_network`` on NATS.

    ``relay`` must have been built with a :class:`ClusterView` (``relay.cluster``).
    Frames from other servers become the relay's actions, carried out by the
    ``perform`` function the WebSocket layer gives to :meth:`bind`.
    """

    def __init__(
        self, config: ServerConfig, relay: Relay, *, server_name: str, websocket: str
    ) -> None:
        view = relay.cluster
        if view is None:
            raise ValueError("the relay has no ClusterView: build it with cluster=")
        self._config = config
        self._relay = relay
        self._view: ClusterView = view
        self.server_id = view.server_id
        self.server_name = server_name
        self.websocket = websocket  # the URL clients use, for the servers table
        self._network = config.cluster_network
        self._ttl = config.cluster_ttl
        self._broadcast_subject = broadcast_subject(self._network)
        self._perform: PerformActions = _perform_nothing
        self._started = time.time()
        # Connection and membership.
        self._nc: NatsClient | None = None
        self._state: ClusterState = "connecting"
        self._refused: str | None = None
        self._joined = False
        self._closing = False
        self._in_start = False  # start() is waiting to join: it reports a refusal itself
        self._connected_since: float | None = None
        self._lost_at: float | None = None
        self._outages = 0
        self._last_error: str | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._settled = asyncio.Event()  # joined or refused: start() stops waiting
        self._buckets: dict[str, KeyValue] = {}
        self._config_record = b""
        self._made_config_record = False  # no running server had one: we wrote it
        self._sessions_written = -1  # the session count in our server record
        self._watches: list[tuple[Any, asyncio.Task[None]]] = []
        self._broadcast_subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Addresses: what should be on NATS, what we wrote, what we listen to.
        self._claims: dict[IPv4Address, _Claim] = {}
        self._written: dict[IPv4Address, _Written] = {}
        self._subscriptions: dict[IPv4Address, Subscription] = {}
        self._dirty: dict[IPv4Address, None] = {}  # ordered set: to reconcile
        self._leases: dict[str, IPv4Address] = {}  # vmac -> address, to write
        self._wake = asyncio.Event()
        # Publishing: one task per event-loop turn writes what the turn published.
        self._outbox: list[tuple[str, bytes]] = []
        # Bytes in the outbox: capped like one session's send queue (send_queue_bytes),
        # so a client flooding an address on another server costs bounded memory
        # and its excess is dropped here, as it would be on one server.
        self._outbox_bytes = 0
        self._outbox_limit = config.send_queue_bytes
        self._flusher: asyncio.Task[None] | None = None
        self._published = 0
        self._publish_dropped = 0
        self._received = 0
        self._warned: dict[str, float] = {}
        self._replay_warned = False
        self._join_warned = False  # a failed join was logged; again after the next join

    # -- lifecycle ------------------------------------------------------------

    def bind(self, perform: PerformActions) -> None:
        """Where the relay's Send/Close actions for frames from the cluster go."""
        self._perform = perform

    async def start(self) -> None:
        """Join the cluster, or start serving alone and keep trying in the background.

        Raises ClusterError when the cluster's configuration differs from ours.
        """
        require_nats(self._config)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._membership(), name="cluster membership"),
            loop.create_task(self._work(), name="cluster writes"),
            loop.create_task(self._refresh_loop(), name="cluster refresh"),
        ]
        self._in_start = True
        try:
            async with asyncio.timeout(START_DEADLINE):
                await self._settled.wait()
        except TimeoutError:
            pass
        finally:
            self._in_start = False
        if self._state == "refused":
            reason = self._refused or "refused"
            await self.close()
            raise ClusterError(reason)
        if not self._joined:
            self._state = "unreachable"
            self._join_warned = True  # this warning says it
            detail = f" ({self._last_error})" if self._last_error else ""
            logger.warning(
                "cannot join the cluster at %s%s: serving this server's clients alone, "
                "joining when NATS answers",
                self.nats_url,
                detail,
            )

    async def close(self) -> None:
        """Delete our records (when NATS is reachable) and close the connection."""
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        nc = self._nc
        if nc is None:
            return
        if self._joined and nc.is_connected:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._delete_our_records()
            except Exception as exc:
                logger.debug("cluster: records left to expire: %s", exc)
        self._joined = False
        await self._stop_watches()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await nc.close()

    async def _delete_our_records(self) -> None:
        written = list(self._written.items())
        for start in range(0, len(written), WRITE_CHUNK):
            await asyncio.gather(
                *(
                    self._delete_if_ours(address, item.session_id)
                    for address, item in written[start : start + WRITE_CHUNK]
                )
            )
        await self._bucket("servers").delete(self.server_id)

    # -- what the relay asks ----------------------------------------------------

    def perform(self, action: ClusterAction) -> None:
        """Carry out one of the relay's cluster actions; never blocks."""
        if isinstance(action, Publish):
            self._publish(action)
        elif isinstance(action, Claim):
            self._claims[action.address] = _Claim(action.session, action.record)
            self._mark(action.address)
        elif isinstance(action, Release):
            claim = self._claims.get(action.address)
            if claim is not None and claim.session is action.session:
                del self._claims[action.address]
                self._mark(action.address)
        else:
            self._leases[action.vmac] = action.address
            self._wake.set()

    async def claim_replay(self, key: str) -> bool:
        """False when another server (or this one) saw this login message already.

        True while NATS is down: replays to other servers cannot be checked then
        (logged once per outage); the local replay cache still applies.
        """
        bucket = self._buckets.get("replay")
        if not self._joined or bucket is None:
            self._warn_replays_unchecked("NATS is not reachable")
            return True
        nats_errors = _nats_errors()
        try:
            await bucket.create(key, b"1")
        except nats_errors.KeyWrongLastSequenceError:
            return False
        except (nats_errors.Error, TimeoutError) as exc:
            self._warn_replays_unchecked(str(exc) or type(exc).__name__)
        return True

    def _warn_replays_unchecked(self, why: str) -> None:
        if not self._replay_warned:
            self._replay_warned = True
            logger.warning(
                "cluster: %s: logins replayed to other servers cannot be checked "
                "until it is back (this server's replay cache still applies)",
                why,
            )

    # -- status -----------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._state

    @property
    def nats_url(self) -> str:
        """The NATS server connected to (else the first configured), without credentials."""
        nc = self._nc
        if nc is not None and nc.is_connected and nc.connected_url is not None:
            return display_url(nc.connected_url.geturl())
        return display_url(self._config.cluster[0]) if self._config.cluster else ""

    def status(self) -> dict[str, object]:
        now = time.time()
        me = {
            "id": self.server_id,
            "name": self.server_name,
            "websocket": self.websocket,
            "sessions": self._session_count(),
            "updated": now,
            "self": True,
        }
        others = [
            {
                "id": record.server,
                "name": record.name,
                "websocket": record.websocket,
                "sessions": record.sessions,
                "updated": record.updated,
                "self": False,
            }
            for record in self._view.servers()
        ]
        return {
            "network": self._network,
            "server": self.server_id,
            "state": self._state,
            "refused": self._refused,
            "nats_url": self.nats_url,
            "connected_since": self._connected_since if self._joined else None,
            "outages": self._outages,
            "servers": [me, *others],
            "frames_published": self._published,
            "frames_received": self._received,
        }

    def stats(self) -> dict[str, object]:
        """For metrics: connected 0/1, outages and frame counters."""
        return {
            "connected": 1 if self._joined else 0,
            "outages": self._outages,
            "published": self._published,
            "publish_dropped": self._publish_dropped,
            "received": self._received,
            "servers": 1 + len(self._view.servers()),
        }

    def _session_count(self) -> int:
        sessions = self._relay.stats().get("sessions_authenticated", 0)
        return sessions if isinstance(sessions, int) else 0

    # -- connection and membership -----------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        config = self._config
        options: dict[str, Any] = {
            "servers": list(config.cluster),
            "name": f"p2pvpn-server {self.server_name} {self.server_id}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": RECONNECT_WAIT,
            "connect_timeout": CONNECT_TIMEOUT,
            # A server never needs its own broadcasts back.
            "no_echo": True,
            # A silent NATS (a cut link, not a closed socket) is noticed within about a ttl.
            "ping_interval": max(1, int(self._ttl / 3)),
            "max_outstanding_pings": 2,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }
        if config.cluster_credentials is not None:
            options["user_credentials"] = str(config.cluster_credentials)
        return options

    async def _membership(self) -> None:
        """Connect (forever), then join after every (re)connection until refused or closed."""
        from nats.aio.client import Client

        self._nc = Client()
        try:
            await self._nc.connect(**self._connect_options())
        except Exception as exc:  # a URL or option nats-py refuses at once
            self._refuse(self._scrub(f"cluster: cannot connect to {self.nats_url}: {exc}"))
            return
        self._up.set()
        while True:
            await self._up.wait()
            try:
                await self._join()
            except _MismatchError as exc:
                self._refuse(str(exc))
                return
            except Exception as exc:
                # Connected, but JetStream does not answer (yet, or not enabled).
                self._last_error = self._scrub(_join_error_text(exc))
                if not self._in_start:  # start() reports it itself
                    self._state = "unreachable"
                    if not self._join_warned:
                        self._join_warned = True
                        logger.warning("cluster: cannot join yet: %s", self._last_error)
                await asyncio.sleep(JOIN_RETRY)
                continue
            await self._down.wait()

    async def _on_disconnected(self) -> None:
        if self._closing or self._state == "refused":
            return
        self._up.clear()
        self._down.set()
        if not self._in_start:
            self._state = "unreachable"
        if self._joined:
            self._joined = False
            self._outages += 1
            self._lost_at = time.time()
            self._replay_warned = False
            self._join_warned = True  # until it is back, this warning says it
            logger.warning(
                "lost NATS at %s: serving this server's clients alone, "
                "cross-server relaying stops until it is back",
                self.nats_url,
            )

    async def _on_reconnected(self) -> None:
        if self._closing or self._state == "refused":
            return
        self._down.clear()
        self._up.set()

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = self._scrub(str(exc) or type(exc).__name__)
        logger.debug("cluster: NATS: %s", self._last_error)
        if type(exc).__name__ == "SlowConsumerError":
            self._throttled_warning(
                "slow_consumer", "cluster: frames from NATS dropped: %s", self._last_error
            )

    def _scrub(self, text: str) -> str:
        """``text`` without the userinfo of any configured URL (an error may quote one)."""
        for url in self._config.cluster:
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            if userinfo:
                text = text.replace(userinfo, "***")
        return text

    def _refuse(self, reason: str) -> None:
        """Stop using the cluster for good: configuration mismatch or an unusable URL."""
        self._state = "refused"
        self._refused = reason
        self._joined = False
        self._view.clear_remote()
        self._settled.set()
        if not self._in_start:
            # start() raises it as a ClusterError; after start() nobody else reports it.
            logger.error("%s: serving this server's clients alone", reason)
        nc = self._nc
        if nc is not None and not self._closing:
            self._tasks.append(asyncio.get_running_loop().create_task(self._close_quietly(nc)))

    @staticmethod
    async def _close_quietly(nc: "NatsClient") -> None:
        with contextlib.suppress(Exception):
            await nc.close()

    async def _join(self) -> None:
        """Connected: buckets, configuration check, our records, watches and subscriptions."""
        nc = self._nc
        assert nc is not None
        self._state = "connecting"
        js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        differing = await self._open_buckets(js)
        await self._check_config()
        await self._settle_ttl(js, differing)
        await self._put_server_record()
        if self._broadcast_subscription is None:
            self._broadcast_subscription = await nc.subscribe(
                self._broadcast_subject,
                cb=self._on_broadcast,
                pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
            )
        await self._stop_watches()
        # Our records may have run out during an outage: every one is written again.
        for written in self._written.values():
            written.revision = None
        await self._reconcile_all([*self._claims, *self._written, *self._subscriptions])
        await self._write_leases()
        await self._start_watches()
        self._joined = True
        self._state = "joined"
        self._connected_since = time.time()
        self._last_error = None
        self._join_warned = False
        self._settled.set()
        self._wake.set()
        if self._lost_at is not None:
            logger.info(
                "rejoined the cluster at %s after %.1f s without NATS",
                self.nats_url,
                time.time() - self._lost_at,
            )
            self._lost_at = None
        else:
            logger.info(
                "joined the cluster %r at %s as server %s",
                self._network,
                self.nats_url,
                self.server_id,
            )

    async def _open_buckets(self, js: "JetStreamContext") -> dict[str, float]:
        """Create the buckets, or bind those another server made; the ttls that differ.

        Returns kind -> the bucket's ttl for the buckets whose ttl is not ours.
        """
        nats_errors = _nats_errors()
        differing: dict[str, float] = {}
        for kind, ttl in self._bucket_ttls().items():
            name = bucket_name(self._network, kind)
            try:
                bucket = await js.create_key_value(bucket=name, ttl=ttl, history=1)
            except nats_errors.APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                bucket = await js.key_value(name)
                theirs = (await bucket.status()).ttl
                if theirs is not None and abs(theirs - ttl) > 0.001:
                    differing[kind] = theirs
            self._buckets[kind] = bucket
        return differing

    def _bucket_ttls(self) -> dict[str, float]:
        return {
            "addresses": self._ttl,
            "leases": LEASE_TTL,
            "replay": 2 * REPLAY_WINDOW,
            "servers": self._ttl,
            "config": self._ttl,
        }

    async def _settle_ttl(self, js: "JetStreamContext", differing: dict[str, float]) -> None:
        """Buckets made with another cluster_ttl: ours if no server runs, else refuse.

        The buckets outlive their servers, so a cluster restarted with a new
        cluster_ttl takes it over; a running cluster refreshes at its own pace.
        """
        if "addresses" in differing and not self._made_config_record:
            raise _MismatchError(
                f"cluster configuration differs: cluster_ttl is {differing['addresses']:g} s "
                f"on the cluster, {self._ttl:g} s here"
            )
        ttls = self._bucket_ttls()
        for kind in differing:
            info = await js.stream_info(f"KV_{bucket_name(self._network, kind)}")
            ttl = ttls[kind]
            duplicate_window = min(info.config.duplicate_window or ttl, ttl)
            await js.update_stream(info.config, max_age=ttl, duplicate_window=duplicate_window)
        if differing:
            logger.info("cluster: the buckets of %r now have ttl %g s", self._network, self._ttl)

    def _bucket(self, kind: str) -> "KeyValue":
        return self._buckets[kind]

    async def _check_config(self) -> None:
        """Write our configuration record, or compare with the one the cluster has."""
        config = self._config
        ours = ConfigRecord.of(config.password, config.dhcp, config.sdwan, salt=os.urandom(16))
        data = ours.encode()
        bucket = self._bucket("config")
        wrong_last = _nats_errors().KeyWrongLastSequenceError
        for _ in range(3):
            try:
                await bucket.create(CONFIG_KEY, data)
            except wrong_last:
                pass
            else:
                self._config_record = data
                self._made_config_record = True
                return
            entry = await _get(bucket, CONFIG_KEY)
            if entry is None:
                continue  # it ran out in between: create it again
            try:
                theirs = ConfigRecord.decode(entry)
            except ValueError:
                raise _MismatchError(
                    "cluster configuration record unreadable (another p2pvpn version?)"
                ) from None
            key = theirs.differing_key(config.password, config.dhcp, config.sdwan)
            if key is not None:
                raise _MismatchError(_describe_difference(key, theirs, ours))
            self._config_record = entry
            self._made_config_record = False
            return
        raise _MismatchError("cluster configuration record keeps changing")

    async def _put_server_record(self) -> None:
        now = time.time()
        self._sessions_written = self._session_count()
        record = ServerRecord(
            server=self.server_id,
            name=self.server_name,
            websocket=self.websocket,
            sessions=self._sessions_written,
            started=self._started,
            updated=now,
        )
        await self._bucket("servers").put(self.server_id, record.encode())

    # -- refreshing and writing addresses -------------------------------------

    async def _refresh_loop(self) -> None:
        """Every ttl/3: our records again, and the view forgets what nobody refreshed."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            self._view.expire(time.time())
            if not self._joined:
                continue
            try:
                await self._put_server_record()
                await self._bucket("config").put(CONFIG_KEY, self._config_record)
            except Exception as exc:
                logger.debug("cluster: refresh failed: %s", exc)
            for address in [*self._claims, *self._written, *self._subscriptions]:
                self._dirty[address] = None
            self._wake.set()

    def _mark(self, address: IPv4Address) -> None:
        self._dirty[address] = None
        self._wake.set()

    async def _work(self) -> None:
        """Writes the addresses and leases that changed, in batches, while joined."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._joined:
                continue  # the next join writes everything
            addresses = list(self._dirty)
            self._dirty.clear()
            try:
                await self._reconcile_all(addresses)
                await self._write_leases()
                if self._session_count() != self._sessions_written:
                    # Logins and logouts show in the other servers' status without waiting.
                    await self._put_server_record()
            except Exception as exc:  # NATS went away meanwhile: the next join writes all
                logger.debug("cluster: writes interrupted: %r", exc)

    async def _reconcile_all(self, addresses: Iterable[IPv4Address]) -> None:
        unique = list(dict.fromkeys(addresses))
        for start in range(0, len(unique), WRITE_CHUNK):
            chunk = unique[start : start + WRITE_CHUNK]
            results = await asyncio.gather(
                *(self._reconcile(address) for address in chunk), return_exceptions=True
            )
            for address, result in zip(chunk, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    # Retried at the next refresh or join.
                    logger.debug("cluster: writing %s failed: %r", address, result)

    async def _reconcile(self, address: IPv4Address) -> None:
        """Make NATS say what we hold about ``address``: our claim, or nothing of ours."""
        nc = self._nc
        assert nc is not None
        claim = self._claims.get(address)
        if claim is None:
            subscription = self._subscriptions.pop(address, None)
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            written = self._written.get(address)
            if written is not None:
                # Forgotten only once deleted: a shutdown in between still deletes it.
                await self._delete_if_ours(address, written.session_id)
                if self._written.get(address) is written:
                    del self._written[address]
            return
        if address not in self._subscriptions:
            self._subscriptions[address] = await nc.subscribe(
                unicast_subject(self._network, address),
                cb=self._on_unicast,
                pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
            )
        written = self._written.get(address)
        data = claim.record.encode()
        settled = written is not None and written.session_id == claim.record.session
        revision = written.revision if written is not None else None
        if written is not None and settled and revision is not None:
            try:
                written.revision = await self._bucket("addresses").update(
                    str(address), data, last=revision
                )
                return
            except _nats_errors().KeyWrongLastSequenceError:
                pass  # written by someone else since: see who holds it now
        await self._claim_unless_newer(address, claim, data)

    async def _claim_unless_newer(self, address: IPv4Address, claim: _Claim, data: bytes) -> None:
        """Write our record unless another session logged in later (then ours is kicked)."""
        bucket = self._bucket("addresses")
        key = str(address)
        wrong_last = _nats_errors().KeyWrongLastSequenceError
        for _ in range(3):
            entry = await _get_entry(bucket, key)
            current = _owner(entry.value) if entry is not None else None
            if (
                current is not None
                and current.session != claim.record.session
                and current.since > claim.record.since
            ):
                self._lose(address, current)
                return
            try:
                if entry is None:
                    revision = await bucket.create(key, data)
                else:
                    revision = await bucket.update(key, data, last=entry.revision)
            except wrong_last:
                continue  # written in between: look again
            self._written[address] = _Written(claim.record.session, revision)
            return
        self._dirty[address] = None  # contended: the next refresh tries again

    def _lose(self, address: IPv4Address, record: OwnerRecord) -> None:
        """Another server's session holds ``address`` now: close ours, keep their key."""
        claim = self._claims.get(address)
        if claim is None:
            return
        actions = self._relay.kick(address, record, time.time())
        self._perform(actions)
        if actions or claim.session.closed:
            del self._claims[address]
            self._written.pop(address, None)  # the key is theirs: not deleted
        self._mark(address)  # unsubscribes, or writes ours back if the relay kept it

    async def _delete_if_ours(self, address: IPv4Address, session_id: str) -> None:
        """Delete the owner record of ``address`` if it still names ``session_id``."""
        bucket = self._bucket("addresses")
        entry = await _get_entry(bucket, str(address))
        if entry is None:
            return
        current = _owner(entry.value)
        if current is None or current.session != session_id:
            return
        try:
            await bucket.delete(str(address), last=entry.revision)
        except _nats_errors().APIError as exc:
            if exc.err_code not in _WRONG_LAST_SEQUENCE:
                raise

    async def _write_leases(self) -> None:
        leases, self._leases = self._leases, {}
        if not leases:
            return
        bucket = self._bucket("leases")
        items = list(leases.items())
        for start in range(0, len(items), WRITE_CHUNK):
            chunk = items[start : start + WRITE_CHUNK]
            results = await asyncio.gather(
                *(bucket.put(lease_key(vmac), str(address).encode()) for vmac, address in chunk),
                return_exceptions=True,
            )
            for (vmac, address), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    self._leases.setdefault(vmac, address)  # written at the next join

    # -- watches: what the other servers do ---------------------------------------

    async def _start_watches(self) -> None:
        handlers: dict[str, Callable[[Any], None]] = {
            "addresses": self._on_owner_entry,
            "leases": self._on_lease_entry,
            "servers": self._on_server_entry,
        }
        loop = asyncio.get_running_loop()
        for kind, handler in handlers.items():
            watcher = await self._bucket(kind).watchall()
            task = loop.create_task(_follow(watcher, handler), name=f"cluster watch {kind}")
            self._watches.append((watcher, task))

    async def _stop_watches(self) -> None:
        watches, self._watches = self._watches, []
        for watcher, task in watches:
            task.cancel()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await watcher.stop()

    def _on_owner_entry(self, entry: Any) -> None:
        address = _address(entry.key)
        if address is None:
            return
        if _deleted(entry):
            self._view.owner_deleted(address)
            if address in self._claims:
                self._mark(address)  # ours must not vanish: written again
            return
        record = _owner(entry.value)
        if record is None:
            return
        # Ours too: a later put by another server then simply replaces it.
        self._view.owner_put(address, record, time.time())
        if record.server == self.server_id:
            return
        claim = self._claims.get(address)
        if claim is not None and record.session != claim.record.session:
            if record.since >= claim.record.since:
                self._lose(address, record)
            else:
                self._mark(address)  # ours is the later login: written back

    def _on_lease_entry(self, entry: Any) -> None:
        try:
            vmac = bytes.fromhex(entry.key).decode()
        except (ValueError, UnicodeDecodeError):
            return
        if _deleted(entry):
            self._view.lease_deleted(vmac)
            return
        try:
            address = IPv4Address(bytes(entry.value).decode())
        except (AddressValueError, UnicodeDecodeError):
            return
        self._view.lease_put(vmac, address)

    def _on_server_entry(self, entry: Any) -> None:
        if _deleted(entry):
            self._view.server_deleted(entry.key)
            return
        try:
            record = ServerRecord.decode(entry.value)
        except ValueError:
            return
        if record.server != self.server_id:
            self._view.server_put(record, time.time())

    # -- frames ----------------------------------------------------------------

    def _publish(self, action: Publish) -> None:
        nc = self._nc
        if not self._joined or nc is None or not nc.is_connected:
            self._publish_dropped += 1
            return
        subject = (
            self._broadcast_subject
            if action.address is None
            else unicast_subject(self._network, action.address)
        )
        size = len(action.frame)
        if self._outbox_bytes + size > self._outbox_limit:
            self._publish_dropped += 1
            self._relay.cap_hit(
                "cluster_outbox_full",
                time.time(),
                "frames for other servers dropped: %d bytes wait for NATS",
                self._outbox_bytes,
            )
            return
        self._outbox_bytes += size
        self._outbox.append((subject, action.frame))
        if self._flusher is None:
            # Everything published in this turn goes out in one write, in order.
            self._flusher = asyncio.get_running_loop().create_task(self._flush_outbox(nc))

    async def _flush_outbox(self, nc: "NatsClient") -> None:
        nats_errors = _nats_errors()
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for index, (subject, frame) in enumerate(batch):
                    try:
                        await nc.publish(subject, frame)
                    except nats_errors.Error as exc:
                        self._publish_dropped += len(batch) - index
                        self._outbox_bytes -= sum(len(item[1]) for item in batch[index:])
                        self._throttled_warning("publish", "cluster: frames not published: %s", exc)
                        break
                    self._outbox_bytes -= len(frame)
                    self._published += 1
        finally:
            self._flusher = None
            # A batch cut short (cancelled at close) no longer counts; what waits still does.
            self._outbox_bytes = sum(len(frame) for _, frame in self._outbox)

    async def _on_unicast(self, message: "Msg") -> None:
        self._received += 1
        self._perform(self._relay.deliver_from_cluster(message.data, time.time(), broadcast=False))

    async def _on_broadcast(self, message: "Msg") -> None:
        self._received += 1
        self._perform(self._relay.deliver_from_cluster(message.data, time.time(), broadcast=True))

    def _throttled_warning(self, what: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(what, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[what] = now
            logger.warning(message, *args)


# -- helpers -------------------------------------------------------------------


def _join_error_text(exc: Exception) -> str:
    """Why a join failed, with the likely fix when JetStream does not answer."""
    name = type(exc).__name__
    if name in {"ServiceUnavailableError", "NoRespondersError"}:
        return "JetStream is not available on this NATS server (run nats-server with -js)"
    return f"{name}: {exc}" if str(exc) else repr(exc)


def _perform_nothing(actions: list[Action]) -> None:
    if actions:
        logger.debug("cluster: %d action(s) before the link was bound", len(actions))


def _nats_errors() -> Any:
    """nats-py's JetStream errors (a subclass of nats.errors.Error each), imported late."""
    import nats.js.errors

    return nats.js.errors


async def _get_entry(bucket: "KeyValue", key: str) -> Any:
    """The key's entry, or None when it is absent or deleted."""
    try:
        return await bucket.get(key)
    except _nats_errors().KeyNotFoundError:  # KeyDeletedError is one too
        return None


async def _get(bucket: "KeyValue", key: str) -> bytes | None:
    entry = await _get_entry(bucket, key)
    return None if entry is None or entry.value is None else bytes(entry.value)


def _owner(data: bytes | None) -> OwnerRecord | None:
    if not data:
        return None
    try:
        return OwnerRecord.decode(bytes(data))
    except ValueError:
        return None


def _address(key: str) -> IPv4Address | None:
    try:
        return IPv4Address(key)
    except AddressValueError:
        return None


def _deleted(entry: Any) -> bool:
    return entry.operation in {"DEL", "PURGE"} or not entry.value


async def _follow(watcher: Any, handle: Callable[[Any], None]) -> None:
    """Hand every update of a KV watch to ``handle``; None marks the end of the backlog."""
    async for entry in watcher:
        if entry is None:
            continue
        try:
            handle(entry)
        except Exception:
            logger.exception("cluster: cannot handle the update of %r", entry.key)


def _describe_difference(key: str, theirs: ConfigRecord, ours: ConfigRecord) -> str:
    prefix = "cluster configuration differs: "
    if key == "password":
        return prefix + "password is not the one the cluster's servers have"
    if key == "dhcp":
        return (
            prefix + f"dhcp is {theirs.dhcp or '(off)'} on the cluster, {ours.dhcp or '(off)'} here"
        )
    return (
        prefix
        + f"sdwan is {';'.join(theirs.sdwan) or '(none)'!r} on the cluster, "
        + f"{';'.join(ours.sdwan) or '(none)'!r} here"
    )
