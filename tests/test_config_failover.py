"""Several server URLs for a client: TOML list, repeated -w, checks and display."""

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.cli import main
from p2pvpn.config import (
    ClientConfig,
    ConfigError,
    ConfigValue,
    client_config_from_values,
    effective_items,
    load_config,
    parse_toml_text,
    server_config_from_values,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def client(websocket: str | tuple[str, ...], origin: str = "c.toml:1") -> ClientConfig:
    return client_config_from_values({"websocket": ConfigValue(websocket, origin)}, "c.toml")


@pytest.fixture
def run_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`p2pvpn run`'s back end, recording the config instead of running."""
    calls: list[Any] = []
    module = types.ModuleType("p2pvpn.client.node")
    module.run_client = lambda config: calls.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pvpn.client.node", module)
    return calls


def test_a_toml_list_gives_every_url_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        'websocket = ["wss://a.example/", "wss://b.example:8443/vpn", "ws://10.0.0.1/"]\n',
    )
    config = load_config(path)
    assert isinstance(config, ClientConfig)
    urls = ("wss://a.example/", "wss://b.example:8443/vpn", "ws://10.0.0.1/")
    assert config.websockets == urls
    assert config.websocket == urls[0]  # what every single-URL user reads


def test_a_string_is_a_list_of_one(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.toml", 'websocket = "wss://a.example/"\n'))
    assert isinstance(config, ClientConfig)
    assert config.websockets == ("wss://a.example/",)


def test_candy_cfg_keeps_one_url(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = wss://a.example/\n"))
    assert isinstance(config, ClientConfig)
    assert config.websockets == (config.websocket,) == ("wss://a.example/",)


def test_a_toml_list_keeps_commas_inside_a_url() -> None:
    values = parse_toml_text('websocket = ["ws://a/x,y", "ws://b/"]\n', "c.toml")
    assert values["websocket"].value == ("ws://a/x,y", "ws://b/")


def test_other_toml_lists_are_still_joined() -> None:
    values = parse_toml_text('accept_routes = ["10.1.0.0/16", "10.2.0.0/16"]\n', "c.toml")
    assert values["accept_routes"].value == "10.1.0.0/16,10.2.0.0/16"


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        (
            ("ws://a/", "http://user:pw@b/"),
            "c.toml:1: websocket: URL 2 of 2: expected a ws:// or wss:// URL, got 'http://b/'",
        ),
        (
            ("ws://a/", "ws:///x", "ws://c/"),
            "c.toml:1: websocket: URL 2 of 3: 'ws:///x' has no host",
        ),
        (("ws://a/", "  "), "c.toml:1: websocket: URL 2 of 2: empty"),
        (
            ("ws://a/", "ws://b:99999/"),
            "c.toml:1: websocket: URL 2 of 2: 'ws://b:99999/' is not a valid URL",
        ),
        ((), "c.toml: missing websocket (a ws:// or wss:// URL)"),
    ],
)
def test_a_bad_url_is_named_with_its_position(urls: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        client(urls)
    assert caught.value.problems == (message,)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "second",
    ["ws://a.example/", "ws://A.EXAMPLE:80/", "ws://user:secret@a.example", "ws://a.example:80"],
)
def test_the_same_server_twice_is_refused(second: str) -> None:
    with pytest.raises(ConfigError) as caught:
        client(("ws://a.example/", second))
    [problem] = caught.value.problems
    assert problem.startswith("c.toml:1: websocket: URL 2 of 2: ")
    assert problem.endswith("is the same server as URL 1")
    assert "secret" not in problem


def test_different_ports_paths_or_schemes_are_different_servers() -> None:
    urls = ("ws://a/", "ws://a:8080/", "ws://a/other", "wss://a/")
    assert client(urls).websockets == urls


def test_a_toml_list_of_non_strings_says_what_is_expected() -> None:
    with pytest.raises(ConfigError, match="websocket: expected a string or an array of strings"):
        parse_toml_text("websocket = [1, 2]\n", "c.toml")


def test_tls_ca_needs_one_wss_url_in_the_list(tmp_path: Path) -> None:
    values = {
        "websocket": ConfigValue(("ws://a/", "ws://b/"), "c.toml:1"),
        "tls_ca": ConfigValue(str(tmp_path / "ca.pem"), "c.toml:2"),
    }
    with pytest.raises(ConfigError, match="tls_ca: only used with a wss:// websocket URL"):
        client_config_from_values(values, "c.toml")


def test_a_server_listens_on_one_url() -> None:
    values = {"websocket": ConfigValue(("ws://0.0.0.0:80/", "ws://0.0.0.0:81/"), "s.toml:1")}
    with pytest.raises(ConfigError, match="websocket: a server listens on one URL, got 2"):
        server_config_from_values(values, "s.toml")
    one = {"websocket": ConfigValue(("ws://0.0.0.0:80/",), "s.toml:1")}
    assert server_config_from_values(one, "s.toml").websocket == "ws://0.0.0.0:80/"


def test_effective_items_show_every_url_without_secrets() -> None:
    config = client(("wss://user:secret@a.example/x?token=t", "ws://b.example/"))
    shown = dict(effective_items(config))["websocket"]
    assert shown == "wss://a.example/x, ws://b.example/"


def test_the_dataclass_keeps_websocket_and_websockets_in_step() -> None:
    assert ClientConfig(websocket="ws://a/").websockets == ("ws://a/",)
    assert ClientConfig(websocket="", websockets=("ws://a/", "ws://b/")).websocket == "ws://a/"
    with pytest.raises(ValueError, match="first of websockets"):
        ClientConfig(websocket="ws://b/", websockets=("ws://a/", "ws://b/"))


def test_repeated_w_flags_replace_the_files_list(tmp_path: Path, run_calls: list[Any]) -> None:
    path = write(tmp_path, "c.toml", 'websocket = ["ws://file-a/", "ws://file-b/"]\n')
    assert main(["run", "-c", str(path), "-w", "ws://flag-a/", "-w", "ws://flag-b/"]) == 0
    [config] = run_calls
    assert config.websockets == ("ws://flag-a/", "ws://flag-b/")
    assert config.websocket == "ws://flag-a/"


def test_one_w_flag_replaces_the_files_list(tmp_path: Path, run_calls: list[Any]) -> None:
    path = write(tmp_path, "c.toml", 'websocket = ["ws://file-a/", "ws://file-b/"]\n')
    assert main(["run", "-c", str(path), "-w", "ws://flag/"]) == 0
    assert run_calls[0].websockets == ("ws://flag/",)


def test_a_duplicate_w_flag_is_a_usage_error(
    run_calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "-w", "ws://a/", "-w", "ws://a:80/"]) == 2
    assert run_calls == []
    error = capsys.readouterr().err
    assert "--websocket: URL 2 of 2: 'ws://a:80/' is the same server as URL 1" in error


def test_check_config_lists_every_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "c.toml", 'websocket = ["ws://u:pw@a/", "ws://b/"]\npassword = "x"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    # The keys are padded to the longest one: the width follows the key list.
    assert re.search(r"^websocket += ws://a/, ws://b/$", out, re.MULTILINE)
    assert "pw" not in out
