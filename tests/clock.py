"""A clock that tests move by hand (`clock.now += 1.5`)."""


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
