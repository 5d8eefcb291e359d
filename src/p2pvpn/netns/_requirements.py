"""What a machine needs for namespace test beds: root, /dev/net/tun, ``ip``, namespaces."""

import functools
import os
import shutil

from p2pvpn.netns._commands import CommandError, run
from p2pvpn.netns._testbed import RUN_PREFIX

__all__ = ["TUN_DEVICE", "missing_requirements"]

TUN_DEVICE = "/dev/net/tun"


@functools.cache
def _netns_probe(name: str) -> str | None:
    try:
        run(["ip", "netns", "add", name])
    except CommandError as exc:
        return f"`ip netns add` failed: {exc.detail}"
    run(["ip", "netns", "delete", name], check=False)
    return None


def missing_requirements(probe_name: str = f"{RUN_PREFIX}probe") -> list[str]:
    """What this machine lacks for namespace test beds (empty when all is there).

    ``probe_name``: the namespace created (and deleted) once to prove it works.
    """
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (run the tests as root)")
    if not os.path.exists(TUN_DEVICE):
        missing.append(f"{TUN_DEVICE} (modprobe tun)")
    if shutil.which("ip") is None:
        missing.append("the ip command (apt-get install iproute2)")
    if not missing:
        problem = _netns_probe(probe_name)
        if problem:
            missing.append(f"network namespaces ({problem})")
    return missing
