"""pyproject.toml: the license as an SPDX string, which setuptools builds without a warning."""

import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from tests.test_wheel import _copy_source as copy_source
from tests.test_wheel import _require_build as require_build

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_an_spdx_string_without_a_license_classifier() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    # An SPDX license and a "License ::" classifier together are an error for setuptools.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]


def test_build_requires_a_setuptools_that_knows_spdx_strings() -> None:
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert match is not None and int(match.group(1)) >= 77, setuptools


@pytest.mark.slow
def test_sdist_builds_without_the_license_deprecation(tmp_path: Path) -> None:
    require_build()
    source = tmp_path / "source"
    copy_source(source)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "project.license" not in output
    [sdist] = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        member = next(name for name in archive.getnames() if name.endswith("/PKG-INFO"))
        extracted = archive.extractfile(member)
        assert extracted is not None
        metadata = extracted.read().decode()
    assert "License-Expression: MIT" in metadata.splitlines()
