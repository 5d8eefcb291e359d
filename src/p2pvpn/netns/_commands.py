"""Running one command to completion, with failures that say what went wrong."""

import subprocess
from collections.abc import Mapping, Sequence

__all__ = ["COMMAND_TIMEOUT", "CommandError", "run"]

COMMAND_TIMEOUT = 30.0
"""Default seconds one command may take."""


class CommandError(Exception):
    """A command failed or could not be run; ``str()`` is a one-line message for a user.

    ``returncode`` is None when the command did not run to the end (not found,
    timed out); ``stdout`` and ``stderr`` hold its whole output when it did.
    """

    def __init__(
        self,
        argv: Sequence[str],
        detail: str,
        *,
        returncode: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        self.argv = list(argv)
        self.detail = detail
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"`{' '.join(argv)}` failed: {detail}")


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; raises `CommandError` unless it succeeds (or not ``check``)."""
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, f"no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise CommandError(argv, exc.strerror or str(exc)) from exc
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        detail = output[-1] if output else "no error message"
        raise CommandError(
            argv,
            f"exit status {result.returncode}: {detail}",
            returncode=result.returncode,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result
