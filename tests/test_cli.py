"""The command-line entry point (no privileges needed; the commands' back ends are faked)."""

import json
import logging
import os
import re
import subprocess
import sys
import types
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

import p2pvpn
from p2pvpn.cli import LOG_FORMAT, configure_logging, main
from p2pvpn.client.control import control_socket_path
from p2pvpn.config import DEFAULT_STATE_ROOT, ClientConfig, ServerConfig, StunServer
from tests.client.control_support import EXAMPLE, serving, short_tmp_dir

SRC = Path(__file__).resolve().parents[1] / "src"
PASSWORD = "correct horse battery staple"


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, attribute: str) -> list[Any]:
    """Install ``name.attribute`` recording its calls; returns the list of calls."""
    calls: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> int:
        calls.append((args, kwargs))
        return 0

    module = types.ModuleType(name)
    setattr(module, attribute, record)
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def run_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return fake_module(monkeypatch, "p2pvpn.client.node", "run_client")


@pytest.fixture
def server_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return fake_module(monkeypatch, "p2pvpn.server.runtime", "run_server")


@pytest.fixture
def status_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return fake_module(monkeypatch, "p2pvpn.client.status", "print_status")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)  # private, as a file holding a password must be (else a warning)
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"p2pvpn {p2pvpn.__version__}\n"


def test_python_dash_m() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-m", "p2pvpn", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == f"p2pvpn {p2pvpn.__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["run", "-w", "ws://h", "--dataplane", "turbo"]) == 2
    assert main(["run", "-w", "ws://h", "--offload", "on"]) == 2
    assert "argument --offload: invalid choice: 'on'" in capsys.readouterr().err


def test_check_config_masks_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "client.cfg",
        f'websocket = "wss://vpn.example.org"\npassword = "{PASSWORD}"\nname = lab\nroute = 7\n',
    )
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err
    lines = captured.out.splitlines()
    # The column is as wide as the longest key, which grows as keys are added.
    settings = {re.sub(r" +=", " =", line) for line in lines}
    assert "password = ********" in settings
    assert "websocket = wss://vpn.example.org" in settings
    assert "route = 7" in settings
    assert "state_dir = /var/lib/p2pvpn/lab" in settings
    assert "password_file = (none)" in settings
    assert "offload = auto (TUN offloads with the fast data plane)" in settings
    assert len({line.index(" = ") for line in lines}) == 1  # aligned


def test_check_config_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "server.toml", 'mode = "server"\nwebsocket = "ws://0.0.0.0:80"\n')
    assert main(["check-config", str(path)]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "mode = server" in lines
    assert "password = (empty)" in lines
    assert "log_format = text" in lines


def test_check_config_reads_the_servers_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pvpn.server.tls import make_self_signed_certificate, write_certificate

    cert, key = write_certificate(make_self_signed_certificate(), tmp_path)
    text = f"mode = server\nwebsocket = wss://0.0.0.0/\ntls_cert = {cert}\ntls_key = {key}\n"
    path = write(tmp_path, "server.cfg", text)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    # The column is as wide as the longest key, which grows as keys are added.
    settings = {re.sub(r" +=", " =", line) for line in out}
    assert f"tls_cert = {cert}" in settings
    assert f"tls_key = {key}" in settings
    assert out[-1].startswith("# certificate: subject CN=p2pvpn server, valid until ")
    write_certificate(make_self_signed_certificate(), tmp_path, "other")
    path.write_text(text.replace(str(key), str(tmp_path / "other.key")))
    assert main(["check-config", str(path)]) == 1
    error = capsys.readouterr().err
    assert f"tls_key {tmp_path / 'other.key'} does not match the certificate in" in error


def test_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "client.cfg", f"websocket = ws://h\npassword = {PASSWORD}\nroute=1001\n")
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"p2pvpn: error: {path}:3: route: 1001 is outside 0..1000\n"


def test_check_config_reports_every_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "client.cfg", "websocket = ws://h\nroute = 1001\nmtu = x\nport = -1\n")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"p2pvpn: error: {path}:2: route: 1001 is outside 0..1000",
        f"p2pvpn: error: {path}:3: mtu: expected an integer, got 'x'",
        f"p2pvpn: error: {path}:4: port: -1 is outside 0..65535",
    ]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.cfg"
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"p2pvpn: error: {path}: no such file\n"
    assert main(["run", "-c", str(path)]) == 2
    assert capsys.readouterr().err == f"p2pvpn: error: {path}: no such file\n"


