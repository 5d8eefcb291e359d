"""Fixtures and hooks of the namespace test bed (library: tests/netns.py).

* ``testbed``: a `TestBed` per test; every process is stopped and every
  namespace deleted at teardown, also when the test fails.
* A failing test's report gets a "test bed logs" section with the last 80
  lines of every process log.
* Tests using ``testbed`` are marked ``netns`` (deselect with ``-m "not netns"``);
  tests marked ``netns`` skip (fail when CI=true) without root, /dev/net/tun or ip.
* Session start deletes namespaces of dead earlier runs; session end deletes
  whatever of this run is left.
"""

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.integration.faults_support import Record
from tests.netns import (
    TestBed,
    cleanup_run,
    missing_requirements,
    open_testbed,
    require_netns,
    sweep_stale_namespaces,
)

BED_KEY = pytest.StashKey[TestBed]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
LOG_LINES = 80


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
