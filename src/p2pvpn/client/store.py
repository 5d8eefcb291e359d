"""What a client remembers between runs: its vmac and its last dynamic address.

Both exist so that a restarted client gets the same dynamic address back
(PROTOCOL 2.2, 2.3): the server keys its grants on the vmac, and the client
asks for the address it held last time. Losing either costs an address
change, never correctness, so every storage problem here is a warning.
"""

import logging
import os
import pwd
import re
import secrets
import stat
from ipaddress import IPv4Interface
from pathlib import Path

from p2pvpn._files import write_atomically

__all__ = ["StateDirectoryError", "StateStore", "prepare_state_directory"]

logger = logging.getLogger(__name__)

VMAC_FILE = "vmac"
ADDRESS_FILE = "address"
DIRECTORY_MODE = 0o700
_VMAC_PATTERN = re.compile(r"[0-9a-f]{16}")


class StateDirectoryError(OSError):
    """The state directory cannot be made private; the message names it and says what to do.

    An OSError, so that the node reports it like any other start-up failure.
    """


def prepare_state_directory(directory: Path) -> None:
    """Create ``directory`` mode 0700, or make sure an existing one is private to us.

    It holds the vmac, the last address and the control socket (which shows the
    network's topology). A directory owned by someone else (not us, not root) is
    refused, not fixed: its owner could change its mode or contents again at any
    time, so no chmod of ours would make it private. One we own with group/other
    bits (an older p2pvpn, a hand-made ``mkdir``) is chmod'ed 0700 with a warning.
    """
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirectoryError(f"state directory {directory} is not a directory")
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise StateDirectoryError(
            f"state directory {directory} is owned by {_user(info.st_uid)}, not by "
            f"{_user(me)} or root: refusing to keep state there (use another --state-dir, "
            f"or `chown {_login(me)} {directory}`)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    if info.st_uid != me:
        raise StateDirectoryError(
            f"state directory {directory} is mode {mode:04o} (open to group or others) and "
            f"owned by root: run `chmod 700 {directory}` or use another --state-dir"
        )
    os.chmod(directory, DIRECTORY_MODE)
    logger.warning("state directory %s was mode %04o: changed to 0700", directory, mode)


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    login = _login(uid)
    return f"uid {uid}" if login == str(uid) else f"{login} (uid {uid})"


class StateStore:
    """Small files in one private directory, created on first write."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._vmac: str | None = None

    def vmac(self) -> str:
        """This installation's vmac: loaded, or created and persisted on first use."""
        if self._vmac is None:
            self._vmac = self._load_vmac()
        return self._vmac

    def last_address(self) -> IPv4Interface | None:
        """The address saved by save_address(), or None if there is none (or it is corrupt)."""
        text = self._read(ADDRESS_FILE)
        if text is None:
            return None
        try:
            return IPv4Interface(text)
        except ValueError:
            logger.warning(
                "ignoring %s: %r is not an IPv4 address/prefix", self._path(ADDRESS_FILE), text
            )
            return None

    def save_address(self, address: IPv4Interface) -> None:
        self._write(ADDRESS_FILE, f"{address}\n")

    def _load_vmac(self) -> str:
        text = self._read(VMAC_FILE)
        if text is not None:
            if _VMAC_PATTERN.fullmatch(text):
                return text
            logger.warning(
                "%s is corrupt (%r is not 16 lowercase hex digits): creating a new vmac",
                self._path(VMAC_FILE),
                text[:40],
            )
        vmac = secrets.token_hex(8)
        self._write(VMAC_FILE, f"{vmac}\n")
        return vmac

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _read(self, name: str) -> str | None:
        path = self._path(name)
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("cannot read %s: %s", path, exc)
            return None

    def _write(self, name: str, text: str) -> None:
        """Replace the file atomically, so a crash never leaves half a file behind."""
        path = self._path(name)
        try:
            prepare_state_directory(self.directory)
            write_atomically(path, text, encoding="ascii")
        except OSError as exc:
            logger.warning("cannot save %s: %s", path, exc)
