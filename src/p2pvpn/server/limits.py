"""The server's resource caps: their defaults, token buckets and throttled log lines.

Sans-I/O like the relay core: every method takes ``now`` (seconds, any clock
that does not run backwards by much) instead of reading a clock, and every
table here has a fixed maximum size, so that a flood from many (possibly
spoofed) sources cannot grow the server's memory.
"""

from collections import Counter, OrderedDict
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LIMITS",
    "BucketTable",
    "LogThrottle",
    "ServerLimits",
    "TokenBucket",
]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every cap of the server; ``p2pvpn.config.ServerConfig`` has the same defaults.

    config.py sits below the server and cannot import this class, so
    tests/test_config.py checks that both agree.
    """

    # Bytes of frames queued for one client before new ones are dropped; a
    # client that stays full for SEND_QUEUE_STALL seconds is closed.
    send_queue_bytes: int = 4 * 1024 * 1024
    # Connections that have not logged in yet: in all, and from one source address.
    max_unauthenticated: int = 1024
    max_unauthenticated_per_ip: int = 32
    # Seconds for the WebSocket handshake, then from it to the AUTH; clients
    # send their login right after connecting, so this covers a few round trips.
    login_timeout: float = 5.0
    # Signed login hashes remembered against replays (3 per login at most).
    max_replay_entries: int = 65536
    # Broadcast FORWARD, DISCOVERY and GENERAL frames per second and client
    # (bursts of twice as many), and their largest size in bytes.
    broadcast_rate: int = 100
    max_broadcast_size: int = 2048
    # Dynamic addresses leased to the vmacs of one source address.
    max_leases_per_ip: int = 4
    # STUN answers per second to one source address (bursts of twice as many).
    stun_rate: int = 20
    # Frames per second of one client that the relay drops (bursts of twice as
    # many) before the server reads that client more slowly: junk then costs
    # the flooder its own bandwidth (TCP pushes back), not the others' latency.
    junk_rate: int = 200


DEFAULT_LIMITS = ServerLimits()


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of ``burst``."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the event is over the limit."""
        elapsed = now - self._stamp
        # A clock stepped backwards only restarts the refill from now.
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class BucketTable:
    """One :class:`TokenBucket` per key, at most ``size`` keys (least recently used go).

    An evicted key starts again with a full bucket. That is the price of bounded
    memory; ``overall`` (a bucket shared by every key) bounds what the evictions
    can give away in all.
    """

    def __init__(self, rate: float, burst: float, size: int, overall: TokenBucket) -> None:
        self._rate = rate
        self._burst = burst
        self._size = size
        self._overall = overall
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._size:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now) and self._overall.take(now)


class LogThrottle:
    """Lets one log line per key through per interval and counts the rest."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str, now: float) -> int | None:
        """The number of lines suppressed since the last one, or None to stay quiet."""
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self._interval:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
