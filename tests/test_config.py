"""Config parsing and validation (no privileges needed)."""

import logging
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from p2pvpn.config import (
    DEFAULT_STATE_ROOT,
    ClientConfig,
    ConfigError,
    ConfigValue,
    SdwanRule,
    ServerConfig,
    StunServer,
    client_config_from_values,
    effective_items,
    load_config,
    parse_candy_text,
    server_config_from_values,
)

PASSWORD = "s3cret # with hash; and semicolon"

CLIENT_CFG = f"""\
# full-line comment
   # indented comment

mode = "client"
websocket = "wss://vpn.example.org/ws"   # trailing comment after a quoted value
password = "{PASSWORD}";
debug=yes
name = home
tun = 10.0.0.5/24 ;
stun = "stun://stun.example.org:3479"
discovery = 300   # seconds
route = 5;
port = 40000
localhost = 192.168.1.10
mtu = 1380
state_dir = "/tmp/p2pvpn-state"
tls_verify = false
dataplane = pure
metrics = 127.0.0.1:9100
offload = off
"""

CLIENT_TOML = f"""\
mode = "client"
websocket = "wss://vpn.example.org/ws"
password = "{PASSWORD}"
debug = true
name = "home"
tun = "10.0.0.5/24"
stun = "stun://stun.example.org:3479"
discovery = 300
route = 5
port = "40000"
localhost = "192.168.1.10"
mtu = 1380
state_dir = "/tmp/p2pvpn-state"
tls_verify = false
dataplane = "pure"
metrics = "127.0.0.1:9100"
offload = "off"
"""

EXPECTED_CLIENT = ClientConfig(
    websocket="wss://vpn.example.org/ws",
    password=PASSWORD,
    debug=True,
    name="home",
    tun=IPv4Interface("10.0.0.5/24"),
    stun=StunServer("stun.example.org", 3479),
    discovery=300,
    route=5,
    port=40000,
    localhost=IPv4Address("192.168.1.10"),
    mtu=1380,
    state_dir=Path("/tmp/p2pvpn-state"),
    tls_verify=False,
    dataplane="pure",
    metrics=("127.0.0.1", 9100),
    offload="off",
)

SERVER_CFG = """\
mode = server
websocket = ws://0.0.0.0:8080/ws
password = pw
dhcp = "172.16.0.0/16"
sdwan = "172.16.0.1/32,192.168.10.0/24,172.16.0.1;172.16.0.0/16,10.8.0.0/16,172.16.0.2;"
stun_port = 0
metrics = "[::1]:9100"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, name: str, text: str) -> tuple[Path, ConfigError]:
    """Write ``text`` as ``name`` and load it: the file's path and the error loading it raised."""
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value


def test_every_client_key_from_candy_cfg(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "client.cfg", CLIENT_CFG))
    assert config == EXPECTED_CLIENT
    assert isinstance(config, ClientConfig)
    assert config.password == PASSWORD  # '#' and ';' inside quotes are literal
    assert config.interface_name == "p2pvpn-home"


def test_toml_gives_the_same_dataclass(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "client.toml", CLIENT_TOML)) == EXPECTED_CLIENT


def test_every_server_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "server.cfg", SERVER_CFG))
    assert config == ServerConfig(
        websocket="ws://0.0.0.0:8080/ws",
        password="pw",
        dhcp=IPv4Network("172.16.0.0/16"),
        sdwan=(
            SdwanRule(
                IPv4Network("172.16.0.1/32"),
                IPv4Network("192.168.10.0/24"),
                IPv4Address("172.16.0.1"),
            ),
            SdwanRule(
                IPv4Network("172.16.0.0/16"),
                IPv4Network("10.8.0.0/16"),
                IPv4Address("172.16.0.2"),
            ),
        ),
        stun_port=0,
        metrics=("::1", 9100),
    )


