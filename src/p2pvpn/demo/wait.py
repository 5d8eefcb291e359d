"""Waiting for conditions by polling, with a deadline (never a fixed sleep as synchronisation)."""

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Tick", "wait_for"]

T = TypeVar("T")
Tick = Callable[[], None]
"""Called on every round of a wait: polls the clients' states, checks processes are alive."""


def _no_tick() -> None:
    return None


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    *,
    tick: Tick = _no_tick,
    interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Call ``condition`` until it returns something truthy and return that, or None after
    ``timeout`` seconds. ``tick`` runs before every try; exceptions it raises propagate."""
    deadline = clock() + timeout
    while True:
        tick()
        result = condition()
        if result:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        sleep(min(interval, remaining))
