"""Fixtures shared by the whole test suite."""

import json
from pathlib import Path
from typing import Any

import pytest

# The evidence of wire compatibility travels with the code (tests/vectors/README.md).
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


def _load_vectors(name: str) -> dict[str, Any]:
    path = VECTORS_DIR / name
    if not path.is_file():
        # A missing capture would silently drop every compatibility check.
        pytest.fail(f"test vector {path} is missing; it is part of the repository")
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