def test_server_toml(tmp_path: Path) -> None:
    text = 'mode = "server"\nwebsocket = "ws://[::]:80"\nstun_port = 3479\ndhcp = "10.1.2.3/24"\n'
    config = load_config(write(tmp_path, "server.toml", text))
    assert config == ServerConfig(
        websocket="ws://[::]:80", stun_port=3479, dhcp=IPv4Network("10.1.2.0/24")
    )


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\n"))
    assert config == ClientConfig(websocket="ws://h")
    assert isinstance(config, ClientConfig)
    assert (config.password, config.debug, config.name, config.tun, config.stun) == (
        "",
        False,
        "",
        None,
        None,
    )
    assert (config.discovery, config.route, config.port, config.mtu) == (0, 0, 0, 1400)
    assert (config.localhost, config.tls_verify, config.dataplane, config.metrics) == (
        None,
        True,
        "auto",
        None,
    )
    assert config.offload == "auto"
    assert config.state_dir == DEFAULT_STATE_ROOT / "default"
    assert config.interface_name == "p2pvpn0"
    assert ClientConfig(websocket="ws://h", name="x").state_dir == DEFAULT_STATE_ROOT / "x"
    server = load_config(write(tmp_path, "s.cfg", "mode=server\nwebsocket=ws://h\n"))
    assert server == ServerConfig(websocket="ws://h")
    assert isinstance(server, ServerConfig)
    assert (server.dhcp, server.sdwan, server.stun_port, server.metrics) == (None, (), 3478, None)


def test_candy_syntax_details() -> None:
    values = parse_candy_text(
        "a = plain value # comment\n"
        "b = pass#word\n"
        'c = "quoted # not a comment" ; # comment\n'
        "d = x;;\n"
        "e =\n"
        'f = ""\n'
        "a = last wins\n"
        "g = # only a comment\n",
        "t.cfg",
    )
    assert {key: item.value for key, item in values.items()} == {
        "a": "last wins",
        "b": "pass#word",
        "c": "quoted # not a comment",
        "d": "x",
        "e": "",
        "f": "",
        "g": "",
    }
    assert values["a"].origin == "t.cfg:7"


def test_empty_optional_values_mean_unset(tmp_path: Path) -> None:
    text = 'websocket = ws://h\nname = ""\ntun = ""\nstun = ""\nlocalhost =\nmetrics = ""\n'
    assert load_config(write(tmp_path, "c.cfg", text)) == ClientConfig(websocket="ws://h")


def test_unknown_keys_warn_and_do_not_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "websocket = ws://h\nstunn = stun://x\nworkers = 2\ndhcp = 10.0.0.0/24\n"
    with caplog.at_level(logging.DEBUG, logger="p2pvpn.config"):
        config = load_config(write(tmp_path, "c.cfg", text))
    assert config == ClientConfig(websocket="ws://h")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tmp_path / 'c.cfg'}:2: unknown key 'stunn' ignored (did you mean 'stun'?)",
        f"{tmp_path / 'c.cfg'}:3: workers: Candy option not supported by p2pvpn, ignored",
    ]
    # A server key in a client config is not "unknown" (Candy's sample file has both).
    assert any("dhcp: not used in this mode" in r.getMessage() for r in caplog.records)


