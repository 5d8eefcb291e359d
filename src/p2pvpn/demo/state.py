"""The demo's record of what it created, and removing a demo (ours, kept, or left over).

The record (`STATE_FILE`, JSON) is written before anything is created and
updated as namespaces appear, so that ``p2pvpn demo --cleanup`` (or the next
demo) can remove a demo that was kept with ``--keep`` or that died without
cleaning up. Namespaces whose name starts with ``p2pdemo-`` count as the
demo's even without a record.
"""

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from p2pvpn._files import write_atomically
from p2pvpn.demo.topology import NAMESPACE_PREFIX
from p2pvpn.netns import NETNS_DIR, CommandError, delete_namespace, list_namespaces

__all__ = [
    "LOCK_FILE",
    "STATE_FILE",
    "WORKDIR_PREFIX",
    "DemoLock",
    "DemoRecord",
    "Leftovers",
    "StateFile",
    "find_leftovers",
    "remove_leftovers",
    "remove_namespaces",
    "running_demo",
]

STATE_FILE = Path("/run/p2pvpn-demo.json")
LOCK_FILE = Path("/run/p2pvpn-demo.lock")
WORKDIR_PREFIX = "p2pdemo-"


@dataclass
class DemoRecord:
    pid: int
    started: float = field(default_factory=time.time)
    workdir: str | None = None
    namespaces: list[str] = field(default_factory=list)
    kept: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DemoRecord":
        """Raises ValueError on anything that is not a record this module wrote."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        pid, workdir, namespaces = data.get("pid"), data.get("workdir"), data.get("namespaces")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise ValueError("pid is missing")
        if workdir is not None and not isinstance(workdir, str):
            raise ValueError("workdir is not a string")
        if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
            raise ValueError("namespaces is not a list of names")
        started = data.get("started")
        return cls(
            pid=pid,
            started=float(started) if isinstance(started, int | float) else 0.0,
            workdir=workdir,
            namespaces=[name for name in namespaces if name.startswith(NAMESPACE_PREFIX)],
            kept=bool(data.get("kept", False)),
        )


class StateFile:
    def __init__(self, path: Path = STATE_FILE) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> DemoRecord | None:
        """The record, or None when there is none or it cannot be read."""
        try:
            return DemoRecord.from_json(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def save(self, record: DemoRecord) -> None:
        """Atomically (a reader never sees half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, record.to_json())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class DemoLock:
    """Held (``flock``) by a running demo for its whole life, so that no other demo, and no
    ``--cleanup``, removes its namespaces. A demo kept with ``--keep`` has exited and
    holds nothing. The file stays; it holds the pid of the last holder."""

    def __init__(self, path: Path = LOCK_FILE) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another demo holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid written by the demo holding the lock (None if unknown or unreadable)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def running_demo(lock: DemoLock) -> int | None:
    """If another demo is running: its pid (0 when unknown). None when none is."""
    if lock.acquire():
        lock.release()
        return None
    return lock.holder() or 0


@dataclass(frozen=True)
class Leftovers:
    namespaces: list[str]
    workdir: Path | None
    record: bool  # a state file exists

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.workdir or self.record)

    def describe(self) -> str:
        parts = []
        if self.namespaces:
            count = len(self.namespaces)
            parts.append(f"{count} namespace{'s' if count != 1 else ''}")
        if self.workdir is not None:
            parts.append(str(self.workdir))
        return ", ".join(parts) or "its state file"


def _safe_workdir(workdir: str | None) -> Path | None:
    """Only a directory the demo made (``<tmp>/p2pdemo-*``) is ever removed."""
    if not workdir:
        return None
    path = Path(workdir)
    if not path.is_absolute() or not path.name.startswith(WORKDIR_PREFIX) or path.is_symlink():
        return None
    return path if path.is_dir() else None


def find_leftovers(state_file: StateFile) -> Leftovers:
    record = state_file.load()
    names = set(list_namespaces(NAMESPACE_PREFIX))
    if record is not None:
        names |= {name for name in record.namespaces if (NETNS_DIR / name).exists()}
    return Leftovers(
        namespaces=sorted(names),
        workdir=_safe_workdir(record.workdir if record is not None else None),
        record=state_file.exists(),
    )


def remove_leftovers(leftovers: Leftovers, state_file: StateFile) -> list[str]:
    """Remove everything in ``leftovers``; returns the problems (empty when all went)."""
    problems = remove_namespaces(leftovers.namespaces)
    if leftovers.workdir is not None:
        shutil.rmtree(leftovers.workdir, ignore_errors=True)
        if leftovers.workdir.exists():
            problems.append(f"could not remove {leftovers.workdir}")
    if not problems:
        state_file.remove()
    return problems


def remove_namespaces(names: Iterable[str]) -> list[str]:
    problems = []
    for name in names:
        try:
            delete_namespace(name)
        except CommandError as exc:
            problems.append(f"namespace {name}: {exc}")
    return problems
