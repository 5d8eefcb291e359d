"""client/resolved.py against a fake resolvectl on PATH and a temp dir for /run/systemd/resolve."""

import logging
import os
import stat
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from p2pvpn.client.resolved import ResolvedLink

ADDRESS = IPv4Address("10.0.0.7")


def fake_resolvectl(bin_dir: Path, log: Path, fail_on: str = "") -> None:
    """A resolvectl that records its arguments and fails for the sub-command ``fail_on``."""
    script = bin_dir / "resolvectl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f'if [ "$1" = "{fail_on}" ]; then echo "Failed to set: no such link" >&2; exit 1; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fake_resolvectl(bin_dir, log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "resolve"
    path.mkdir()
    return path


def test_the_link_gets_our_address_and_the_routing_domain(tmp_path: Path, calls: Path) -> None:
    link = ResolvedLink("p2pvpn-x", "vpn", run_dir(tmp_path))
    assert link.state == "off"
    assert link.register(ADDRESS) == "registered"
    assert calls.read_text().splitlines() == [
        "dns p2pvpn-x 10.0.0.7",
        "domain p2pvpn-x ~vpn",
        "default-route p2pvpn-x false",
    ]
    link.revert()
    assert calls.read_text().splitlines()[-1] == "revert p2pvpn-x"
    assert link.state == "off"
    link.revert()  # twice: nothing more
    assert len(calls.read_text().splitlines()) == 4


def test_a_move_registers_the_new_address(tmp_path: Path, calls: Path) -> None:
    link = ResolvedLink("p2pvpn-x", "corp.example", run_dir(tmp_path))
    link.register(ADDRESS)
    link.register(IPv4Address("10.0.0.9"))
    lines = calls.read_text().splitlines()
    assert lines[3:5] == ["dns p2pvpn-x 10.0.0.9", "domain p2pvpn-x ~corp.example"]


def test_without_resolved_the_user_is_told_what_to_add(
    tmp_path: Path, calls: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = ResolvedLink("p2pvpn-x", "vpn", tmp_path / "absent")
    with caplog.at_level(logging.INFO, logger="p2pvpn.client.resolved"):
        assert link.register(ADDRESS) == "not running"
    assert not calls.exists()
    (record,) = caplog.records
    assert "nameserver 10.0.0.7" in record.getMessage()
    assert "server=/vpn/10.0.0.7" in record.getMessage()
    link.revert()
    assert not calls.exists()


def test_without_resolvectl_resolved_is_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    link = ResolvedLink("p2pvpn-x", "vpn", run_dir(tmp_path))
    assert link.register(ADDRESS) == "not running"


def test_a_failing_resolvectl_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_resolvectl(bin_dir, tmp_path / "calls", fail_on="domain")
    monkeypatch.setenv("PATH", str(bin_dir))
    link = ResolvedLink("p2pvpn-x", "vpn", run_dir(tmp_path))
    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.resolved"):
        state = link.register(ADDRESS)
    assert state == "failed: resolvectl domain p2pvpn-x ~vpn: Failed to set: no such link"
    assert "cannot register p2pvpn-x" in caplog.text
    # The half-made registration (a DNS server without the domain) is undone at once.
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "revert p2pvpn-x"
    link.revert()
    assert (tmp_path / "calls").read_text().count("revert") == 1