def test_toml_line_numbers_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'websocket = "ws://h"\n\nroute = 1001\n')
    with pytest.raises(ConfigError, match=r"^.*c\.toml:3: route: 1001 is outside 0\.\.1000$"):
        load_config(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("route = 1001", "route: 1001 is outside 0..1000"),
        ("route = -1", "route: -1 is outside 0..1000"),
        ("route = five", "route: expected an integer, got 'five'"),
        ("port = 65536", "port: 65536 is outside 0..65535"),
        ("port = 1_000", "port: expected an integer, got '1_000'"),
        ("mtu = 575", "mtu: 575 is outside 576..9000"),
        ("mtu = 9001", "mtu: 9001 is outside 576..9000"),
        ("discovery = -5", "discovery: -5 is outside 0..2147483647"),
        ("debug = maybe", "debug: expected true/false, yes/no or 1/0, got 'maybe'"),
        ("tls_verify = 2", "tls_verify: expected true/false, yes/no or 1/0, got '2'"),
        ("mode = relay", "mode: expected 'client' or 'server', got 'relay'"),
        (
            "tun = 10.0.0.300/24",
            "tun: '10.0.0.300/24' is not an IPv4 address with a prefix (e.g. 10.0.0.1/24)",
        ),
        ("tun = 10.0.0.1", "tun: '10.0.0.1' needs a prefix of /30 or shorter (e.g. 10.0.0.1/24)"),
        ("tun = 10.0.0.0/24", "tun: '10.0.0.0/24' is the network or broadcast address of"),
        ("localhost = 192.168.1", "localhost: '192.168.1' is not an IPv4 address"),
        ("stun = stun.example.org", "stun: expected stun://host[:port], got 'stun.example.org'"),
        ("stun = stun://", "stun: expected stun://host[:port], got 'stun://'"),
        ("stun = stun://h:99999", "stun: 'stun://h:99999' has a bad port"),
        ("stun = turn://h", "stun: expected stun://host[:port], got 'turn://h'"),
        (
            "name = a/b",
            "name: 'a/b' may only contain letters, digits, '_', '.' and '-'",
        ),
        ("name = ..", "name: '..' may only contain letters, digits, '_', '.' and '-'"),
        (
            "name = toolongna",
            "name: 'toolongna' is too long: 'p2pvpn-toolongna' exceeds 15 characters",
        ),
        ("dataplane = turbo", "dataplane: expected one of auto, fast, pure, got 'turbo'"),
        ("offload = on", "offload: expected one of auto, off, got 'on'"),
        ("metrics = 9100", "metrics: expected host:port, got '9100'"),
        ("metrics = h:0", "metrics: expected host:port, got 'h:0'"),
        ("log_format = xml", "log_format: expected one of text, json, got 'xml'"),
    ],
)
def test_client_errors_name_file_line_key_and_value(
    tmp_path: Path, line: str, message: str
) -> None:
    path, error = load_error(tmp_path, "client.cfg", f"# c\nwebsocket = ws://h\n{line}\n")
    assert str(error).startswith(f"{path}:3: {message}")


