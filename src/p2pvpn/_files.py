"""Replacing a file atomically: a reader sees the old file or the new one, never half of one."""

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(
    path: Path, text: str, *, mode: int | None = None, encoding: str = "utf-8"
) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    The data reaches the disk before the rename, so a crash leaves the old file
    or the new one. The file is created 0600 unless ``mode`` says otherwise.
    Raises OSError (the directory must exist); the temporary file never stays behind.
    """
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding=encoding) as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
