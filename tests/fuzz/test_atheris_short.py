"""A short run of the coverage-guided datagram fuzzer (fuzz/fuzz_datagram.py) in CI.

The long runs are a command (fuzz/README.md); this keeps the harness working
and catches what a few seconds of coverage-guided fuzzing find.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[test]')")

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_datagram.py"
RUNS = 20000


def test_short_atheris_run_of_the_datagram_harness(tmp_path: Path) -> None:
    # cwd: libFuzzer writes crash-* artifacts to the working directory.
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-atheris_runs={RUNS}", "-max_total_time=40"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = result.stdout + result.stderr
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    assert result.returncode == 0, f"fuzzer failed (artifacts {crashes}):\n{output[-4000:]}"
    assert crashes == []
    assert "Done " in output, output[-2000:]