def test_eight_character_name_fits(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket=ws://h\nname=a_b.c-d8\n"))
    assert isinstance(config, ClientConfig)
    assert config.interface_name == "p2pvpn-a_b.c-d8"
    assert len(config.interface_name) == 15


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("dhcp = 10.0.0.0/31", "dhcp: '10.0.0.0/31' needs a prefix of /30 or shorter"),
        ("dhcp = 10.0.0.0/33", "dhcp: '10.0.0.0/33' is not an IPv4 cidr"),
        ("dhcp = 10.0.0.0", "dhcp: '10.0.0.0' needs a prefix of /30 or shorter"),
        ("sdwan = 10.0.0.0/24,10.1.0.0/16", "sdwan: rule 1 '10.0.0.0/24,10.1.0.0/16': expected"),
        (
            "sdwan = 10.0.0.1/32,10.1.0.0/16,10.0.0.1;x/8,10.2.0.0/16,10.0.0.2",
            "sdwan: rule 2: 'x/8' is not an IPv4 cidr",
        ),
        ("sdwan = 10.0.0.1/32,10.1.0.0/16,10.0.0", "sdwan: rule 1: '10.0.0' is not an IPv4"),
        ("stun_port = 70000", "stun_port: 70000 is outside 0..65535"),
        ("log_format = 1", "log_format: expected one of text, json, got '1'"),
    ],
)
def test_server_errors(tmp_path: Path, line: str, message: str) -> None:
    path, error = load_error(tmp_path, "server.cfg", f"mode = server\nwebsocket = ws://h\n{line}\n")
    assert str(error).startswith(f"{path}:3: {message}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode = client\n", "missing websocket"),
        ('websocket = ""\n', "missing websocket"),
    ],
)
def test_missing_websocket(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "c.cfg", text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_config(path)


@pytest.mark.parametrize(
    ("mode", "url", "message"),
    [
        ("client", "http://h", "websocket: expected a ws:// or wss:// URL, got 'http://h'"),
        ("client", "ws://", "websocket: 'ws://' has no host"),
        ("client", "ws://h:99999", "websocket: 'ws://h:99999' is not a valid URL"),
        ("server", "http://h", "websocket: expected a ws:// or wss:// URL, got 'http://h'"),
    ],
)
def test_bad_websocket(tmp_path: Path, mode: str, url: str, message: str) -> None:
    path, error = load_error(tmp_path, "c.cfg", f"mode = {mode}\nwebsocket = {url}\n")
    assert str(error).startswith(f"{path}:2: {message}")


def test_every_bad_key_is_reported_in_file_order(tmp_path: Path) -> None:
    path, error = load_error(
        tmp_path,
        "c.cfg",
        "mtu = 100\nwebsocket = ftp://h\nname = ../x\nroute = 5\ndataplane = turbo\n",
    )
    assert error.problems == (
        f"{path}:1: mtu: 100 is outside 576..9000",
        f"{path}:2: websocket: expected a ws:// or wss:// URL, got 'ftp://h'",
        f"{path}:3: name: '../x' may only contain letters, digits, '_', '.' and '-'",
        f"{path}:5: dataplane: expected one of auto, fast, pure, got 'turbo'",
    )
    assert str(error) == "\n".join(error.problems)


def test_every_bad_key_of_a_server_and_a_missing_websocket(tmp_path: Path) -> None:
    path, error = load_error(tmp_path, "s.toml", 'mode = "server"\nstun_port = -1\ndhcp = "x"\n')
    assert error.problems == (
        f"{path}:2: stun_port: -1 is outside 0..65535",
        f"{path}:3: dhcp: 'x' is not an IPv4 cidr (e.g. 10.0.0.0/24)",
        f"{path}: missing websocket (a ws:// or wss:// URL)",
    )


def test_every_bad_line_is_reported(tmp_path: Path) -> None:
    path, error = load_error(
        tmp_path, "c.cfg", 'websocket = ws://h\nnonsense\npassword = "open\n= 1\n'
    )
    assert error.problems == (
        f"{path}:2: expected 'key = value'",
        f"{path}:3: password: missing closing quote",
        f"{path}:4: expected 'key = value'",
    )
    path, error = load_error(tmp_path, "c.toml", 'websocket = "ws://h"\nmtu = [1]\nroute = 1.5\n')
    assert error.problems == (
        f"{path}:2: mtu: expected a string, integer or boolean, got list",
        f"{path}:3: route: expected a string, integer or boolean, got float",
    )


def test_syntax_errors_do_not_echo_the_line(tmp_path: Path) -> None:
    path, error = load_error(tmp_path, "c.cfg", "websocket = ws://h\npassword hunter2\n")
    assert str(error) == f"{path}:2: expected 'key = value'"
    path, error = load_error(tmp_path, "d.cfg", 'password = "hunter2\n')
    assert str(error) == f"{path}:1: password: missing closing quote"
    path, error = load_error(tmp_path, "e.cfg", 'password = "hunter2" extra\n')
    assert str(error) == f"{path}:1: password: unexpected text after the closing quote"
    assert "hunter2" not in str(error)


def test_toml_type_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", 'websocket = "ws://h"\npassword = 1234\n')
    with pytest.raises(ConfigError, match=r"c\.toml:2: password: expected a string, got int$"):
        load_config(path)
    path = write(tmp_path, "d.toml", 'websocket = "ws://h"\nroute = true\n')
    with pytest.raises(ConfigError, match=r"d\.toml:2: route: expected an integer, got True$"):
        load_config(path)
    path = write(tmp_path, "e.toml", 'websocket = "ws://h"\nmtu = 1400.5\n')
    with pytest.raises(ConfigError, match=r"e\.toml:2: mtu: expected a string, integer or"):
        load_config(path)
    path = write(tmp_path, "f.toml", 'websocket = "ws://h"\n[client]\nroute = 1\n')
    with pytest.raises(ConfigError, match=r"f\.toml: client: .* got table$"):
        load_config(path)
    path = write(tmp_path, "g.toml", "websocket = \n")
    with pytest.raises(ConfigError, match=r"g\.toml: invalid TOML"):
        load_config(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.cfg: no such file$"):
        load_config(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError, match=r": cannot read: "):
        load_config(tmp_path)
    binary = tmp_path / "bin.cfg"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.cfg: not a UTF-8 text file$"):
        load_config(binary)


def test_mode_must_match_the_command() -> None:
    values = {
        "mode": ConfigValue("server", "s.cfg:1"),
        "websocket": ConfigValue("ws://h", "s.cfg:2"),
    }
    with pytest.raises(ConfigError, match=r"^s\.cfg:1: mode: this is a server configuration"):
        client_config_from_values(values, "s.cfg")
    values["mode"] = ConfigValue("client", "c.cfg:1")
    with pytest.raises(ConfigError, match=r"^c\.cfg:1: mode: this is a client configuration"):
        server_config_from_values(values, "c.cfg")
    # Without a mode key the command decides.
    del values["mode"]
    assert server_config_from_values(values, "x") == ServerConfig(websocket="ws://h")


def test_values_from_flags() -> None:
    values = {
        "websocket": ConfigValue("ws://h", "--websocket"),
        "route": ConfigValue("1001", "--route"),
    }
    with pytest.raises(ConfigError) as info:
        client_config_from_values(values, "command line")
    assert str(info.value) == "--route: 1001 is outside 0..1000"
    with pytest.raises(ConfigError, match=r"^command line: missing websocket"):
        client_config_from_values({}, "command line")
    values = {
        "websocket": ConfigValue("ws://h", "--websocket"),
        "debug": ConfigValue(True, "--debug"),
        "tls_verify": ConfigValue(False, "--no-tls-verify"),
        "state_dir": ConfigValue("relative/dir", "--state-dir"),
    }
    config = client_config_from_values(values, "command line")
    assert config.debug is True
    assert config.tls_verify is False
    assert config.state_dir == Path("relative/dir").absolute()


def test_effective_items_mask_the_password() -> None:
    client = ClientConfig(websocket="ws://h", password="hunter2")
    items = effective_items(client)
    assert [key for key, _ in items] == [
        "mode",
        "websocket",
        "password",
        "password_file",
        "debug",
        "log_format",
        "name",
        "tun",
        "stun",
        "discovery",
        "route",
        "port",
        "localhost",
        "mtu",
        "state_dir",
        "tls_verify",
        "dataplane",
        "metrics",
        "accept_routes",
        "tls_ca",
        "offload",
        "bench_server",
        "exit",
        "exit_allow_lan",
        "hostname",
        "domain",
        "dns",
        "exit_node",
    ]
    assert dict(items)["password"] == "********"
    assert "hunter2" not in repr(items)
    assert "hunter2" not in repr(client)
    assert dict(effective_items(ClientConfig(websocket="ws://h")))["password"] == "(empty)"
    server = ServerConfig(
        websocket="ws://h",
        password="hunter2",
        sdwan=(
            SdwanRule(
                IPv4Network("10.0.0.1/32"), IPv4Network("10.1.0.0/16"), IPv4Address("10.0.0.1")
            ),
        ),
        metrics=("::1", 9100),
    )
    server_items = dict(effective_items(server))
    assert list(server_items) == [
        "mode",
        "websocket",
        "password",
        "password_file",
        "debug",
        "log_format",
        "dhcp",
        "sdwan",
        "stun_port",
        "metrics",
        "tls_cert",
        "tls_key",
        "send_queue_bytes",
        "max_unauthenticated",
        "max_unauthenticated_per_ip",
        "login_timeout",
        "max_replay_entries",
        "broadcast_rate",
        "max_broadcast_size",
        "max_leases_per_ip",
        "stun_rate",
        "junk_rate",
        "cluster",
        "cluster_network",
        "cluster_ttl",
        "cluster_credentials",
        "control_socket",
    ]
    assert server_items["password"] == "********"
    assert server_items["sdwan"] == "10.0.0.1/32,10.1.0.0/16,10.0.0.1"
    assert server_items["metrics"] == "[::1]:9100"
    assert "hunter2" not in repr(server)


def test_stun_ipv6_host(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\nstun = stun://[::1]\n"))
    assert isinstance(config, ClientConfig)
    assert config.stun == StunServer("::1", 3478)
    assert dict(effective_items(config))["stun"] == "stun://[::1]:3478"


def test_log_format(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "c.cfg", "websocket = ws://h\nlog_format = JSON\n"))
    assert config == ClientConfig(websocket="ws://h", log_format="json")
    assert dict(effective_items(config))["log_format"] == "json"
    text = 'mode = "server"\nwebsocket = "ws://h"\nlog_format = "json"\n'
    server = load_config(write(tmp_path, "s.toml", text))
    assert server == ServerConfig(websocket="ws://h", log_format="json")
    assert ClientConfig(websocket="ws://h").log_format == "text"
    with pytest.raises(ConfigError, match="log_format: expected a string, got bool"):
        load_config(write(tmp_path, "c.toml", 'websocket = "ws://h"\nlog_format = true\n'))


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("accept_routes = none", "none", "none"),
        ("accept_routes = SAFE", "safe", "safe"),
        ("accept_routes = all", "all", "all"),
        (
            "accept_routes = 10.1.0.0/16, 172.30.0.1/16",
            (IPv4Network("10.1.0.0/16"), IPv4Network("172.30.0.0/16")),
            "10.1.0.0/16,172.30.0.0/16",
        ),
    ],
)
def test_accept_routes(tmp_path: Path, text: str, expected: object, shown: str) -> None:
    config = load_config(write(tmp_path, "c.cfg", f"websocket = ws://h\n{text}\n"))
    assert isinstance(config, ClientConfig)
    assert config.accept_routes == expected
    assert dict(effective_items(config))["accept_routes"] == shown
    assert ClientConfig(websocket="ws://h").accept_routes == "safe"


