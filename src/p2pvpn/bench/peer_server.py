"""The bench server of a member: on its VPN address alone, moving when the address does.

Used by `p2pvpn bench serve` and by the client itself (``bench_server =
true``). Only the traffic module below it: the client imports this.
"""

from __future__ import annotations

from collections.abc import Callable

from p2pvpn.bench.traffic import BenchServer

__all__ = ["FollowingBenchServer"]


class FollowingBenchServer:
    """A `BenchServer` on one address at a time; `follow` moves it when the address changes.

    Blocking (binding, joining the server's threads): the client calls it
    through asyncio.to_thread.
    """

    def __init__(self, port: int, *, make: Callable[[str, int], BenchServer] | None = None) -> None:
        self.port = port
        self._make = make if make is not None else BenchServer
        self._server: BenchServer | None = None
        self._address: str | None = None

    @property
    def address(self) -> str | None:
        """The VPN address served on; None while serving nowhere."""
        return self._address

    @property
    def endpoint(self) -> str | None:
        """ "ADDRESS:PORT" while serving, else None (what status shows)."""
        if self._server is None:
            return None
        address, port = self._server.address
        return f"{address}:{port}"

    def follow(self, address: str | None) -> bool:
        """Serve on ``address`` (None: stop serving); True when it bound anew.

        Raises BenchError (naming address:port) when it cannot bind; it then
        serves nowhere, and the next call tries again.
        """
        if address == self._address and (self._server is not None or address is None):
            return False
        self.stop()
        if address is None:
            return False
        server = self._make(address, self.port)
        server.start()
        self._server, self._address = server, address
        return True

    def stop(self) -> None:
        server, self._server, self._address = self._server, None, None
        if server is not None:
            server.stop()
