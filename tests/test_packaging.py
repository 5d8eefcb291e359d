"""pyproject.toml: the license as an SPDX string, which setuptools builds without a warning."""

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What an sdist is built from (tests/test_wheel.py builds the whole distribution).
SOURCE_ITEMS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "docs")


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
    pytest.importorskip("build")
    source = tmp_path / "source"
    source.mkdir()
    built = shutil.ignore_patterns("*.so", "*.c", "__pycache__")
    for item in SOURCE_ITEMS:
        path = ROOT / item
        if path.is_dir():
            shutil.copytree(path, source / item, ignore=built)
        elif path.exists():
            shutil.copy(path, source / item)
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