def test_accept_routes_in_toml_as_an_array_or_a_string(tmp_path: Path) -> None:
    networks = (IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16"))
    array = 'websocket = "ws://h"\naccept_routes = ["10.1.0.0/16", "10.2.0.0/16"]\n'
    assert load_config(write(tmp_path, "a.toml", array)) == ClientConfig(
        websocket="ws://h", accept_routes=networks
    )
    text = 'websocket = "ws://h"\naccept_routes = "all"\n'
    assert load_config(write(tmp_path, "b.toml", text)) == ClientConfig(
        websocket="ws://h", accept_routes="all"
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.cfg", "accept_routes = some", "c.cfg:2: accept_routes: expected none, safe, all"),
        ("c.cfg", "accept_routes = 10.0.0.0/33", "got '10.0.0.0/33'"),
        ("c.cfg", "accept_routes = ,", "got ''"),
        ("c.toml", "accept_routes = [1, 2]", "expected a string, integer or boolean, got list"),
    ],
)
def test_bad_accept_routes(tmp_path: Path, name: str, text: str, message: str) -> None:
    websocket = '"ws://h"' if name.endswith(".toml") else "ws://h"
    _, error = load_error(tmp_path, name, f"websocket = {websocket}\n{text}\n")
    assert message in str(error)


