"""The client keys ``hostname``, ``domain`` and ``dns`` (issue 16): files, flags, errors."""

from pathlib import Path
from typing import Any

import pytest

from p2pvpn.cli import main
from p2pvpn.config import ClientConfig, ConfigError, effective_items, load_config
from tests.test_cli import fake_module


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def client(tmp_path: Path, text: str, name: str = "c.cfg") -> ClientConfig:
    websocket = '"ws://h"' if name.endswith(".toml") else "ws://h"
    config = load_config(write(tmp_path, name, f"websocket = {websocket}\n{text}\n"))
    assert isinstance(config, ClientConfig)
    return config


def problem_of(tmp_path: Path, text: str, name: str = "c.cfg") -> tuple[Path, str]:
    path = write(tmp_path, name, f"websocket = ws://h\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    return path, problem


def test_the_defaults_follow_the_machine_in_the_vpn_domain_with_dns(tmp_path: Path) -> None:
    config = client(tmp_path, "")
    assert (config.hostname, config.domain, config.dns) == ("", "vpn", True)
    shown = dict(effective_items(config))
    assert shown["hostname"] == "(the machine's host name)"
    assert shown["domain"] == "vpn"
    assert shown["dns"] == "true (answers on the TUN address, port 53)"


@pytest.mark.parametrize("name", ["c.cfg", "c.toml"])
def test_the_keys_from_a_file(tmp_path: Path, name: str) -> None:
    quote = '"' if name.endswith(".toml") else ""
    dns = "false" if name.endswith(".toml") else "no"
    text = f"hostname = {quote}Laptop-7{quote}\ndomain = {quote}Home.Arpa.{quote}\ndns = {dns}"
    config = client(tmp_path, text, name)
    assert (config.hostname, config.domain, config.dns) == ("laptop-7", "home.arpa", False)
    assert dict(effective_items(config))["dns"] == "false"


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("hostname = x!!", "'x!!' is not a DNS label"),
        ("hostname = -lead", "'-lead' is not a DNS label"),
        ("hostname = " + "a" * 64, "at most 63 characters"),
        ("hostname = a.b", "(e.g. 'a-b')"),
    ],
)
def test_a_bad_hostname_is_named_with_its_value(tmp_path: Path, text: str, detail: str) -> None:
    path, problem = problem_of(tmp_path, text)
    assert problem.startswith(f"{path}:2: hostname: ")
    assert detail in problem


@pytest.mark.parametrize("value", ["a..b", ".vpn", "bad_domain", "x" * 254, "a b"])
def test_a_bad_domain_is_named_with_its_value(tmp_path: Path, value: str) -> None:
    path, problem = problem_of(tmp_path, f"domain = {value}")
    assert problem.startswith(f"{path}:2: domain: {value!r} is not a DNS name: ")


def test_a_bad_dns_value_is_named(tmp_path: Path) -> None:
    path, problem = problem_of(tmp_path, "dns = maybe")
    assert problem == f"{path}:2: dns: expected true/false, yes/no or 1/0, got 'maybe'"


def test_the_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.client.node", "run_client")
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nhostname = filed\ndomain = corp\n")
    flags = ["--hostname", "Flagged", "--domain", "lan", "--no-dns"]
    assert main(["run", "-c", str(path), *flags]) == 0
    assert main(["run", "-c", str(path)]) == 0
    [((with_flags,), _), ((without,), _)] = calls
    assert (with_flags.hostname, with_flags.domain, with_flags.dns) == ("flagged", "lan", False)
    assert (without.hostname, without.domain, without.dns) == ("filed", "corp", True)


def test_a_bad_flag_is_named_by_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "c.cfg", "websocket = ws://h\n")
    assert main(["run", "-c", str(path), "--hostname", "no way"]) != 0
    assert "--hostname: 'no way' is not a DNS label" in capsys.readouterr().err
