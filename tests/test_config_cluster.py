"""The relay cluster's config keys and their flags: cluster, cluster_network, _ttl, _credentials."""

import logging
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.cli import main
from p2pvpn.config import ConfigError, ServerConfig, effective_items, load_config
from tests.test_cli import fake_module

SERVER = "mode = server\nwebsocket = ws://0.0.0.0:8080/\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def load_server(tmp_path: Path, name: str, text: str) -> ServerConfig:
    config = load_config(write(tmp_path, name, text))
    assert isinstance(config, ServerConfig)
    return config


def test_without_cluster_keys_there_is_no_cluster(tmp_path: Path) -> None:
    config = load_server(tmp_path, "s.cfg", SERVER)
    assert config.cluster == ()
    assert config.cluster_network == "p2pvpn"
    assert config.cluster_ttl == 15.0
    assert config.cluster_credentials is None
    items = dict(effective_items(config))
    assert items["cluster"] == "(off)"
    assert items["cluster_ttl"] == "15 s"


def test_cluster_from_candy_cfg_and_toml(tmp_path: Path) -> None:
    creds = write(tmp_path, "server.creds", "-----BEGIN NATS USER JWT-----\n")
    config = load_server(
        tmp_path,
        "s.cfg",
        SERVER
        + "cluster = nats://10.0.0.1:4222\ncluster_network = office-1\ncluster_ttl = 30\n"
        + f"cluster_credentials = {creds}\n",
    )
    assert config.cluster == ("nats://10.0.0.1:4222",)
    assert config.cluster_network == "office-1"
    assert config.cluster_ttl == 30.0
    assert config.cluster_credentials == creds
    toml = load_server(
        tmp_path,
        "s.toml",
        'mode = "server"\nwebsocket = "ws://0.0.0.0:8080/"\n'
        'cluster = ["nats://a:4222", "tls://b:4222"]\ncluster_ttl = "7.5"\n',
    )
    assert toml.cluster == ("nats://a:4222", "tls://b:4222")
    assert toml.cluster_ttl == 7.5
    single = load_server(
        tmp_path,
        "one.toml",
        'mode = "server"\nwebsocket = "ws://h/"\ncluster = "wss://nats.example.org/"\n',
    )
    assert single.cluster == ("wss://nats.example.org/",)


def test_credentials_in_a_url_are_never_shown(tmp_path: Path) -> None:
    config = load_server(tmp_path, "s.cfg", SERVER + "cluster = nats://user:s3cret@h:4222\n")
    assert config.cluster == ("nats://user:s3cret@h:4222",)
    assert dict(effective_items(config))["cluster"] == "nats://h:4222"
    with pytest.raises(ConfigError) as error:
        load_server(tmp_path, "bad.cfg", SERVER + "cluster = http://user:s3cret@h:4222\n")
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cluster = http://h:4222", "bad.cfg:3: cluster: expected a NATS URL"),
        ("cluster = nats://h:99999", "bad.cfg:3: cluster: 'nats://h:99999' is not a valid URL"),
        ("cluster = nats://:4222", "has no host"),
        ("cluster = nats://a:1,ws://b:2", "cannot be mixed"),
        ("cluster_network = a.b", "bad.cfg:3: cluster_network: 'a.b' must be 1 to 32"),
        ("cluster_network = " + "x" * 33, "must be 1 to 32"),
        ("cluster_ttl = 1", "bad.cfg:3: cluster_ttl: 1 is outside 2..300 seconds"),
        ("cluster_ttl = soon", "expected a number of seconds"),
        ("cluster_credentials = /nonexistent.creds", "only used with cluster"),
    ],
)
def test_bad_cluster_values_are_named(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_server(tmp_path, "bad.cfg", SERVER + line + "\n")


def test_missing_credentials_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "gone.creds"
    text = SERVER + f"cluster = nats://h:4222\ncluster_credentials = {missing}\n"
    with pytest.raises(ConfigError, match=f"cluster_credentials: {missing}: no such file"):
        load_server(tmp_path, "bad.cfg", text)


def test_readable_credentials_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    creds = tmp_path / "open.creds"
    creds.write_text("jwt")
    creds.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_server(
            tmp_path, "s.cfg", SERVER + f"cluster = nats://h\ncluster_credentials = {creds}\n"
        )
    assert "holds NATS credentials" in caplog.text


def test_cluster_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.server.runtime", "run_server")
    creds = write(tmp_path, "s.creds", "jwt")
    argv = ["server", "-w", "ws://0.0.0.0:80", "--cluster", "nats://a:4222"]
    argv += ["--cluster", "nats://b:4222", "--cluster-network", "lab"]
    argv += ["--cluster-ttl", "9", "--cluster-credentials", str(creds)]
    assert main(argv) == 0
    [((config,), _)] = calls
    assert config.cluster == ("nats://a:4222", "nats://b:4222")
    assert config.cluster_network == "lab"
    assert config.cluster_ttl == 9.0
    assert config.cluster_credentials == creds


def test_a_cluster_flag_replaces_the_files_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = fake_module(monkeypatch, "p2pvpn.server.runtime", "run_server")
    path = write(
        tmp_path,
        "s.toml",
        'mode = "server"\nwebsocket = "ws://h/"\ncluster = ["nats://a:1", "nats://b:2"]\n',
    )
    assert main(["server", "-c", str(path), "--cluster", "nats://c:3"]) == 0
    [((config,), _)] = calls
    assert config.cluster == ("nats://c:3",)


def test_a_bad_cluster_flag_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_module(monkeypatch, "p2pvpn.server.runtime", "run_server")
    assert main(["server", "-w", "ws://h/", "--cluster", "redis://h"]) == 2
    assert "--cluster: expected a NATS URL" in capsys.readouterr().err