# -- TLS keys -----------------------------------------------------------------------


def test_a_wss_server_with_its_certificate(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "s.cfg",
        "mode = server\nwebsocket = wss://0.0.0.0/\ntls_cert = /etc/tls/c.pem\ntls_key = k.pem\n",
    )
    config = load_config(path)
    assert isinstance(config, ServerConfig)
    assert config.tls_cert == Path("/etc/tls/c.pem")
    assert config.tls_key == Path("k.pem").absolute()
    items = dict(effective_items(config))
    assert items["tls_cert"] == "/etc/tls/c.pem"
    assert items["tls_key"] == str(Path("k.pem").absolute())
    plain = dict(effective_items(ServerConfig(websocket="ws://h")))
    assert plain["tls_cert"] == plain["tls_key"] == "(none: ws://)"


@pytest.mark.parametrize(
    ("lines", "problems"),
    [
        (
            "websocket = wss://h\n",
            [
                "2: websocket: a wss:// URL needs tls_cert (a PEM file)",
                "2: websocket: a wss:// URL needs tls_key (a PEM file)",
            ],
        ),
        (
            "websocket = wss://h\ntls_cert = c.pem\n",
            ["2: websocket: a wss:// URL needs tls_key (a PEM file)"],
        ),
        (
            "websocket = ws://h\ntls_cert = c.pem\ntls_key = k.pem\n",
            [
                "3: tls_cert: only used with a wss:// websocket URL (the server speaks ws://)",
                "4: tls_key: only used with a wss:// websocket URL (the server speaks ws://)",
            ],
        ),
    ],
)
def test_server_tls_keys_go_with_wss(tmp_path: Path, lines: str, problems: list[str]) -> None:
    path, error = load_error(tmp_path, "s.cfg", "mode = server\n" + lines)
    assert error.problems == tuple(f"{path}:{problem}" for problem in problems)


