"""client/naming.py with a fake signaling: what goes out, and when (the Candy-server path too)."""

import asyncio
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from p2pvpn.client.names import ANNOUNCE_INTERVAL
from p2pvpn.client.naming import REPLY_INTERVAL, NameService, effective_hostname, ping_payload
from p2pvpn.config import ClientConfig
from p2pvpn.wire.ws import BROADCAST, NameAnnouncement, NameEntry, Names, WsMessage

ADDRESS = IPv4Interface("10.0.0.1/24")
PEER = IPv4Address("10.0.0.5")


class FakeSignaling:
    def __init__(self) -> None:
        self.sent: list[WsMessage] = []
        self.payloads: list[bytes | None] = []
        self.flushed = 0

    def send(self, message: WsMessage) -> bool:
        self.sent.append(message)
        return True

    def set_ping_payload(self, payload: bytes | None) -> None:
        self.payloads.append(payload)

    async def flush(self, timeout: float) -> None:
        self.flushed += 1


def service(
    tmp_path: Path, hostname: str = "laptop", machine: str = "box", dns: bool = False
) -> tuple[NameService, FakeSignaling]:
    config = ClientConfig(websocket="ws://h", hostname=hostname, dns=dns, state_dir=tmp_path)
    signaling = FakeSignaling()
    names = NameService(config, signaling, machine_name=lambda: machine)
    names.resolved.run_dir = tmp_path / "absent"
    return names, signaling


def login(names: NameService) -> None:
    asyncio.run(names.on_login(ADDRESS, 0.0))


def test_the_effective_name() -> None:
    config = ClientConfig(websocket="ws://h")
    assert effective_hostname(config, lambda: "My_Box.local") == "my-box-local"
    assert effective_hostname(config, lambda: "!!!") == "host"
    named = ClientConfig(websocket="ws://h", hostname="pinned")
    assert effective_hostname(named, lambda: "other") == "pinned"
    assert ping_payload("pinned").startswith(b"candy::linux::")
    assert ping_payload("pinned").endswith(b"::pinned")


def test_login_announces_and_asks_for_replies(tmp_path: Path) -> None:
    names, signaling = service(tmp_path)
    assert names.table is None
    login(names)
    assert names.table is not None
    assert signaling.sent == [NameAnnouncement(ADDRESS.ip, BROADCAST, "laptop", False, True)]


def test_a_request_gets_one_unicast_reply_per_interval(tmp_path: Path) -> None:
    names, signaling = service(tmp_path)
    login(names)
    signaling.sent.clear()
    asking = NameAnnouncement(PEER, BROADCAST, "nas", reply_wanted=True)
    names.on_announcement(asking, 1.0)
    names.on_announcement(asking, 2.0)  # within REPLY_INTERVAL: no second reply
    assert signaling.sent == [NameAnnouncement(ADDRESS.ip, PEER, "laptop")]
    names.tick(1.0 + REPLY_INTERVAL)
    names.on_announcement(asking, 1.0 + REPLY_INTERVAL)
    assert len(signaling.sent) == 2
    assert names.table is not None and names.table.lookup("nas") == PEER


def test_announcements_from_outside_the_network_or_for_others_are_ignored(
    tmp_path: Path,
) -> None:
    names, signaling = service(tmp_path)
    login(names)
    signaling.sent.clear()
    names.on_announcement(
        NameAnnouncement(IPv4Address("192.0.2.9"), BROADCAST, "x", False, True), 1
    )
    names.on_announcement(NameAnnouncement(PEER, IPv4Address("10.0.0.9"), "y", False, True), 1)
    assert signaling.sent == []
    assert names.table is not None and [r.name for r in names.table.records()] == ["laptop"]


