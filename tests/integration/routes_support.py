"""A hostile signaling server for test_route_safety.py: run as ``python -m`` with a plan file.

The plan (JSON) has ``password``, ``port``, ``dir`` and ``steps``: connection
N follows step N (the last step repeats). A step answers EXPTTUN with
``grant``, sends the ``udp4conn`` entries and the ``routes`` (in messages of
at most 100 entries, as a Candy server does), then holds the connection until
the file ``advance-N`` appears in ``dir`` and closes it (1001, going away);
with ``close`` (``[code, reason]``) it closes the connection so at once instead.
"""

import asyncio
import json
import sys
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from p2pvpn.wire.ws import (
    Auth,
    ExptTun,
    SystemRoute,
    SystemRoutes,
    Udp4Conn,
    decode_ws_message,
)

ROUTES_PER_MESSAGE = 100


def route_messages(routes: list[list[str]]) -> list[bytes]:
    entries = []
    for destination, nexthop in routes:
        network = IPv4Network(destination)
        entries.append(SystemRoute(network.network_address, network.netmask, IPv4Address(nexthop)))
    return [
        SystemRoutes(tuple(entries[start : start + ROUTES_PER_MESSAGE])).encode()
        for start in range(0, len(entries), ROUTES_PER_MESSAGE)
    ]


class HostileServer:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.connections = 0

    async def handle(self, ws: ServerConnection) -> None:
        index = self.connections
        self.connections += 1
        step = self.plan["steps"][min(index, len(self.plan["steps"]) - 1)]
        print(f"connection {index}", flush=True)
        try:
            await self.login(ws, step)
            print(f"connection {index} logged in", flush=True)
            for src, dst, ip, port in step.get("udp4conn", []):
                message = Udp4Conn(IPv4Address(src), IPv4Address(dst), IPv4Address(ip), port)
                await ws.send(message.encode())
            for frame in route_messages(step.get("routes", [])):
                await ws.send(frame)
            print(f"connection {index} sent {len(step.get('routes', []))} routes", flush=True)
            if "close" in step:
                code, reason = step["close"]
                await ws.close(code, reason)
                return
            await self.hold(ws, Path(self.plan["dir"]) / f"advance-{index}")
            await ws.close(1001, "advanced by the test")
        except ConnectionClosed:
            print(f"connection {index} closed by the client", flush=True)

    async def login(self, ws: ServerConnection, step: dict[str, Any]) -> None:
        while True:
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            message = decode_ws_message(frame)
            if isinstance(message, ExptTun):
                grant = ExptTun.create(
                    self.plan["password"], IPv4Interface(step["grant"]), int(time.time())
                )
                await ws.send(grant.encode())
            elif isinstance(message, Auth):
                return

    async def hold(self, ws: ServerConnection, advance: Path) -> None:
        while not advance.exists():
            try:
                async with asyncio.timeout(0.05):
                    await ws.recv()
            except TimeoutError:
                pass


async def serve_plan(plan: dict[str, Any]) -> None:
    server = HostileServer(plan)
    async with serve(server.handle, "0.0.0.0", plan["port"], compression=None):
        print("listening", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(serve_plan(json.loads(Path(sys.argv[1]).read_text())))
