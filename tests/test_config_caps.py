"""The server's resource-cap keys: parsing, errors, defaults shared with ServerLimits."""

import dataclasses
from pathlib import Path

import pytest

from p2pvpn.config import ConfigError, ServerConfig, effective_items, load_config
from p2pvpn.server.limits import ServerLimits
from p2pvpn.server.runtime import server_limits

CAPS_CFG = """\
mode = server
websocket = ws://0.0.0.0:8080/
send_queue_bytes = 1048576
max_unauthenticated = 200
max_unauthenticated_per_ip = 8
login_timeout = 2.5
max_replay_entries = 1000
broadcast_rate = 50
max_broadcast_size = 1600
max_leases_per_ip = 2
stun_rate = 5
junk_rate = 30
"""

CAPS = {
    "send_queue_bytes": 1048576,
    "max_unauthenticated": 200,
    "max_unauthenticated_per_ip": 8,
    "login_timeout": 2.5,
    "max_replay_entries": 1000,
    "broadcast_rate": 50,
    "max_broadcast_size": 1600,
    "max_leases_per_ip": 2,
    "stun_rate": 5,
    "junk_rate": 30,
}


def test_the_config_defaults_are_the_servers() -> None:
    """config.py cannot import the server, so both spell the defaults: they must agree."""
    config = ServerConfig(websocket="ws://h")
    for field in dataclasses.fields(ServerLimits):
        assert getattr(config, field.name) == getattr(ServerLimits(), field.name), field.name


def test_every_cap_key_from_candy_cfg_and_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "server.cfg"
    cfg.write_text(CAPS_CFG)
    expected = ServerConfig(websocket="ws://0.0.0.0:8080/", **CAPS)  # type: ignore[arg-type]
    assert load_config(cfg) == expected
    toml = tmp_path / "server.toml"
    toml.write_text(
        'mode = "server"\nwebsocket = "ws://0.0.0.0:8080/"\n'
        + "".join(f"{key} = {value}\n" for key, value in CAPS.items() if key != "login_timeout")
        # TOML floats are refused like every float key: fractions come as strings.
        + 'login_timeout = "2.5"\n'
    )
    assert load_config(toml) == expected
    assert dataclasses.asdict(server_limits(expected)) == CAPS


def test_the_effective_config_shows_the_caps() -> None:
    items = dict(effective_items(ServerConfig(websocket="ws://h")))
    assert items["send_queue_bytes"] == "4194304"
    assert items["login_timeout"] == "5 s"
    assert items["broadcast_rate"] == "100/s"
    assert items["stun_rate"] == "20/s"
    assert items["junk_rate"] == "200/s"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("send_queue_bytes = 1000", "send_queue_bytes: 1000 is outside 65536..1073741824"),
        ("max_unauthenticated = 0", "max_unauthenticated: 0 is outside 1..1000000"),
        ("max_unauthenticated_per_ip = x", "max_unauthenticated_per_ip: expected an integer"),
        ("login_timeout = soon", "login_timeout: expected a number of seconds, got 'soon'"),
        ("login_timeout = 0", "login_timeout: 0 is outside 0.1..300 seconds"),
        ("max_replay_entries = 1", "max_replay_entries: 1 is outside 16..100000000"),
        ("broadcast_rate = -1", "broadcast_rate: -1 is outside 1..1000000"),
        ("max_broadcast_size = 70000", "max_broadcast_size: 70000 is outside 64..65536"),
        ("max_leases_per_ip = 0", "max_leases_per_ip: 0 is outside 1..1000000"),
        ("stun_rate = 0", "stun_rate: 0 is outside 1..1000000"),
    ],
)
def test_a_bad_cap_names_file_line_key_and_value(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "server.cfg"
    path.write_text(f"mode = server\nwebsocket = ws://h\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}:3: {message}")