def test_periodic_announcements_and_expiry(tmp_path: Path) -> None:
    names, signaling = service(tmp_path)
    login(names)
    names.on_announcement(NameAnnouncement(PEER, BROADCAST, "nas"), 0.0)
    signaling.sent.clear()
    names.tick(ANNOUNCE_INTERVAL - 1)
    assert signaling.sent == []
    names.tick(ANNOUNCE_INTERVAL)
    assert signaling.sent == [NameAnnouncement(ADDRESS.ip, BROADCAST, "laptop")]
    names.tick(1000.0)
    assert names.table is not None and names.table.lookup("nas") is None


def test_the_machine_name_is_followed_when_hostname_is_empty(tmp_path: Path) -> None:
    machine = ["box"]
    config = ClientConfig(websocket="ws://h", dns=False, state_dir=tmp_path)
    signaling = FakeSignaling()
    names = NameService(config, signaling, machine_name=lambda: machine[0])
    login(names)
    signaling.sent.clear()
    names.tick(1.0)
    assert signaling.sent == [] and signaling.payloads == []
    machine[0] = "Renamed"
    names.tick(2.0)
    assert signaling.payloads == [ping_payload("renamed")]
    assert signaling.sent == [NameAnnouncement(ADDRESS.ip, BROADCAST, "renamed")]
    assert names.snapshot()["hostname"] == "renamed"


def test_a_pinned_hostname_ignores_the_machine(tmp_path: Path) -> None:
    names, signaling = service(tmp_path, hostname="pinned")
    login(names)
    names.machine_name = lambda: "changed"
    names.tick(1.0)
    assert signaling.payloads == []


def test_leaving_is_announced_and_flushed(tmp_path: Path) -> None:
    names, signaling = service(tmp_path)
    asyncio.run(names.leave())  # before any login: nothing to say
    assert signaling.sent == []
    login(names)
    asyncio.run(names.leave())
    assert signaling.sent[-1] == NameAnnouncement(ADDRESS.ip, BROADCAST, "")
    assert signaling.flushed == 1


def test_the_server_table_and_a_relogin_keep_the_table(tmp_path: Path) -> None:
    names, _ = service(tmp_path)
    login(names)
    table = names.table
    names.on_names(Names(True, (NameEntry(PEER, "nas", True, False),)), 1.0)
    login(names)  # the same address again (a reconnect)
    assert names.table is table
    snapshot = names.snapshot()
    assert snapshot["names"][1] == {
        "address": "10.0.0.5",
        "name": "nas",
        "exit_node": True,
        "p2pvpn": False,
        "source": "server",
    }
    assert names.name_of("10.0.0.5") == "nas" and names.name_of("junk") is None
    asyncio.run(names.on_login(IPv4Interface("10.0.1.1/24"), 2.0))  # moved: a new table
    assert names.table is not table


def test_dns_listens_after_login_and_moves_and_closes(tmp_path: Path) -> None:
    async def test() -> None:
        names, _ = service(tmp_path, dns=True)
        names.dns_port = 0
        names.dns_host = lambda address: "127.0.0.1" if address == ADDRESS.ip else "127.0.0.2"
        await names.on_login(ADDRESS, 0.0)
        assert names.dns is not None and names.dns.endpoint is not None
        assert names.dns.endpoint[0] == "127.0.0.1"
        assert names.snapshot()["dns"]["resolved"] == "not running"
        await names.on_login(IPv4Interface("10.0.1.1/24"), 1.0)
        assert names.dns.endpoint is not None and names.dns.endpoint[0] == "127.0.0.2"
        await names.close()
        assert names.dns.endpoint is None
        assert names.snapshot()["dns"]["listening"] is None

    asyncio.run(test())


def test_dns_that_cannot_listen_is_a_warning_not_an_end(tmp_path: Path) -> None:
    async def test() -> None:
        names, _ = service(tmp_path, dns=True)
        names.dns_host = lambda address: "192.0.2.77"  # not ours: EADDRNOTAVAIL
        names.dns_port = 0
        await names.on_login(ADDRESS, 0.0)
        assert names.snapshot()["dns"]["listening"] is None
        await names.close()

    asyncio.run(test())
