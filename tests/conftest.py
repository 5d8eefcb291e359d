"""Fixtures shared by the whole test suite."""

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.logs import secret_filter
from tests import REPO_ROOT

# The evidence of wire compatibility travels with the code (tests/vectors/README.md).
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


def _fast_plane_missing() -> str | None:
    """Why the compiled data plane cannot be tested here, or None."""
    try:
        from p2pvpn._fastpath import FastDataPlane  # noqa: F401
    except ImportError as error:
        return f"the compiled data plane p2pvpn._fastpath is not built: {error}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """The fastpath mark; and processes the tests start import ``tests`` as pytest does.

    `p2pvpn.netns.process_env` puts this p2pvpn (the checkout's src) first on
    their PYTHONPATH (in namespaces, too); the checkout itself comes from here.
    """
    paths = [str(REPO_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path for path in paths if path))
    config.addinivalue_line(
        "markers",
        "fastpath: tests the compiled data plane; skipped without it, failed under CI=true",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A missing build must show: as a skip with the reason locally, and as a
    # failure in CI, which always builds it.
    if item.get_closest_marker("fastpath") is None:
        return
    missing = _fast_plane_missing()
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing} (CI=true: it must be built)", pytrace=False)
    pytest.skip(missing)


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


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every test that runs `p2pvpn.cli.main` installs a stderr handler on the
    captured stream of that test; without this, a later test's log line (a
    bench server's thread, say) would go to that closed stream."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    secret_filter().clear()  # `run -p ...` registered the password
