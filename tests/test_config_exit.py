"""The client keys ``exit`` and ``exit_allow_lan`` (issue 16): file, flags, default, errors."""

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


def test_no_exit_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\n"))
    assert isinstance(config, ClientConfig)
    assert config.exit == ""
    assert config.exit_allow_lan is True
    shown = dict(effective_items(config))
    assert shown["exit"] == "(none: this machine's default route)"
    assert shown["exit_allow_lan"] == "true"


@pytest.mark.parametrize(
    ("name", "text", "target", "allow_lan"),
    [
        ("c.cfg", "exit = gateway\n", "gateway", True),
        ("c.cfg", "exit = Gate-Way7\nexit_allow_lan = no\n", "gate-way7", False),
        ("c.cfg", "exit = 10.0.0.7\n", "10.0.0.7", True),
        ("c.toml", 'exit = "home"\nexit_allow_lan = false\n', "home", False),
    ],
)
def test_exit_from_a_file(
    tmp_path: Path, name: str, text: str, target: str, allow_lan: bool
) -> None:
    head = 'websocket = "ws://h"\n' if name.endswith(".toml") else "websocket = ws://h\n"
    config = load_config(write(tmp_path, name, head + text))
    assert isinstance(config, ClientConfig)
    assert config.exit == target
    assert config.exit_allow_lan is allow_lan
    assert dict(effective_items(config))["exit"] == target


@pytest.mark.parametrize("bad", ["my laptop", "-gw", "gw-", "a_b", "x" * 64, "10.0.0.256x"])
def test_a_bad_exit_is_named(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, "c.cfg", f"websocket = ws://h\nexit = {bad}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:2: exit: {bad!r} is neither an IPv4 address nor a name")


def test_a_bad_exit_allow_lan_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nexit_allow_lan = maybe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: exit_allow_lan: expected true/false, yes/no or 1/0, got 'maybe'"
    )


def test_the_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.client.node", "run_client")
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nexit = home\nexit_allow_lan = no\n")
    assert main(["run", "-c", str(path), "--exit", "10.0.0.9", "--exit-allow-lan"]) == 0
    assert main(["run", "-c", str(path)]) == 0
    assert main(["run", "-w", "ws://h", "--exit", "gw", "--no-exit-allow-lan"]) == 0
    [((flags,), _), ((file_only,), _), ((no_lan,), _)] = calls
    assert (flags.exit, flags.exit_allow_lan) == ("10.0.0.9", True)
    assert (file_only.exit, file_only.exit_allow_lan) == ("home", False)
    assert (no_lan.exit, no_lan.exit_allow_lan) == ("gw", False)


def test_a_bad_exit_flag_names_the_flag() -> None:
    assert main(["run", "-w", "ws://h", "--exit", "no way"]) != 0


@pytest.mark.parametrize("offer", ["true", "yes"])
def test_exit_with_exit_node_is_an_error(tmp_path: Path, offer: str) -> None:
    path = write(tmp_path, "c.cfg", f"websocket = ws://h\nexit = gw\nexit_node = {offer}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: exit: cannot be used with exit_node = true ({path}:3): a member either "
        "offers itself as an exit node or sends its traffic through one"
    )


@pytest.mark.parametrize("text", ["exit = gw\nexit_node = false\n", "exit = \nexit_node = true\n"])
def test_exit_or_exit_node_alone_is_fine(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\n" + text))
    assert isinstance(config, ClientConfig)
