"""wss:// on the server: the certificate checked at start, reloaded on SIGHUP, kinds of clients."""

import asyncio
import datetime
import hashlib
import logging
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import ClientConnection, connect

from p2pvpn.config import ServerConfig
from p2pvpn.netns import p2pvpn_argv, process_env
from p2pvpn.server.runtime import ServerRuntime, run_server
from p2pvpn.server.tls import (
    ServerTls,
    TlsError,
    load_server_context,
    make_self_signed_certificate,
    write_certificate,
)
from tests.server import PASSWORD, VMAC_A, VMAC_B, VMAC_C, auth_frame, forward, vmac_frame

PROCESS_DEADLINE = 30.0


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return write_certificate(make_self_signed_certificate(), tmp_path)


def trusting(cert_file: Path | None) -> ssl.SSLContext:
    """A verifying client context that trusts ``cert_file``; without it, one like Candy's."""
    if cert_file is not None:
        return ssl.create_default_context(cafile=cert_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(connection: ClientConnection) -> str:
    der = connection.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert_file: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_file.read_text())).hexdigest()


async def logged_in(port: int, context: ssl.SSLContext, tun_ip: str, vmac: str) -> ClientConnection:
    connection = await connect(f"wss://127.0.0.1:{port}/", ssl=context, compression=None)
    now = int(time.time())
    await connection.send(vmac_frame(vmac, now))
    await connection.send(auth_frame(tun_ip, now))
    return connection


async def relayed(sender: ClientConnection, receiver: ClientConnection, text: bytes) -> None:
    """``sender`` (10.77.0.1) relays a packet to ``receiver`` (10.77.0.2) through the server."""
    frame = forward("10.77.0.1", "10.77.0.2", text)
    await sender.send(frame)
    assert await asyncio.wait_for(receiver.recv(), 5) == frame


# -- loading: every bad file is named -----------------------------------------------


def _encrypted_key(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cert missing", "tls_cert {cert}: no such file"),
        ("cert unreadable", "tls_cert {cert}: cannot read: Is a directory"),
        ("cert not PEM", "tls_cert {cert}: not a PEM certificate"),
        ("key missing", "tls_key {key}: no such file"),
        ("key unreadable", "tls_key {key}: cannot read: Is a directory"),
        ("key not a key", "tls_key {key}: not a PEM private key"),
        ("key with a passphrase", "tls_key {key}: the key is protected by a passphrase"),
        ("key of another cert", "tls_key {key} does not match the certificate in tls_cert {cert}"),
    ],
)
def test_an_unusable_certificate_or_key_is_named(
    tmp_path: Path, certificate: tuple[Path, Path], case: str, message: str
) -> None:
    cert, key = certificate
    thing, problem = case.split(" ", 1)
    target = cert if thing == "cert" else key
    if problem == "missing":
        target.unlink()
    elif problem == "unreadable":
        target.unlink()
        target.mkdir()
    elif problem in {"not PEM", "not a key"}:
        target.write_bytes(cert.read_bytes() if thing == "key" else b"hello\n")
    elif problem == "with a passphrase":
        key.write_bytes(_encrypted_key(key.read_bytes()))
    else:
        write_certificate(make_self_signed_certificate(), tmp_path, "other")
        key.write_bytes((tmp_path / "other.key").read_bytes())
    with pytest.raises(TlsError) as raised:
        load_server_context(cert, key)
    assert str(raised.value).startswith(message.format(cert=cert, key=key))


def test_run_server_exits_1_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.key"
    config = ServerConfig(
        websocket="wss://127.0.0.1:0/",
        password=PASSWORD,
        stun_port=0,
        tls_cert=write_certificate(make_self_signed_certificate(), tmp_path)[0],
        tls_key=missing,
    )
    with caplog.at_level(logging.ERROR):
        assert run_server(config) == 1
    assert f"tls_key {missing}: no such file" in caplog.text
    assert PASSWORD not in caplog.text


def test_an_expired_certificate_is_served_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    pem = make_self_signed_certificate(not_before=long_ago, valid_for=datetime.timedelta(days=1))
    cert, key = write_certificate(pem, tmp_path)
    with caplog.at_level(logging.WARNING):
        ServerTls(cert, key)
    assert f"tls_cert {cert} expired on 2020-01-01" in caplog.text


