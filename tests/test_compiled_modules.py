"""The compiled modules against the Python code they run with.

A build from other sources than the Python side must not import (each module
compares the constants it shares with Python at import), and a missing build
must show in the data-plane tests: a skip with the reason, a failure in CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _import_after(patch: str, module: str) -> subprocess.CompletedProcess[str]:
    """Import `module` in a fresh interpreter after running `patch`."""
    code = f"{patch}\nimport {module}\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_both_modules_import_with_the_python_code_they_were_built_from() -> None:
    result = _import_after("", "p2pvpn._gcm, p2pvpn._fastpath")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("patch", "module", "named"),
    [
        (
            "import p2pvpn.dataplane.base as base; base.BATCH_SIZE = 32",
            "p2pvpn._fastpath",
            "p2pvpn.dataplane.base.BATCH_SIZE is 64 in p2pvpn._fastpath but 32 in Python",
        ),
        (
            "import p2pvpn.dataplane.base as base; base.FORWARD_TYPE = 9",
            "p2pvpn._fastpath",
            "p2pvpn.dataplane.base.FORWARD_TYPE is 1 in p2pvpn._fastpath but 9 in Python",
        ),
        (
            "import p2pvpn.dataplane.replay as replay; replay.REPLAY_BUCKETS = 4",
            "p2pvpn._fastpath",
            "p2pvpn.dataplane.replay.REPLAY_BUCKETS is 3 in p2pvpn._fastpath but 4 in Python",
        ),
        (
            "import p2pvpn.wire.crypto as crypto; crypto.IV_SIZE = 16",
            "p2pvpn._gcm",
            "p2pvpn.wire.crypto.IV_SIZE is 12 in p2pvpn._gcm but 16 in Python",
        ),
    ],
    ids=["batch-size", "forward-type", "replay-buckets", "iv-size"],
)
def test_a_constant_that_differs_from_python_fails_the_import_and_is_named(
    patch: str, module: str, named: str
) -> None:
    result = _import_after(patch, module)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert named in result.stderr, result.stderr


# Loaded with -p before any test module: the compiled data plane cannot be imported.
BLOCKER = """\
import sys

sys.modules["p2pvpn._fastpath"] = None
"""

# A test for each way the data-plane tests pick the compiled plane: the
# `backend` fixture, a module of fast-only tests, and the fuzz tests' planes.
SELECTED = (
    "tests/dataplane/test_dataplane.py::test_packets_reach_the_peer_byte_for_byte",
    "tests/dataplane/test_fast_specific.py::test_workers_move_packets_while_the_gil_is_held",
    "tests/fuzz/test_fuzz_dataplane.py::test_garbage_over_real_udp_is_counted_and_the_path_survives",
)


def _run_without_the_fast_plane(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "block_fastpath.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "block_fastpath",
         "-p", "no:cacheprovider", "-p", "no:randomly", *SELECTED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )  # fmt: skip


def test_without_the_compiled_plane_its_tests_are_skipped_with_the_reason(
    tmp_path: Path,
) -> None:
    result = _run_without_the_fast_plane(tmp_path, ci="")
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout + result.stderr
    # fast and fast-offload of the first test, and one each of the others.
    assert "2 passed, 4 skipped" in summary, result.stdout
    assert "the compiled data plane p2pvpn._fastpath is not built" in result.stdout


def test_without_the_compiled_plane_ci_fails_its_tests(tmp_path: Path) -> None:
    result = _run_without_the_fast_plane(tmp_path, ci="true")
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1, result.stdout + result.stderr
    # pytest.fail in the setup: reported as errors, which fail the run.
    assert "2 passed, 4 errors" in summary, result.stdout
    assert "CI=true: it must be built" in result.stdout
    assert "skipped" not in summary