def test_a_client_trusting_a_private_ca(tmp_path: Path) -> None:
    from p2pvpn.server.tls import make_self_signed_certificate, write_certificate

    cert, _ = write_certificate(make_self_signed_certificate(), tmp_path)
    config = load_config(write(tmp_path, "c.cfg", f"websocket = wss://h\ntls_ca = {cert}\n"))
    assert isinstance(config, ClientConfig)
    assert config.tls_ca == cert
    assert dict(effective_items(config))["tls_ca"] == str(cert)
    default = dict(effective_items(ClientConfig(websocket="wss://h")))
    assert default["tls_ca"] == "(the system's CAs)"


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("missing", "tls_ca: {ca}: no such file"),
        ("unreadable", "tls_ca: {ca}: cannot read"),
        ("not PEM", "tls_ca: {ca}: no PEM certificate in it"),
        ("ws://", "tls_ca: only used with a wss:// websocket URL"),
        ("no verify", "tls_ca: not used when tls_verify is false (nothing is verified)"),
    ],
)
def test_a_bad_tls_ca_is_named(tmp_path: Path, case: str, problem: str) -> None:
    ca = tmp_path / "ca.pem"
    url = "ws://h" if case == "ws://" else "wss://h"
    extra = "tls_verify = false\n" if case == "no verify" else ""
    if case == "unreadable":
        ca.mkdir()
    elif case != "missing":
        ca.write_text("-----BEGIN NOTHING-----\n")
    path, error = load_error(tmp_path, "c.cfg", f"websocket = {url}\ntls_ca = {ca}\n{extra}")
    (message,) = error.problems
    assert message.startswith(f"{path}:2: " + problem.format(ca=ca))


def test_offload_is_auto_or_off(tmp_path: Path) -> None:
    for text, expected in (("auto", "auto"), ("off", "off"), (" OFF ", "off")):
        config = load_config(write(tmp_path, "c.cfg", f"websocket=ws://h\noffload = {text}\n"))
        assert isinstance(config, ClientConfig)
        assert config.offload == expected
    shown = dict(effective_items(ClientConfig(websocket="ws://h")))["offload"]
    assert shown == "auto (TUN offloads with the fast data plane)"
    assert (
        dict(effective_items(ClientConfig(websocket="ws://h", offload="off")))["offload"] == "off"
    )
    path, error = load_error(tmp_path, "c.toml", 'websocket = "ws://h"\noffload = false\n')
    assert str(error) == f"{path}:2: offload: expected a string, got bool"
