"""Fixtures, hooks and the CI rule of the namespace test bed (library: `p2pvpn.netns`).

* `require_netns` / `require_tool`: skip a test without root, /dev/net/tun,
  ip (or the tool), but fail it when CI=true: namespace tests must run in CI.
* ``testbed``: a `TestBed` per test; every process is stopped and every
  namespace deleted at teardown, also when the test fails.
* A failing test's report gets a "test bed logs" section with the last 80
  lines of every process log.
* Tests using ``testbed`` are marked ``netns`` (deselect with ``-m "not netns"``);
  tests marked ``netns`` skip (fail when CI=true) without root, /dev/net/tun or ip.
* Session start deletes namespaces of dead earlier runs; session end deletes
  whatever of this run is left. Modules that ask for ``no_namespace_left_behind``
  fail when one of their tests left a namespace.
"""

import contextlib
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from p2pvpn.netns import (
    RUN_PREFIX,
    TestBed,
    VpnNetwork,
    cleanup_run,
    list_namespaces,
    missing_requirements,
    sweep_stale_namespaces,
)
from tests.integration.faults_support import WAN, Record

BED_KEY = pytest.StashKey[TestBed]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
LOG_LINES = 80


# -- skipping and failing -------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: namespace tests must run in CI)", pytrace=False)
    pytest.skip(reason)


def require_netns() -> None:
    """Skip the test (fail it when CI=true) unless namespace tests can run here."""
    missing = missing_requirements()
    if missing:
        _unavailable("network-namespace test needs " + ", ".join(missing))


def require_tool(tool: str, package: str | None = None) -> None:
    """Skip the test (fail it when CI=true) unless ``tool`` is on PATH."""
    if shutil.which(tool) is None:
        _unavailable(f"test needs the {tool} command (apt-get install {package or tool})")


@contextlib.contextmanager
def open_testbed(log_dir: Path | str) -> Iterator[TestBed]:
    """What the ``testbed`` fixture does: check requirements, build, always clean up."""
    require_netns()
    with TestBed(log_dir) as bed:
        yield bed


# -- hooks --------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        require_netns()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    bed = item.stash.get(BED_KEY, None)
    if bed is not None and report.failed and report.when in ("setup", "call"):
        report.sections.append((f"test bed logs (last {LOG_LINES} lines)", bed.logs(LOG_LINES)))
    return report


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture
def testbed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestBed]:
    """A fresh `TestBed`; process logs go to ``<tmp_path>/logs``."""
    with open_testbed(tmp_path / "logs") as bed:
        request.node.stash[BED_KEY] = bed
        yield bed


@pytest.fixture(scope="session", autouse=True)
def _netns_session_cleanup() -> Iterator[None]:
    if not missing_requirements():
        sweep_stale_namespaces()
    yield
    if not missing_requirements():
        cleanup_run()


@pytest.fixture(scope="module")
def no_namespace_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the module's last test when a namespace of this run is still there after it."""
    yield
    left = list_namespaces(RUN_PREFIX)
    assert not left, f"namespaces left behind by {request.module.__name__}: {left}"


@pytest.fixture
def vpn(testbed: TestBed, tmp_path: Path) -> VpnNetwork:
    """A p2pvpn network whose "internet" is `WAN`; no server started yet."""
    return VpnNetwork(testbed, tmp_path, wan=WAN)


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Record:
    """Record a measurement as a test property (JUnit XML) and print it."""

    def record(key: str, value: object) -> None:
        if isinstance(value, float):
            value = round(value, 2)
        # What record_property does, minus its warning under junit_family=xunit2.
        request.node.user_properties.append((key, value))
        print(f"MEASURED {key}={value}")

    return record
