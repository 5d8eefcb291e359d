"""Member names over real WebSockets: a ping's payload names a member, HELLO gets NAMES."""

import asyncio
import time
from ipaddress import IPv4Address

from p2pvpn.server.relay import Relay
from p2pvpn.server.ws import RelayServer
from p2pvpn.wire.ws import Hello, NameEntry, Names, decode_ws_message
from tests.server import PASSWORD, VMAC_A, VMAC_B, ip, wait_until
from tests.server.test_ws import Client, connect_client


class NamesView:
    """What a p2pvpn client knows of the table from the NAMES it has read."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.table: dict[IPv4Address, NameEntry] = {}
        self.replaced = False

    async def until(self, *expected: NameEntry) -> None:
        """Read NAMES until the table is ``expected``: changes come coalesced, not one per event."""
        wanted = {entry.address: entry for entry in expected}
        while self.table != wanted or not self.replaced:
            message = decode_ws_message(await self.client.recv_frame())
            assert isinstance(message, Names), message
            if message.replace:
                self.table, self.replaced = {}, True
            for entry in message.entries:
                if entry.name:
                    self.table[entry.address] = entry
                else:
                    self.table.pop(entry.address, None)


def test_a_candy_ping_names_a_member_and_a_hello_client_is_told() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            candy = await connect_client(server, "10.77.0.1", VMAC_A)
            # What a Candy client sends as its keepalive ping.
            pong = await candy.connection.ping(b"candy::linux::6.1.8::vm")
            await asyncio.wait_for(pong, 5.0)
            # The server's timer flushes the change with no further event.
            await wait_until(lambda: relay.stats()["named_sessions"] == 1)

            member = await connect_client(server, "10.77.0.2", VMAC_B)
            await member.connection.ping(b"candy::linux::0.9.0::laptop")
            await member.connection.send(Hello().encode())
            view = NamesView(member)
            vm = NameEntry(ip("10.77.0.1"), "vm", p2pvpn=False)
            laptop = NameEntry(ip("10.77.0.2"), "laptop", p2pvpn=True)
            await view.until(vm, laptop)

            # A name change of the Candy member reaches the p2pvpn one.
            await candy.connection.ping(b"candy::linux::6.1.8::vm-renamed")
            await view.until(NameEntry(ip("10.77.0.1"), "vm-renamed"), laptop)
            rows = relay.session_rows(time.time())
            assert [(row["name"], row["p2pvpn"]) for row in rows] == [
                ("vm-renamed", False),
                ("laptop", True),
            ]

            # The Candy member leaves: a removal entry.
            await candy.connection.close()
            await view.until(laptop)
            await member.connection.close()

    asyncio.run(scenario())


def test_many_renames_in_a_row_end_in_the_last_name() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            member = await connect_client(server, "10.77.0.2", VMAC_B)
            await member.connection.ping(b"candy::linux::0.9.0::laptop")
            await member.connection.send(Hello().encode())
            view = NamesView(member)
            await view.until(NameEntry(ip("10.77.0.2"), "laptop", p2pvpn=True))
            candy = await connect_client(server, "10.77.0.1", VMAC_A)
            # Within the burst of the name_change_rate cap: every one is a change.
            for index in range(5):
                await candy.connection.ping(f"candy::linux::6.1.8::vm{index}".encode())
            await view.until(
                NameEntry(ip("10.77.0.1"), "vm4"), NameEntry(ip("10.77.0.2"), "laptop", p2pvpn=True)
            )
            await candy.connection.close()
            await member.connection.close()

    asyncio.run(scenario())
