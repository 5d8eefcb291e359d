"""p2pvpn._files: the one atomic file write."""

import os
import stat
from pathlib import Path

import pytest

from p2pvpn._files import write_atomically


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("old")
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["record.json"]


def test_mode_is_0600_unless_given(tmp_path: Path) -> None:
    private, public = tmp_path / "private", tmp_path / "public"
    write_atomically(private, "x")
    write_atomically(public, "x", mode=0o644)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "vmac"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, "caf\u00e9", encoding="ascii")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["vmac"]


def test_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "absent" / "file", "x")