def test_unknown_key_warning_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "client.cfg", "websocket = ws://h\nfrobnicate = 1\n")
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"WARNING p2pvpn.config: {path}:2: unknown key 'frobnicate' ignored" in err


def test_run_flags_override_the_file(
    tmp_path: Path, run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "client.cfg",
        "websocket = wss://file.example\npassword = from-file\nroute = 5\nmtu = 1300\n"
        "tun = 10.0.0.2/24\nname = one\n",
    )
    argv = ["run", "-c", str(path), "-r", "9", "-w", "wss://flag.example", "-p", PASSWORD]
    argv += ["-n", "two", "-s", "stun://s", "--port", "4000", "--discovery", "60"]
    argv += ["--localhost", "192.168.0.9", "--dataplane", "pure", "--no-tls-verify"]
    argv += ["--accept-routes", "172.30.0.0/16", "--offload", "off"]
    argv += ["--state-dir", str(tmp_path / "state"), "--metrics", "127.0.0.1:9100"]
    assert main(argv) == 0
    [(args, kwargs)] = run_calls
    [config] = args
    assert kwargs == {}
    assert config == ClientConfig(
        websocket="wss://flag.example",
        password=PASSWORD,
        name="two",
        tun=IPv4Interface("10.0.0.2/24"),  # from the file
        stun=StunServer("s"),
        discovery=60,
        route=9,
        port=4000,
        localhost=IPv4Address("192.168.0.9"),
        mtu=1300,  # from the file
        state_dir=tmp_path / "state",
        tls_verify=False,
        dataplane="pure",
        metrics=("127.0.0.1", 9100),
        accept_routes=(IPv4Network("172.30.0.0/16"),),
        offload="off",
    )
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err


def test_run_with_flags_only(run_calls: list[Any]) -> None:
    assert main(["run", "-w", "ws://h:8080/ws", "-t", "10.0.0.1/24", "--mtu", "1280", "-d"]) == 0
    [((config,), kwargs)] = run_calls
    assert config == ClientConfig(
        websocket="ws://h:8080/ws", tun=IPv4Interface("10.0.0.1/24"), mtu=1280, debug=True
    )
    assert config.state_dir == DEFAULT_STATE_ROOT / "default"
    assert kwargs == {}
    assert logging.getLogger().level == logging.DEBUG


def test_debug_from_the_file_enables_debug_logging(tmp_path: Path, run_calls: list[Any]) -> None:
    path = write(tmp_path, "c.cfg", "websocket = ws://h\ndebug = true\n")
    assert main(["run", "-c", str(path)]) == 0
    assert run_calls[0][0][0].debug
    assert logging.getLogger().level == logging.DEBUG


def test_run_missing_websocket(run_calls: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-t", "10.0.0.1/24"]) == 2
    assert capsys.readouterr().err.startswith("p2pvpn: error: command line: missing websocket")
    assert run_calls == []


def test_run_flag_errors_name_the_flag(
    run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "-w", "ws://h", "-r", "1001"]) == 2
    assert capsys.readouterr().err == "p2pvpn: error: --route: 1001 is outside 0..1000\n"
    assert main(["run", "-w", "ws://h", "--port", "x"]) == 2
    assert capsys.readouterr().err == "p2pvpn: error: --port: expected an integer, got 'x'\n"
    assert main(["run", "-w", "ftp://h"]) == 2
    err = capsys.readouterr().err
    assert err == "p2pvpn: error: --websocket: expected a ws:// or wss:// URL, got 'ftp://h'\n"
    assert run_calls == []


def test_run_refuses_a_server_config(
    tmp_path: Path, run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "s.cfg", "mode = server\nwebsocket = ws://h\n")
    assert main(["run", "-c", str(path)]) == 2
    assert f"{path}:1: mode: this is a server configuration" in capsys.readouterr().err
    assert run_calls == []