def test_a_key_every_user_can_read_is_warned_about(
    certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = certificate
    with caplog.at_level(logging.WARNING):
        load_server_context(cert, key)  # written 0600
        assert caplog.text == ""
        key.chmod(0o644)
        load_server_context(cert, key)
    assert f"tls_key {key} is readable by every user (mode 0644)" in caplog.text


def test_the_self_signed_certificate_names_its_hosts() -> None:
    pem = make_self_signed_certificate(["vpn.example.org", "192.0.2.7"])
    names = (
        x509.load_pem_x509_certificate(pem.certificate)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert names.get_values_for_type(x509.DNSName) == ["vpn.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert b"ENCRYPTED" not in pem.key


# -- serving ------------------------------------------------------------------------


def wss_config(cert: Path, key: Path) -> ServerConfig:
    return ServerConfig(
        websocket="wss://127.0.0.1:0/", password=PASSWORD, stun_port=0, tls_cert=cert, tls_key=key
    )


@pytest.mark.parametrize("client", ["verifying", "candy"])
def test_clients_log_in_and_relay_over_wss(certificate: tuple[Path, Path], client: str) -> None:
    """A client that verifies (trusting the certificate) and one that does not, like Candy's."""
    cert, key = certificate
    context = trusting(cert if client == "verifying" else None)

    async def scenario() -> None:
        runtime = ServerRuntime(wss_config(cert, key))
        await runtime.start()
        try:
            a = await logged_in(runtime.ws_port, context, "10.77.0.1", VMAC_A)
            b = await logged_in(runtime.ws_port, context, "10.77.0.2", VMAC_B)
            await relayed(a, b, b"over tls")
            assert runtime.scheme == "wss"
            version = a.transport.get_extra_info("ssl_object").version()
            assert version in {"TLSv1.2", "TLSv1.3"}
            # The session rows of `p2pvpn server status` say TLS.
            rows = runtime.relay.session_rows(time.time())
            assert [row["tls"] for row in rows] == [True, True]
            await a.close()
            await b.close()
        finally:
            await runtime.close()

    asyncio.run(scenario())


def test_a_tls_1_2_only_client_is_served(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = trusting(cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2

    async def scenario() -> None:
        runtime = ServerRuntime(wss_config(cert, key))
        await runtime.start()
        try:
            connection = await logged_in(runtime.ws_port, context, "10.77.0.1", VMAC_A)
            assert connection.transport.get_extra_info("ssl_object").version() == "TLSv1.2"
            await connection.close()
        finally:
            await runtime.close()

    asyncio.run(scenario())


def test_a_plain_client_gets_no_websocket_from_a_wss_server(
    certificate: tuple[Path, Path],
) -> None:
    async def scenario() -> None:
        runtime = ServerRuntime(wss_config(*certificate))
        await runtime.start()
        try:
            with pytest.raises(Exception):  # noqa: B017 - whichever way the handshake fails
                await connect(f"ws://127.0.0.1:{runtime.ws_port}/", open_timeout=5)
            assert runtime.stats()["sessions_authenticated"] == 0
        finally:
            await runtime.close()

    asyncio.run(scenario())


# -- reloading ------------------------------------------------------------------------


def test_reload_serves_new_connections_the_new_certificate_and_keeps_sessions(
    tmp_path: Path, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = certificate
    first = file_fingerprint(cert)

    async def scenario() -> None:
        runtime = ServerRuntime(wss_config(cert, key))
        await runtime.start()
        try:
            a = await logged_in(runtime.ws_port, trusting(None), "10.77.0.1", VMAC_A)
            b = await logged_in(runtime.ws_port, trusting(None), "10.77.0.2", VMAC_B)
            await relayed(a, b, b"before")
            assert peer_fingerprint(a) == first

            write_certificate(make_self_signed_certificate(), tmp_path)
            runtime.reload_tls()
            second = file_fingerprint(cert)
            assert second != first
            c = await logged_in(runtime.ws_port, trusting(cert), "10.77.0.3", VMAC_C)
            assert peer_fingerprint(c) == second
            await relayed(a, b, b"after")  # the old sessions were not touched

            cert.write_text("not a certificate\n")
            runtime.reload_tls()
            d = await logged_in(runtime.ws_port, trusting(None), "10.77.0.4", "0a0b0c0d0e0f0001")
            assert peer_fingerprint(d) == second
            await relayed(a, b, b"still")
            assert runtime.tls is not None
            assert (runtime.tls.reloads, runtime.tls.failed_reloads) == (1, 1)
            for connection in (a, b, c, d):
                await connection.close()
        finally:
            await runtime.close()

    with caplog.at_level(logging.INFO, logger="p2pvpn.server"):
        asyncio.run(scenario())
    assert f"TLS certificate reloaded from {cert}: subject CN=p2pvpn server" in caplog.text
    assert (
        f"TLS certificate not reloaded, still serving the old one: "
        f"tls_cert {cert}: not a PEM certificate"
    ) in caplog.text


class ServerProcess:
    """A real `p2pvpn server` whose stderr is collected line by line."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            p2pvpn_argv("server", *args),
            env=process_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    async def wait_for_line(self, text: str) -> str:
        deadline = time.monotonic() + PROCESS_DEADLINE
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            assert self.process.poll() is None, "\n".join(self.lines)
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(PROCESS_DEADLINE)
        self._reader.join(PROCESS_DEADLINE)
        return code


@pytest.fixture
def server_process() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sighup_reloads_the_certificate_of_the_real_server(
    tmp_path: Path, certificate: tuple[Path, Path], server_process: list[ServerProcess]
) -> None:
    """The `p2pvpn server` process: an old session keeps relaying, new ones see the new cert."""
    cert, key = certificate
    first = file_fingerprint(cert)
    server = ServerProcess(
        *("-w", "wss://127.0.0.1:0/", "-p", PASSWORD, "--stun-port", "0"),
        *("--tls-cert", str(cert), "--tls-key", str(key)),
    )
    server_process.append(server)

    async def scenario() -> None:
        listening = await server.wait_for_line("listening on wss://127.0.0.1:")
        port = int(listening.rsplit(":", 1)[1])
        a = await logged_in(port, trusting(cert), "10.77.0.1", VMAC_A)
        b = await logged_in(port, trusting(cert), "10.77.0.2", VMAC_B)
        await relayed(a, b, b"before")
        new_cert, _ = write_certificate(make_self_signed_certificate(), tmp_path)
        server.process.send_signal(signal.SIGHUP)
        await server.wait_for_line("TLS certificate reloaded")
        c = await logged_in(port, trusting(new_cert), "10.77.0.3", VMAC_C)
        assert peer_fingerprint(c) == file_fingerprint(new_cert) != first
        assert peer_fingerprint(a) == first
        await relayed(a, b, b"after the reload")
        for connection in (a, b, c):
            await connection.close()

    asyncio.run(scenario())
    assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines), server.lines
