"""SignalingSession with several server URLs: it fails over in order, backs off per round.

In-process relays (p2pvpn.server.RelayServer) on loopback ports; a "dead"
URL is a loopback port nobody listens on. The back-off of these sessions is
far longer than the test's deadline wherever a test shows that a switch does
not wait for it, so a switch that waited would time the test out.
"""

import logging
import socket
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.client import signaling as signaling_module
from p2pvpn.client.signaling import SignalingSession
from p2pvpn.client.store import StateStore
from p2pvpn.server import Relay, RelayServer
from p2pvpn.wire.close_codes import CloseCode
from tests.client.test_signaling import (
    PASSWORD,
    FakeConnection,
    FakeServer,
    Recorder,
    make_session,
    run,
    run_until_fatal,
    running,
    wait_until,
)

POOL = IPv4Network("10.9.0.0/24")
SLOW_BACKOFF = {"reconnect_initial": 60.0, "reconnect_max": 60.0}


def dead_url() -> str:
    """A loopback URL that refuses connections: a port bound a moment ago and let go."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"ws://127.0.0.1:{port}/"


def relay_url(server: RelayServer) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def failover_session(
    urls: list[str], tmp_path: Path, handler: Recorder, **options: Any
) -> SignalingSession:
    options = {"reconnect_initial": 0.01, "reconnect_max": 0.05, **options}
    return SignalingSession(
        urls, PASSWORD, None, StateStore(tmp_path / "state"), handler, **options
    )


def test_a_dead_first_url_logs_in_on_the_second_at_once(tmp_path: Path) -> None:
    async def test() -> None:
        handler = Recorder()
        relay = Relay(PASSWORD, dhcp=POOL)
        async with RelayServer(relay, "127.0.0.1", 0) as server:
            urls = [dead_url(), relay_url(server)]
            session = failover_session(urls, tmp_path, handler, **SLOW_BACKOFF)
            assert (session.url, session.url_index, session.url_count) == (urls[0], 0, 2)
            async with running(session):
                await wait_until(lambda: bool(handler.logins), "a login on the second URL")
                assert session.url == urls[1]
                assert session.url_index == 1
                assert session.switches == 1
                assert session.failed_attempts == 0  # reset by the login
                await wait_until(
                    lambda: relay.stats()["sessions_authenticated"] == 1, "the relay's session"
                )

    run(test)


def test_losing_the_server_moves_on_at_once_and_keeps_the_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        first_relay, second_relay = Relay(PASSWORD, dhcp=POOL), Relay(PASSWORD, dhcp=POOL)
        first = RelayServer(first_relay, "127.0.0.1", 0)
        await first.start()
        async with RelayServer(second_relay, "127.0.0.1", 0) as second:
            urls = [relay_url(first), relay_url(second)]
            # Another client takes the first address on the first server, so ours is
            # not the one a fresh pool would hand out first anyway.
            other = make_session(urls[0], tmp_path / "other", Recorder(), static=None)
            handler = Recorder()
            session = failover_session(urls, tmp_path / "ours", handler, **SLOW_BACKOFF)
            async with running(other):
                await wait_until(lambda: other.address is not None, "the other client's login")
                async with running(session):
                    await wait_until(lambda: len(handler.logins) == 1, "the first login")
                    address = handler.logins[0]
                    assert address != other.address
                    await first.close()  # 1001 going away, like a server shutting down
                    await wait_until(lambda: len(handler.logins) == 2, "a login on the second")
                    assert handler.logins == [address, address]
                    assert handler.disconnects == 1
                    assert session.url == urls[1]
                    assert session.switches == 1
                    assert session.reconnects == 1
                    await wait_until(
                        lambda: second_relay.stats()["sessions_authenticated"] == 1,
                        "our session on the second server",
                    )

    with caplog.at_level(logging.INFO, logger="p2pvpn.client.signaling"):
        run(test)
    lost = [r.message for r in caplog.records if "lost, trying" in r.message]
    assert lost and lost[0].startswith("server ws://127.0.0.1:")
    assert not any("trying again in" in r.message for r in caplog.records)


def record_attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the session connects to, and "wait" for each back-off, in order."""
    events: list[str] = []
    real_connect = signaling_module.connect

    def recording_connect(url: str, **options: Any) -> Any:
        events.append(url)
        return real_connect(url, **options)

    monkeypatch.setattr(signaling_module, "connect", recording_connect)
    real_delay = SignalingSession._backoff_delay

    def recording_delay(self: SignalingSession, failures: int) -> float:
        events.append("wait")
        return real_delay(self, failures)

    monkeypatch.setattr(SignalingSession, "_backoff_delay", recording_delay)
    return events


