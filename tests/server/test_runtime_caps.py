"""The server process's own limits: RLIMIT_NOFILE raised at start, a short one logged."""

import logging
import resource
from ipaddress import IPv4Network

import pytest

from p2pvpn.config import ServerConfig
from p2pvpn.server import runtime as runtime_module


def test_the_open_files_limit_is_raised_and_a_short_one_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = {"now": (256, 2048)}

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        limits["now"] = value

    monkeypatch.setattr(runtime_module.resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(runtime_module.resource, "setrlimit", setrlimit)
    config = ServerConfig(websocket="ws://127.0.0.1:0/")
    with caplog.at_level(logging.WARNING, logger="p2pvpn.server.runtime"):
        assert runtime_module.raise_file_limit(config) == 2048
    assert limits["now"] == (2048, 2048)
    # 1024 pending logins + 4096 clients without a pool + spares > 2048.
    assert any("open files limit 2048" in record.getMessage() for record in caplog.records)
    caplog.clear()
    small = ServerConfig(
        websocket="ws://127.0.0.1:0/", max_unauthenticated=100, dhcp=IPv4Network("10.0.0.0/24")
    )
    limits["now"] = (1024, 4096)
    with caplog.at_level(logging.WARNING, logger="p2pvpn.server.runtime"):
        assert runtime_module.raise_file_limit(small) == 4096
    assert caplog.records == []
