"""What `p2pvpn demo` needs from the machine, and how to tell the user when it is missing."""

import os
import shutil

from p2pvpn.netns import TUN_DEVICE

__all__ = ["TOOLS", "missing_requirements"]

TOOLS: tuple[tuple[str, str], ...] = (
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("ping", "iputils-ping"),
)
"""Commands the demo runs, with the Debian/Ubuntu package that has them."""


def missing_requirements(*, cleanup_only: bool = False) -> list[str]:
    """One message per missing requirement (empty when everything is there).

    ``cleanup_only``: what ``p2pvpn demo --cleanup`` needs (root and ``ip``).
    """
    problems: list[str] = []
    command = "p2pvpn demo --cleanup" if cleanup_only else "p2pvpn demo"
    if os.geteuid() != 0:
        problems.append(
            f"{command} needs root: it creates network namespaces (try: sudo {command})"
        )
    if not cleanup_only and not os.path.exists(TUN_DEVICE):
        problems.append(
            f"{command} needs {TUN_DEVICE} for the clients' TUN devices (try: sudo modprobe tun)"
        )
    tools = TOOLS[:1] if cleanup_only else TOOLS
    reported: set[str] = set()
    for tool, package in tools:
        if shutil.which(tool) is None and package not in reported:
            reported.add(package)
            problems.append(
                f"{command} needs the {tool} command (Debian/Ubuntu: apt-get install {package})"
            )
    return problems
