"""Member names over real WebSockets: a ping's payload names a member, HELLO gets NAMES."""

import asyncio
import time

from p2pvpn.server.relay import Relay
from p2pvpn.server.ws import RelayServer
from p2pvpn.wire.ws import Hello, NameEntry, Names, decode_ws_message
from tests.server import PASSWORD, VMAC_A, VMAC_B, ip, wait_until
from tests.server.test_ws import Client, connect_client


async def recv_names(client: Client) -> Names:
    message = decode_ws_message(await client.recv_frame())
    assert isinstance(message, Names), message
    return message


def test_a_candy_ping_names_a_member_and_a_hello_client_is_told() -> None:
    async def scenario() -> None:
        relay = Relay(PASSWORD)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            candy = await connect_client(server, "10.77.0.1", VMAC_A)
            # What a Candy client sends as its keepalive ping.
            pong = await candy.connection.ping(b"candy::linux::6.1.8::vm")
            await asyncio.wait_for(pong, 5.0)
            await wait_until(lambda: relay.stats()["named_sessions"] == 1)

            member = await connect_client(server, "10.77.0.2", VMAC_B)
            await member.connection.ping(b"candy::linux::0.9.0::laptop")
            await member.connection.send(Hello().encode())
            table = await recv_names(member)
            assert table.replace
            assert NameEntry(ip("10.77.0.1"), "vm", p2pvpn=False) in table.entries

            # A name change of the Candy member reaches the p2pvpn one.
            await candy.connection.ping(b"candy::linux::6.1.8::vm-renamed")
            change = await recv_names(member)
            assert change == Names(False, (NameEntry(ip("10.77.0.1"), "vm-renamed"),))
            rows = relay.session_rows(time.time())
            assert [(row["name"], row["p2pvpn"]) for row in rows] == [
                ("vm-renamed", False),
                ("laptop", True),
            ]

            # The Candy member leaves: a removal entry.
            await candy.connection.close()
            removal = await recv_names(member)
            assert removal == Names(False, (NameEntry(ip("10.77.0.1"), ""),))
            await member.connection.close()

    asyncio.run(scenario())
