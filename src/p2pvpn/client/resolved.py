"""Telling the system where the VPN's names are: systemd-resolved per-link DNS, or the user.

When systemd-resolved runs, the TUN device gets our DNS address and the
routing-only domain ``~<domain>``, so ``<name>.<domain>`` goes to us and nothing
else does; `revert` undoes it (resolved also forgets a link that disappears).
Without resolved, one INFO line says what to add to the resolver in use.
The calls block (they run ``resolvectl``): the node runs them off the loop.
"""

import logging
import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

__all__ = ["RESOLVECTL_TIMEOUT", "RESOLVED_RUN_DIR", "ResolvedLink"]

logger = logging.getLogger(__name__)

RESOLVED_RUN_DIR = Path("/run/systemd/resolve")
RESOLVECTL_TIMEOUT = 10.0


class ResolvedLink:
    """The registration of one interface's DNS with systemd-resolved.

    ``state`` is what status shows: ``"registered"``, ``"not running"``,
    ``"failed: ..."``, or ``"off"`` before the first `register`.
    """

    def __init__(self, interface: str, domain: str, run_dir: Path = RESOLVED_RUN_DIR) -> None:
        self.interface = interface
        self.domain = domain
        self.run_dir = run_dir
        self.state = "off"
        self._registered = False

    def running(self) -> bool:
        """systemd-resolved is there to talk to: its run directory and its command."""
        return self.run_dir.is_dir() and shutil.which("resolvectl") is not None

    def register(self, address: IPv4Address) -> str:
        """Point the domain at ``address`` (again after a move); returns the new ``state``."""
        if not self.running():
            self.state = "not running"
            logger.info(
                "systemd-resolved is not running: for names like NAME.%s to resolve, add "
                "'nameserver %s' as the first nameserver line of /etc/resolv.conf (it refuses "
                "other names, and the resolver asks the next one) or, with dnsmasq, "
                "'server=/%s/%s'",
                self.domain,
                address,
                self.domain,
                address,
            )
            return self.state
        self._registered = True
        try:
            _resolvectl("dns", self.interface, str(address))
            _resolvectl("domain", self.interface, f"~{self.domain}")
        except _ResolvectlError as error:
            # A DNS server without the domain would make the link take every query.
            self.revert()
            self.state = f"failed: {error}"
            logger.warning("cannot register %s with systemd-resolved: %s", self.interface, error)
            return self.state
        try:
            # Only our domain must come here: the responder refuses every other name.
            _resolvectl("default-route", self.interface, "false")
        except _ResolvectlError as error:
            logger.debug("resolvectl default-route: %s", error)
        self.state = "registered"
        logger.info("systemd-resolved sends *.%s to %s on %s", self.domain, address, self.interface)
        return self.state

    def revert(self) -> None:
        """Undo `register`; a no-op when nothing was registered."""
        if not self._registered:
            return
        self._registered = False
        self.state = "off"
        try:
            _resolvectl("revert", self.interface)
        except _ResolvectlError as error:
            # The link is about to go, and resolved forgets it then anyway.
            logger.debug("resolvectl revert %s: %s", self.interface, error)


class _ResolvectlError(Exception):
    pass


def _resolvectl(*arguments: str) -> None:
    command = ["resolvectl", *arguments]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=RESOLVECTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _ResolvectlError(f"{' '.join(command)}: {error}") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise _ResolvectlError(f"{' '.join(command)}: {detail}")
