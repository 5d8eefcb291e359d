"""Long-running processes inside namespaces: their environment, logs and stopping."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import p2pvpn
from p2pvpn.netns._commands import CommandError
from p2pvpn.netns._wait import wait_until

__all__ = [
    "TERMINATE_GRACE",
    "Process",
    "p2pvpn_argv",
    "process_env",
    "python_argv",
    "start_process",
    "terminate_all",
]

TERMINATE_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when processes are stopped."""
_REAP_TIMEOUT = 10.0


def process_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment with this very p2pvpn importable and Python output unbuffered.

    The source tree (or site-packages) this p2pvpn was imported from goes first
    on PYTHONPATH, so processes run the same code as their starter; then ``extra``.
    """
    env = dict(os.environ)
    root = str(Path(p2pvpn.__file__).resolve().parent.parent)
    paths = [root, *(env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path for path in paths if path))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, *args]``: the interpreter running us."""
    return [sys.executable, *args]


def p2pvpn_argv(*args: str) -> list[str]:
    """``python -m p2pvpn *args`` with the interpreter running us."""
    return python_argv("-m", "p2pvpn", *args)


class Process:
    """A long-running process in a namespace; its stdout and stderr go to ``log_path``.

    It leads a session of its own, so signals reach its children too, and a
    Ctrl-C on the terminal reaches only its starter, which stops it in order.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        argv: Sequence[str],
        popen: subprocess.Popen[bytes],
        log_path: Path,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.argv = list(argv)
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} in {self.namespace} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group) if it is still running."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signal the process and its children (it leads a session of its own)."""
        # poll() said it has not been reaped, so its pid is still its own group id.
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def terminate(self, grace: float = TERMINATE_GRACE) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        terminate_all([self], grace)
        return self.returncode

    # the log

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail_lines(self, lines: int = 15) -> list[str]:
        return self.log_text().splitlines()[-lines:]

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.tail_lines(lines))

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex); fail early if the process dies."""
        __tracebackhide__ = True
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def check() -> re.Match[str] | None:
            match = regex.search(self.log_text())
            if match is None and not self.alive():
                raise AssertionError(
                    f"process {self.name} exited with status {self.returncode} before "
                    f"its log matched {regex.pattern!r}; last lines:\n{self.tail(40)}"
                )
            return match

        return wait_until(
            check,
            timeout=timeout,
            message=f"log of {self.name} never matched {regex.pattern!r}",
            logs=lambda: self.tail(40),
        )

    def describe(self, lines: int = 80) -> str:
        status = "running" if self.alive() else f"exit status {self.returncode}"
        head = (
            f"==== {self.name} in {self.namespace} (pid {self.pid}, {status})\n"
            f"     $ {shlex.join(self.argv)}\n"
            f"     log: {self.log_path}"
        )
        return f"{head}\n{self.tail(lines)}"


def start_process(
    namespace: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> Process:
    """Start ``argv`` in ``namespace`` with `process_env` (plus ``env``); output to ``log_path``."""
    command = ["ip", "netns", "exec", namespace, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandError(command, exc.strerror or str(exc)) from exc
    return Process(name or Path(argv[0]).name, namespace, argv, popen, log_path)


def terminate_all(processes: Iterable[Process], grace: float = TERMINATE_GRACE) -> None:
    """SIGTERM every running process at once, SIGKILL what still runs after ``grace`` s."""
    running = [process for process in processes if process.alive()]
    for process in running:
        process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.signal_group(signal.SIGKILL)
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(_REAP_TIMEOUT)
