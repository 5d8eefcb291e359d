"""Fixtures of the server tests: a nats-server of the test's own on loopback."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pvpn.netns import LocalNatsServer
from tests.integration.conftest import require_tool


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[LocalNatsServer]:
    """A JetStream nats-server on a free loopback port, stopped after the test.

    Skipped without nats-server, failed instead when CI=true (.ci/run installs it).
    """
    require_tool("nats-server")
    with LocalNatsServer(tmp_path / "nats") as server:
        yield server
