"""Fixtures of the client tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.control_support import short_tmp_dir


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A directory for control sockets (a short path: AF_UNIX paths are limited)."""
    with short_tmp_dir() as root:
        yield root
