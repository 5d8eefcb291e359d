"""The client key ``bench_server`` (issue 14): file, TOML, flag, default, errors, display."""

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


def test_bench_server_is_off_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\n"))
    assert isinstance(config, ClientConfig)
    assert config.bench_server is False
    assert dict(effective_items(config))["bench_server"] == "false"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.cfg", "bench_server = true", True),
        ("c.cfg", "bench_server = yes", True),
        ("c.cfg", "bench_server = off", False),
        ("c.toml", "bench_server = true", True),
        ("c.toml", "bench_server = false", False),
    ],
)
def test_bench_server_from_a_file(tmp_path: Path, name: str, text: str, expected: bool) -> None:
    websocket = '"ws://h"' if name.endswith(".toml") else "ws://h"
    config = load_config(write(tmp_path, name, f"websocket = {websocket}\n{text}\n"))
    assert isinstance(config, ClientConfig)
    assert config.bench_server is expected


def test_bench_server_is_shown_with_what_it_does() -> None:
    shown = dict(effective_items(ClientConfig(websocket="ws://h", bench_server=True)))
    assert shown["bench_server"] == "true (answers p2pvpn bench peer on the VPN address)"


def test_a_bad_bench_server_value_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nbench_server = maybe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem == (f"{path}:2: bench_server: expected true/false, yes/no or 1/0, got 'maybe'")


def test_the_bench_server_flag_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.client.node", "run_client")
    path = write(tmp_path, "c.cfg", "websocket = ws://h\nbench_server = false\n")
    assert main(["run", "-c", str(path), "--bench-server"]) == 0
    assert main(["run", "-c", str(path)]) == 0
    [((with_flag,), _), ((without,), _)] = calls
    assert with_flag.bench_server is True
    assert without.bench_server is False
