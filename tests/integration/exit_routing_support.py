"""Runs inside a test namespace for test_exit_routing.py: one scenario, JSON on stdout.

``scenario STATE_DIR ALLOW_LAN``: a TUN device, ExitRouting started, activated,
deactivated, activated again and closed, with the kernel's answers after each step.
``killed STATE_DIR``: started and activated, then SIGKILL (what a crash leaves).
``stale STATE_DIR``: `remove_stale` as the next start runs it.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from p2pvpn.client.exit_routing import (
    EXIT_MARK,
    EXIT_TABLE,
    SO_MARK,
    ExitRouting,
    remove_stale,
)
from p2pvpn.client.tun import TunDevice

TUN_NAME = "p2pvpn-exr"
TUN_ADDRESS = IPv4Interface("10.77.0.2/24")
EXIT_ADDRESS = IPv4Address("10.77.0.1")
INTERNET = "198.51.100.1"
LAN_HOST = "192.0.2.9"
VPN_HOST = "10.77.0.5"


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def table_routes() -> list[Any]:
    # `ip route show table N` fails outright while the table has no route at all.
    routes = ip_json("route", "show", "table", "all")
    return [route for route in routes if route.get("table") == str(EXIT_TABLE)]


def device_for(destination: str, *extra: str) -> str:
    """The device a packet to ``destination`` leaves by, and the source the kernel picks."""
    (route,) = ip_json("route", "get", destination, *extra)
    return f"{route['dev']} from {route.get('prefsrc')}"


def source_toward(destination: str, mark: int | None) -> str:
    """The source address a UDP socket (the LAN-address probe's way) gets toward it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        if mark is not None:
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        probe.connect((destination, 9))
        return str(probe.getsockname()[0])


def kernel_state() -> dict[str, Any]:
    return {
        "source": source_toward(INTERNET, None),
        "source_marked": source_toward(INTERNET, EXIT_MARK),
        "rules": [rule for rule in ip_json("rule") if rule.get("priority") in (5270, 5271)],
        "table": table_routes(),
        "internet": device_for(INTERNET),
        "internet_marked": device_for(INTERNET, "mark", hex(EXIT_MARK)),
        "lan": device_for(LAN_HOST),
        "vpn": device_for(VPN_HOST),
    }


async def scenario(state_dir: Path, allow_lan: bool) -> dict[str, Any]:
    entries: list[list[tuple[str, str]]] = []

    def record(routes: list[tuple[IPv4Network, IPv4Address]]) -> None:
        entries.append([(str(network), str(nexthop)) for network, nexthop in routes])

    steps: dict[str, Any] = {}
    with TunDevice.open(TUN_NAME, 1400) as tun:
        tun.configure(TUN_ADDRESS, 1400)
        routing = ExitRouting(TUN_NAME, state_dir, allow_lan, exit_routes=record)
        await routing.start()
        steps["started"] = kernel_state()
        steps["state_file"] = (state_dir / "exit-routing.json").exists()
        await routing.activate(EXIT_ADDRESS, "gw", TUN_ADDRESS)
        steps["active"] = kernel_state()
        await routing.deactivate("test")
        steps["inactive"] = kernel_state()
        await routing.activate(EXIT_ADDRESS, "gw", TUN_ADDRESS)
        await routing.close()
        steps["closed"] = kernel_state()
        steps["state_file_after_close"] = (state_dir / "exit-routing.json").exists()
    steps["entries"] = entries
    return steps


async def killed(state_dir: Path) -> None:
    tun = TunDevice.open(TUN_NAME, 1400)
    tun.configure(TUN_ADDRESS, 1400)
    routing = ExitRouting(TUN_NAME, state_dir, True)
    await routing.start()
    await routing.activate(EXIT_ADDRESS, "gw", TUN_ADDRESS)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode, state_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "scenario":
        print(json.dumps(asyncio.run(scenario(state_dir, sys.argv[3] == "1"))))
    elif mode == "killed":
        asyncio.run(killed(state_dir))
    elif mode == "stale":
        removed = remove_stale(state_dir)
        print(json.dumps({"removed": removed, "after": kernel_state_without_tun()}))
    else:
        raise SystemExit(f"unknown mode {mode}")


def kernel_state_without_tun() -> dict[str, Any]:
    return {
        "rules": [rule for rule in ip_json("rule") if rule.get("priority") in (5270, 5271)],
        "table": table_routes(),
        "internet": device_for(INTERNET),
    }


if __name__ == "__main__":
    main()
