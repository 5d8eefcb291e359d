"""StateStore: the persisted vmac and last dynamic address."""

import logging
import re
import stat
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from p2pvpn.client.store import StateStore


def test_vmac_is_created_persisted_and_reloaded(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = StateStore(directory)
    assert not directory.exists()  # nothing is created before it is needed

    vmac = store.vmac()

    assert re.fullmatch(r"[0-9a-f]{16}", vmac)
    assert store.vmac() == vmac
    assert (directory / "vmac").read_text().strip() == vmac
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert StateStore(directory).vmac() == vmac


def test_vmacs_are_random(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "a").vmac() != StateStore(tmp_path / "b").vmac()


@pytest.mark.parametrize("content", ["", "xyz", "0123456789ABCDEF", "0123456789abcdef0", "\xff"])
def test_corrupt_vmac_is_replaced_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    (tmp_path / "vmac").write_text(content, encoding="latin-1")

    with caplog.at_level(logging.WARNING):
        vmac = StateStore(tmp_path).vmac()

    assert re.fullmatch(r"[0-9a-f]{16}", vmac)
    assert (tmp_path / "vmac").read_text().strip() == vmac
    assert caplog.records and caplog.records[0].levelno == logging.WARNING


def test_vmac_with_surrounding_whitespace_is_kept(tmp_path: Path) -> None:
    (tmp_path / "vmac").write_text("  0123456789abcdef\n")
    assert StateStore(tmp_path).vmac() == "0123456789abcdef"


def test_vmac_still_works_when_the_directory_cannot_be_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with caplog.at_level(logging.WARNING):
        vmac = StateStore(blocker / "state").vmac()

    assert re.fullmatch(r"[0-9a-f]{16}", vmac)
    assert "cannot save" in caplog.text


def test_no_address_at_first(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state").last_address() is None


def test_address_round_trip_and_overwrite(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.save_address(IPv4Interface("192.168.202.7/24"))
    assert store.last_address() == IPv4Interface("192.168.202.7/24")

    store.save_address(IPv4Interface("10.0.0.2/16"))

    assert StateStore(tmp_path / "state").last_address() == IPv4Interface("10.0.0.2/16")
    # The atomic write leaves no temporary file behind.
    assert sorted(path.name for path in (tmp_path / "state").iterdir()) == ["address"]


@pytest.mark.parametrize("content", ["", "garbage", "300.1.1.1/24", "10.0.0.1/40", "::1/64"])
def test_corrupt_address_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    (tmp_path / "address").write_text(content)

    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path).last_address() is None

    assert caplog.records and caplog.records[0].levelno == logging.WARNING


def test_unreadable_address_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "address").mkdir()  # reading a directory fails with an OSError
    assert StateStore(tmp_path).last_address() is None