def test_all_dead_waits_per_round_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every URL once, then one back-off wait; a server coming back is found."""
    events = record_attempts(monkeypatch)

    async def test() -> None:
        urls = [dead_url(), dead_url()]
        handler = Recorder()
        session = failover_session(
            urls, tmp_path, handler, reconnect_initial=0.05, reconnect_max=0.2
        )
        async with running(session):
            await wait_until(lambda: events.count("wait") >= 3, "three rounds", timeout=10)
            port = int(urls[1].rsplit(":", 1)[1].rstrip("/"))
            async with RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", port):
                await wait_until(lambda: bool(handler.logins), "a login once one is back")
                assert session.url == urls[1]
                until_login = list(events)
        rounds = "".join(
            "w" if event == "wait" else str(urls.index(event)) for event in until_login
        )
        # Each round tries both URLs in order, then waits; the last round ends in the login.
        assert rounds.startswith("01w01w01w")
        assert rounds.rstrip("w").replace("01w", "") in ("", "0", "01")

    run(test)


def test_losing_a_working_server_gives_every_other_one_a_turn_before_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempts before a working login do not count against the round after it."""
    monkeypatch.setattr(signaling_module, "WORKING_LOGIN", 0.0)
    events = record_attempts(monkeypatch)

    async def test() -> None:
        handler = Recorder()
        first_dead, last_dead = dead_url(), dead_url()
        server = RelayServer(Relay(PASSWORD, dhcp=POOL), "127.0.0.1", 0)
        await server.start()
        urls = [first_dead, relay_url(server), last_dead]
        session = failover_session(urls, tmp_path, handler, reconnect_initial=0.05)
        async with running(session):
            await wait_until(lambda: bool(handler.logins), "a login on the second URL")
            await server.close()
            await wait_until(lambda: "wait" in events, "a back-off wait")
        rounds = "".join("w" if event == "wait" else str(urls.index(event)) for event in events)
        assert rounds.startswith("01201w")

    run(test)


def test_servers_that_drop_every_login_at_once_still_get_a_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brief logins count as failed attempts: no switching in a tight loop between them."""
    waits: list[int] = []
    real_delay = SignalingSession._backoff_delay

    def recording_delay(self: SignalingSession, failures: int) -> float:
        waits.append(self.switches)
        return real_delay(self, failures)

    monkeypatch.setattr(SignalingSession, "_backoff_delay", recording_delay)

    async def drop_after_login(connection: FakeConnection) -> None:
        await connection.login()
        await connection.ws.close(1001, "going away")

    async def test() -> None:
        handler = Recorder()
        async with FakeServer(drop_after_login) as one, FakeServer(drop_after_login) as two:
            session = failover_session(
                [one.url, two.url], tmp_path, handler, reconnect_initial=0.02, reconnect_max=0.05
            )
            async with running(session):
                await wait_until(lambda: len(waits) >= 3, "three back-off waits")
            # One wait after each round of both servers.
            assert waits[:3] == [1, 3, 5]
            assert len(handler.logins) >= 6

    run(test)


def test_a_retryable_refusal_moves_on_at_once(tmp_path: Path) -> None:
    """TRY_AGAIN_LATER (say the pool is full there) is worth another server, not a wait."""

    async def refuse(connection: FakeConnection) -> None:
        await connection.receive()
        await connection.ws.close(CloseCode.TRY_AGAIN_LATER, "no free address")

    async def test() -> None:
        handler = Recorder()
        async with FakeServer(refuse) as full, FakeServer() as other:
            session = failover_session([full.url, other.url], tmp_path, handler, **SLOW_BACKOFF)
            async with running(session):
                await wait_until(lambda: bool(handler.logins), "a login on the second server")
                assert session.url == other.url
                assert len(full.connections) == 1

    run(test)


def test_a_wrong_password_still_stops_the_client(tmp_path: Path) -> None:
    """A refusal retrying cannot fix ends run() as with one URL: no other server is tried."""

    async def test() -> None:
        relay = Relay("another password", dhcp=POOL)
        async with RelayServer(relay, "127.0.0.1", 0) as server, FakeServer() as spare:
            session = failover_session([relay_url(server), spare.url], tmp_path, Recorder())
            error = await run_until_fatal(session)
            assert "wrong password" in str(error)
            assert spare.connections == []
            assert session.switches == 0

    run(test)


def test_one_url_keeps_the_single_server_behaviour(tmp_path: Path) -> None:
    """With one URL every end of a connection waits for the back-off, as before."""

    async def test() -> None:
        handler = Recorder()
        session = failover_session([dead_url()], tmp_path, handler, reconnect_initial=0.01)
        async with running(session):
            await wait_until(lambda: session.failed_attempts >= 2, "two attempts")
            assert session.switches == 0
            assert session.url_count == 1

    run(test)


def test_a_bad_url_in_the_list_is_named_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(signaling_module.SignalingError, match=r"\(URL 2 of 2\)"):
        failover_session(["ws://a/", "ws://user:secret@[bad/"], tmp_path, Recorder())
