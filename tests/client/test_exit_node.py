"""ExitNodeOffer with a fake nft/ip and a file standing in for net.ipv4.ip_forward;
its status line and metric. tests/integration/test_exit_node_offer.py runs the real thing."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from p2pvpn.client.exit_node import (
    NFT_MISSING,
    STATE_FILE,
    ExitNodeError,
    ExitNodeOffer,
    masquerade_ruleset,
    run_command,
    table_name,
)
from p2pvpn.client.status import format_status
from p2pvpn.metrics import ClientCollector

INTERFACE = "p2pvpn-lab"
TABLE = "p2pvpn_exit_p2pvpn_lab"
VPN = IPv4Network("10.0.0.0/24")


class FakeSystem:
    """nft and ip as far as the offer uses them; checks the note is written first."""

    def __init__(self, tmp_path: Path, *, forward: str = "0") -> None:
        self.state_dir = tmp_path / "state"
        self.forward = tmp_path / "ip_forward"
        self.forward.write_text(forward + "\n")
        self.tables: dict[str, str] = {}
        self.nft_missing = False
        self.nft_fails = False
        self.default_dev: str | None = "eth0"
        self.commands: list[list[str]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None) -> str:
        self.commands.append(list(argv))
        if argv[0] == "ip":
            routes = [{"dst": "default", "dev": self.default_dev}] if self.default_dev else []
            return json.dumps(routes)
        if self.nft_missing:
            raise ExitNodeError(NFT_MISSING)
        if self.nft_fails:
            raise ExitNodeError("nft -f - failed: Error: Could not process rule")
        if argv[1:] == ["--version"]:
            return "nftables v1.0.6\n"
        assert argv[1:] == ["-f", "-"] and stdin is not None
        self._load(stdin)
        return ""

    def _load(self, ruleset: str) -> None:
        for match in re.finditer(
            r"^(delete )?table ip (\w+) ?\{?(.*?)(?=^\S|\Z)", ruleset, re.M | re.S
        ):
            deleting, name, body = match.groups()
            if deleting:
                self.tables.pop(name)
            elif body.strip("}\n "):
                # Changing a table: the note recording it must be on disk already.
                note = json.loads((self.state_dir / STATE_FILE).read_text())
                assert note["table"] == name and self.forward_value() == "1"
                self.tables[name] = body
            else:
                self.tables.setdefault(name, "")

    def forward_value(self) -> str:
        return self.forward.read_text().strip()

    def offer(self) -> ExitNodeOffer:
        return ExitNodeOffer(INTERFACE, self.state_dir, runner=self, ip_forward=self.forward)

    def remove_stale(self) -> bool:
        return ExitNodeOffer.remove_stale(self.state_dir, runner=self, ip_forward=self.forward)


class FakePlane:
    def __init__(self) -> None:
        self.wraps: list[IPv4Network | None] = []

    def set_forwarded_wrap(self, network: IPv4Network | None) -> None:
        self.wraps.append(network)


@pytest.fixture
def system(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


def start(offer: ExitNodeOffer, plane: FakePlane, network: IPv4Network = VPN) -> None:
    asyncio.run(offer.start(network, plane))  # type: ignore[arg-type]


def test_the_table_masquerades_the_vpn_out_of_every_other_interface() -> None:
    assert table_name(INTERFACE) == TABLE
    ruleset = masquerade_ruleset(TABLE, VPN, INTERFACE)
    assert ruleset.startswith(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
    assert "type nat hook postrouting priority srcnat; policy accept;" in ruleset
    assert f'ip saddr 10.0.0.0/24 oifname != "{INTERFACE}" masquerade' in ruleset


def test_start_records_first_then_forwards_masquerades_and_wraps(system: FakeSystem) -> None:
    offer, plane = system.offer(), FakePlane()
    start(offer, plane)
    assert system.forward_value() == "1"
    assert TABLE in system.tables and "masquerade" in system.tables[TABLE]
    assert json.loads((system.state_dir / STATE_FILE).read_text()) == {
        "ip_forward": "0",
        "table": TABLE,
    }
    assert plane.wraps == [VPN]
    assert offer.snapshot() == {"offering": True, "masquerade": "10.0.0.0/24 out of eth0"}


def test_close_undoes_everything_and_is_idempotent(system: FakeSystem) -> None:
    offer = system.offer()
    start(offer, FakePlane())
    asyncio.run(offer.close())
    asyncio.run(offer.close())
    assert system.forward_value() == "0"
    assert system.tables == {}
    assert not (system.state_dir / STATE_FILE).exists()
    assert offer.snapshot() == {"offering": False, "masquerade": None}


def test_a_new_address_replaces_the_table_and_keeps_the_first_ip_forward(
    system: FakeSystem,
) -> None:
    offer, plane = system.offer(), FakePlane()
    start(offer, plane)
    start(offer, plane, IPv4Network("10.0.1.0/24"))
    assert "10.0.1.0/24" in system.tables[TABLE] and "10.0.0.0/24" not in system.tables[TABLE]
    assert plane.wraps == [VPN, IPv4Network("10.0.1.0/24")]
    asyncio.run(offer.close())
    assert system.forward_value() == "0"  # not the 1 we had set ourselves


def test_forwarding_that_was_on_stays_on(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, forward="1")
    offer = system.offer()
    start(offer, FakePlane())
    asyncio.run(offer.close())
    assert system.forward_value() == "1"


def test_without_nft_start_fails_clearly_and_leaves_nothing(system: FakeSystem) -> None:
    system.nft_missing = True
    offer, plane = system.offer(), FakePlane()
    with pytest.raises(ExitNodeError, match="apt install nftables"):
        offer.check_tools()
    with pytest.raises(ExitNodeError) as info:
        start(offer, plane)
    assert str(info.value) == NFT_MISSING
    assert system.forward_value() == "0"
    assert not (system.state_dir / STATE_FILE).exists()
    assert plane.wraps == [] and not offer.offering


def test_a_refused_ruleset_leaves_nothing(system: FakeSystem) -> None:
    system.nft_fails = True
    offer = system.offer()
    with pytest.raises(ExitNodeError, match="Could not process rule"):
        start(offer, FakePlane())
    assert system.forward_value() == "0"
    # The undo could not reach nft either: the note stays for the next start.
    assert (system.state_dir / STATE_FILE).exists()
    system.nft_fails = False
    assert system.remove_stale() is True
    assert not (system.state_dir / STATE_FILE).exists()


def test_check_tools_names_the_package_when_nft_is_not_installed(
    system: FakeSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(system.state_dir))
    offer = ExitNodeOffer(INTERFACE, system.state_dir)
    with pytest.raises(ExitNodeError) as info:
        offer.check_tools()
    assert str(info.value) == NFT_MISSING


def test_no_default_route_is_a_warning_only(
    system: FakeSystem, caplog: pytest.LogCaptureFixture
) -> None:
    system.default_dev = None
    offer = system.offer()
    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.exit_node"):
        start(offer, FakePlane())
    assert "no IPv4 default route" in caplog.text
    assert offer.snapshot() == {
        "offering": True,
        "masquerade": "10.0.0.0/24 out of (no default route)",
    }


def test_remove_stale_undoes_what_a_killed_run_left(system: FakeSystem) -> None:
    start(system.offer(), FakePlane())  # then "killed": nothing undone
    assert system.remove_stale() is True
    assert system.tables == {}
    assert system.forward_value() == "0"
    assert not (system.state_dir / STATE_FILE).exists()
    assert system.remove_stale() is False


def test_a_restart_before_remove_stale_keeps_the_first_runs_ip_forward(
    system: FakeSystem,
) -> None:
    start(system.offer(), FakePlane())  # killed with ip_forward at 1
    offer = system.offer()
    start(offer, FakePlane())
    asyncio.run(offer.close())
    assert system.forward_value() == "0"


def test_remove_stale_without_nft_still_restores_ip_forward(system: FakeSystem) -> None:
    start(system.offer(), FakePlane())
    system.nft_missing = True
    assert system.remove_stale() is True
    assert system.forward_value() == "0"
    assert not (system.state_dir / STATE_FILE).exists()


@pytest.mark.parametrize(
    "note",
    [
        "{not json",
        '["a list"]',
        '{"ip_forward": "7", "table": "p2pvpn_exit_x"}',
        '{"ip_forward": "0", "table": "filter"}',
    ],
)
def test_a_broken_note_is_dropped_with_a_warning(
    system: FakeSystem, note: str, caplog: pytest.LogCaptureFixture
) -> None:
    system.state_dir.mkdir()
    (system.state_dir / STATE_FILE).write_text(note)
    with caplog.at_level(logging.WARNING, logger="p2pvpn.client.exit_node"):
        assert system.remove_stale() is False
    assert "broken exit-node note" in caplog.text
    assert not (system.state_dir / STATE_FILE).exists()
    assert [argv[0] for argv in system.commands] == []  # touched nothing else


def test_run_command_names_the_failing_command() -> None:
    assert run_command(["echo", "hi"]) == "hi\n"
    with pytest.raises(ExitNodeError, match=r"^false failed: exit status 1$"):
        run_command(["false"])
    with pytest.raises(ExitNodeError, match="no-such-tool-here not found"):
        run_command(["no-such-tool-here"])


def test_status_shows_the_offer() -> None:
    offering = {"exit_node": {"offering": True, "masquerade": "10.0.0.0/24 out of eth0"}}
    assert "exit node: offering, masquerading 10.0.0.0/24 out of eth0" in format_status(
        offering, now=0
    )
    assert "exit node" not in format_status({"exit_node": {"offering": False}}, now=0)
    assert "exit node" not in format_status({}, now=0)


def test_the_offering_metric() -> None:
    def offering(snapshot: dict[str, object]) -> float:
        for family in ClientCollector(lambda: snapshot).collect():
            if family.name == "p2pvpn_exit_node_offering":
                return float(family.samples[0].value)
        raise AssertionError("no p2pvpn_exit_node_offering")

    assert offering({"exit_node": {"offering": True, "masquerade": "x"}}) == 1.0
    assert offering({"exit_node": {"offering": False, "masquerade": None}}) == 0.0
    assert offering({}) == 0.0
