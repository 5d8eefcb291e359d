"""The client key ``exit_node`` (issue 16): file, TOML, flag, default, errors, display."""

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


def test_exit_node_is_off_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\n"))
    assert isinstance(config, ClientConfig)
    assert config.exit_node is False
    assert dict(effective_items(config))["exit_node"] == "false"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.cfg", "exit_node = true", True),
        ("c.cfg", "exit_node = no", False),
        ("c.toml", "exit_node = true", True),
        ("c.toml", "exit_node = false", False),
    ],
)
def test_exit_node_from_a_file(tmp_path: Path, name: str, text: str, expected: bool) -> None:
    websocket = '"ws://h"' if name.endswith(".toml") else "ws://h"
    config = load_config(write(tmp_path, name, f"websocket = {websocket}\n{text}\n"))
    assert isinstance(config, ClientConfig)
    assert config.exit_node is expected


def test_exit_node_is_shown_with_what_it_does() -> None:
    shown = dict(effective_items(ClientConfig(websocket="ws://h", exit_node=True)))
    assert shown["exit_node"] == "true (forwards and masquerades the VPN's internet traffic)"


def test_a_bad_exit_node_value_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nexit_node = sometimes\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem == f"{path}:2: exit_node: expected true/false, yes/no or 1/0, got 'sometimes'"


def test_the_exit_node_flag_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.client.node", "run_client")
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nexit_node = false\n")
    assert main(["run", "-c", str(path), "--exit-node"]) == 0
    assert main(["run", "-c", str(path)]) == 0
    [((with_flag,), _), ((without,), _)] = calls
    assert with_flag.exit_node is True
    assert without.exit_node is False
