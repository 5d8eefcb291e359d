"""The built-in STUN responder over real UDP on the loopback interface."""

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import Any

from p2pvpn.server.stun import StunResponder, start_stun_responder
from p2pvpn.wire.stun import decode_binding_response, encode_binding_request

TIMEOUT = 5.0


async def _exchange(client: socket.socket, server: tuple[str, int], data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(client, data, server)
    return await asyncio.wait_for(loop.sock_recv(client, 2048), TIMEOUT)


Scenario = Callable[[socket.socket, tuple[str, int], StunResponder], Awaitable[None]]


async def _with_responder(scenario: Scenario) -> None:
    transport, responder = await start_stun_responder("127.0.0.1", 0)
    server = transport.get_extra_info("sockname")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    client.bind(("127.0.0.1", 0))
    try:
        await scenario(client, server, responder)
    finally:
        client.close()
        transport.close()


def test_binding_request_is_answered_with_the_source_address() -> None:
    async def scenario(
        client: socket.socket, server: tuple[str, int], responder: StunResponder
    ) -> None:
        transaction_id = os.urandom(12)
        reply = await _exchange(client, server, encode_binding_request(transaction_id))
        response = decode_binding_response(reply)
        host, port = client.getsockname()
        assert response.transaction_id == transaction_id
        assert response.address == (IPv4Address(host), port)
        assert responder.stats() == {"requests": 1, "responses": 1, "ignored": 0, "rate_limited": 0}

    asyncio.run(_with_responder(scenario))


def test_the_candy_client_request_is_answered(candy_vectors: dict[str, Any]) -> None:
    request = bytes.fromhex(candy_vectors["stun_binding_request"])

    async def scenario(
        client: socket.socket, server: tuple[str, int], responder: StunResponder
    ) -> None:
        response = decode_binding_response(await _exchange(client, server, request))
        assert response.transaction_id == request[8:20]
        assert response.address[1] == client.getsockname()[1]

    asyncio.run(_with_responder(scenario))


def test_garbage_is_ignored_and_the_responder_keeps_answering() -> None:
    async def scenario(
        client: socket.socket, server: tuple[str, int], responder: StunResponder
    ) -> None:
        loop = asyncio.get_running_loop()
        request = encode_binding_request(os.urandom(12))
        not_a_request = b"\x01\x01" + request[2:]  # a binding *response* is not answered
        garbage = [b"", b"\x00", os.urandom(100), request[:19], not_a_request]
        for datagram in garbage:
            await loop.sock_sendto(client, datagram, server)
        # Datagrams are handled in order, so the answer to this request proves
        # that everything before it was read and ignored.
        transaction_id = os.urandom(12)
        reply = await _exchange(client, server, encode_binding_request(transaction_id))
        assert decode_binding_response(reply).transaction_id == transaction_id
        assert responder.stats() == {
            "requests": 1,
            "responses": 1,
            "ignored": len(garbage),
            "rate_limited": 0,
        }

    asyncio.run(_with_responder(scenario))


def test_a_flooding_address_is_rate_limited_and_others_are_still_answered() -> None:
    async def scenario() -> None:
        transport, responder = await start_stun_responder("127.0.0.1", 0, rate=5)
        server = transport.get_extra_info("sockname")
        flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            flooder.bind(("127.0.0.2", 0))
            good.setblocking(False)
            good.bind(("127.0.0.3", 0))
            for _ in range(200):
                flooder.sendto(encode_binding_request(os.urandom(12)), server)
            # Every request has been handled once the good client's answer is back.
            transaction_id = os.urandom(12)
            reply = await _exchange(good, server, encode_binding_request(transaction_id))
            assert decode_binding_response(reply).transaction_id == transaction_id
            stats = responder.stats()
            assert stats["requests"] == 201
            # A burst of twice the rate, plus what refilled while the flood ran.
            assert 10 <= stats["responses"] - 1 < 100
            assert stats["rate_limited"] == 201 - stats["responses"]
        finally:
            flooder.close()
            good.close()
            transport.close()

    asyncio.run(scenario())
