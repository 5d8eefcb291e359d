"""Fixtures shared by the whole test suite."""

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests import REPO_ROOT


def pytest_configure(config: pytest.Config) -> None:
    """Processes the tests start (in namespaces, too) import ``tests`` like pytest does.

    `p2pvpn.netns.process_env` puts this p2pvpn (the checkout's src) first on
    their PYTHONPATH; the checkout itself comes from here.
    """
    paths = [str(REPO_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path for path in paths if path))


# The vectors live next to the repository (../shared/vectors), not inside it.
VECTORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "vectors"


def _load_vectors(name: str) -> dict[str, Any]:
    path = VECTORS_DIR / name
    if not path.is_file():
        pytest.skip(f"test vectors not available: {path} is missing")
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="session")
def candy_vectors() -> dict[str, Any]:
    """Bytes captured from a real Candy 6.1.8 client and server."""
    return _load_vectors("candy-captures.json")


@pytest.fixture(scope="session")
def rfc5769_vector() -> dict[str, Any]:
    """The RFC 5769 section 2.2 sample IPv4 binding response."""
    return _load_vectors("rfc5769-ipv4-response.json")
