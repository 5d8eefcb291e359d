"""The record of recently received IVs that lets a receiver refuse replays.

Candy's datagrams have no sequence numbers, but every one carries a random
96-bit IV, and all datagrams to us are sealed under our one key: an
authenticated datagram whose IV we have already seen is a copy. The record
keeps the IVs of the last few seconds in time buckets; a bucket that falls
out of the window is dropped whole, so memory follows the traffic rate.
The compiled data plane keeps the same record in C (_fastpath_replay.pxi).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from p2pvpn.dataplane.base import REPLAY_BUCKET_LIMIT, REPLAY_WINDOW_SECONDS

__all__ = ["REPLAY_BUCKETS", "ReplayWindow"]

# Buckets of half a window each: the current one and two before it, so an IV
# is remembered for at least one whole window.
REPLAY_BUCKETS = 3


class ReplayWindow:
    """`seen(iv)`: True for an IV seen within the window, else records it."""

    def __init__(
        self,
        seconds: float = REPLAY_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        bucket_limit: int = REPLAY_BUCKET_LIMIT,
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"replay window must be > 0 seconds, got {seconds}")
        self._bucket_seconds = seconds / 2
        self._clock = clock
        self._bucket_limit = bucket_limit
        # (bucket number, IVs), oldest first.
        self._buckets: list[tuple[int, set[bytes]]] = []

    def seen(self, iv: bytes) -> bool:
        number = int(self._clock() / self._bucket_seconds)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append((number, set()))
        while buckets[0][0] <= number - REPLAY_BUCKETS:
            del buckets[0]
        for _, ivs in buckets:
            if iv in ivs:
                return True
        current = buckets[-1][1]
        if len(current) < self._bucket_limit:
            current.add(iv)
        return False

    def __len__(self) -> int:
        return sum(len(ivs) for _, ivs in self._buckets)
