"""Waiting for conditions by polling, with a deadline (never a fixed sleep as synchronisation)."""

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Tick", "WaitTimeoutError", "wait_for", "wait_until"]

T = TypeVar("T")
Tick = Callable[[], None]
"""Called on every round of a wait, e.g. to check that the processes waited on are alive."""


class WaitTimeoutError(AssertionError):
    """`wait_until` gave up; an AssertionError so that a test fails, not errors."""


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


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 15.0,
    interval: float = 0.1,
    message: str = "condition not met",
    *,
    logs: Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """`wait_for` that returns the truthy result or raises `WaitTimeoutError` with ``message``
    (plus ``logs()`` when given). Exceptions of the types in ``ignore`` count as "not yet"."""
    __tracebackhide__ = True  # a failing test points at its own line, not here
    last_error: BaseException | None = None

    def attempt() -> T | None:
        nonlocal last_error
        try:
            return predicate()
        except ignore as exc:
            last_error = exc
            return None

    result = wait_for(attempt, timeout, interval=interval)
    if result:
        return result
    text = f"timed out after {timeout:g} s: {message}"
    if last_error is not None:
        text += f"\nlast error: {last_error!r}"
    if logs is not None:
        text += f"\n{logs()}"
    raise WaitTimeoutError(text) from last_error