def test_server(tmp_path: Path, server_calls: list[Any]) -> None:
    path = write(
        tmp_path, "s.cfg", "mode = server\nwebsocket = ws://0.0.0.0:80\ndhcp = 10.0.0.0/8\n"
    )
    argv = ["server", "-c", str(path), "--dhcp", "10.9.0.0/16", "--stun-port", "0", "-d"]
    argv += ["--sdwan", "10.9.0.1/32,192.168.0.0/24,10.9.0.1", "-p", PASSWORD]
    assert main(argv) == 0
    [((config,), kwargs)] = server_calls
    assert isinstance(config, ServerConfig)
    assert config.dhcp == IPv4Network("10.9.0.0/16")
    assert config.stun_port == 0
    assert config.password == PASSWORD
    assert len(config.sdwan) == 1
    assert config.debug is True
    assert kwargs == {}


def test_server_flags_only(server_calls: list[Any]) -> None:
    assert main(["server", "-w", "ws://0.0.0.0:80"]) == 0
    assert server_calls[0][0] == (ServerConfig(websocket="ws://0.0.0.0:80"),)


def test_server_wss_needs_a_certificate(
    server_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "-w", "wss://h", "--tls-key", "k.pem"]) == 2
    assert "--websocket: a wss:// URL needs tls_cert (a PEM file)" in capsys.readouterr().err
    assert main(["server", "-w", "ws://h", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 2
    err = capsys.readouterr().err
    assert "--tls-cert: only used with a wss:// websocket URL" in err
    assert "--tls-key: only used with a wss:// websocket URL" in err
    assert server_calls == []


def test_run_tls_ca_flag(
    tmp_path: Path, run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pvpn.server.tls import make_self_signed_certificate, write_certificate

    cert, _ = write_certificate(make_self_signed_certificate(), tmp_path)
    assert main(["run", "-w", "wss://h/", "--tls-ca", str(cert)]) == 0
    [((config,), _)] = run_calls
    assert config.tls_ca == cert
    missing = tmp_path / "missing.pem"
    assert main(["run", "-w", "wss://h/", "--tls-ca", str(missing)]) == 2
    assert f"--tls-ca: {missing}: no such file" in capsys.readouterr().err


def test_server_tls_flags(server_calls: list[Any]) -> None:
    argv = ["server", "-w", "wss://0.0.0.0/", "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    assert main(argv) == 0
    (config,) = server_calls[0][0]
    assert (config.tls_cert, config.tls_key) == (Path("c.pem").absolute(), Path("k.pem").absolute())


def test_status(
    tmp_path: Path, status_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 0
    assert main(["status", "-n", "lab", "--json", "--state-dir", str(tmp_path)]) == 0
    assert status_calls == [
        ((None, False, DEFAULT_STATE_ROOT), {}),
        (("lab", True, tmp_path), {}),
    ]
    assert main(["status", "-n", "../etc"]) == 2
    assert "--name: '../etc' may only contain" in capsys.readouterr().err


def test_status_finds_a_client_by_the_state_dir_given_to_run(
    run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with short_tmp_dir() as tmp:
        state_dir = tmp / "lab-state"
        assert main(["run", "-w", "ws://h", "-n", "lab", "--state-dir", str(state_dir)]) == 0
        [((config,), _)] = run_calls
        # Where the client's node serves its control socket.
        with serving(control_socket_path(config.state_dir)):
            for name in (["-n", "lab"], []):
                argv = ["status", "--json", "--state-dir", str(state_dir), *name]
                assert main(argv) == 0, capsys.readouterr().err
                assert json.loads(capsys.readouterr().out) == EXAMPLE


def test_missing_back_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "p2pvpn.client.node", None)
    assert main(["run", "-w", "ws://h"]) == 1
    assert "p2pvpn.client.node is not available" in capsys.readouterr().err


def test_configure_logging(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(False)
    configure_logging(False)  # idempotent: one handler
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "p2pvpn-stderr"]
    assert len(ours) == 1
    assert ours[0].formatter is not None
    assert ours[0].formatter._fmt == LOG_FORMAT
    assert root.level == logging.INFO
    logging.getLogger("p2pvpn.test").info("hello")
    assert " INFO p2pvpn.test: hello\n" in capsys.readouterr().err
    configure_logging(True)
    assert root.level == logging.DEBUG
