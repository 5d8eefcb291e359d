"""The distribution: sdist -> wheel with the compiled extension -> a fresh venv.

Builds from a clean copy of the source tree (so the sdist must carry all that
setup.py needs: the wheel is built from the unpacked sdist), installs the
wheel with its dependencies from PyPI into a new venv without the system
site-packages, and runs the unit tests against the installed package from a
copy of the tests, with ``src/`` nowhere on the path. Needs the network to
PyPI; takes well under a minute with a warm pip cache.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

import p2pvpn
from p2pvpn.netns import missing_requirements

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What the sdist is built from: a clean checkout's top level (plus an optional README/LICENSE).
SOURCE_ITEMS = ("pyproject.toml", "setup.py", "MANIFEST.in", "src", "tests", "docs")
UNIT_TESTS = ("tests/wire", "tests/test_config.py", "tests/dataplane")
BUILD_ARTIFACTS = shutil.ignore_patterns(
    "__pycache__", "*.py[cod]", "*.so", "*.egg-info", "*.c", "*.html", ".hypothesis"
)
TIMEOUT = 300  # per step; the whole test normally takes 30-60 s

INSTALLED_CHECK = '''\
"""Added by test_wheel: proves these tests run against the installed wheel."""

import sys
from pathlib import Path

import p2pvpn
import p2pvpn._fastpath
import p2pvpn._gcm


def test_p2pvpn_comes_from_the_venv() -> None:
    prefix = Path(sys.prefix).resolve()
    assert Path(p2pvpn.__file__).resolve().is_relative_to(prefix), p2pvpn.__file__
    assert Path(p2pvpn._fastpath.__file__).resolve().is_relative_to(prefix)
    assert Path(p2pvpn._gcm.__file__).resolve().is_relative_to(prefix)
    assert not any(Path(entry).name == "src" for entry in sys.path), sys.path
'''


PYTEST_INI = """\
[pytest]
addopts = -ra --strict-markers
faulthandler_timeout = 120
markers =
    netns: needs root
    slow: slow
"""


def _env() -> dict[str, str]:
    """The environment without anything that would put the source tree on the path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(argv: Sequence[str | Path], cwd: Path) -> str:
    command = " ".join(map(str, argv))
    try:
        result = subprocess.run(
            [str(arg) for arg in argv],
            cwd=cwd,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{command} did not finish within {TIMEOUT} s\n"
            f"--- stdout\n{_tail(exc.stdout)}\n--- stderr\n{_tail(exc.stderr)}"
        )
    if result.returncode != 0:
        pytest.fail(
            f"{command} exited {result.returncode}\n"
            f"--- stdout\n{_tail(result.stdout)}\n--- stderr\n{_tail(result.stderr)}"
        )
    return result.stdout


def _tail(output: str | bytes | None, size: int = 8000) -> str:
    if output is None:
        return ""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return text[-size:]


def _copy_source(destination: Path) -> None:
    destination.mkdir()
    items = [*SOURCE_ITEMS, *(path.name for path in ROOT.glob("*.md")), "LICENSE"]
    for name in dict.fromkeys(items):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=BUILD_ARTIFACTS)
        elif source.is_file():
            shutil.copy2(source, destination / name)


def _require_build() -> None:
    try:
        import build  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the `build` package is missing (pip install -e '.[test]')")
        pytest.skip("the `build` package is not installed (pip install build)")


def _check_sdist(sdist: Path) -> None:
    """Everything setup.py needs to compile the extensions, and nothing built."""
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
    for needed in (
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        *(
            f"src/p2pvpn/{path.name}"
            for pattern in ("*.pyx", "*.pxd", "*.pxi")
            for path in (ROOT / "src" / "p2pvpn").glob(pattern)
        ),
        "src/p2pvpn/data/p2pvpn@.service",
        "src/p2pvpn/data/p2pvpn-server.service",
        "src/p2pvpn/py.typed",
    ):
        assert needed in names, needed
    if (ROOT / "README.md").is_file():
        assert "README.md" in names
    assert not any(name.endswith((".so", ".pyc", ".c")) for name in names)


def _check_wheel(wheel: Path) -> None:
    """The compiled extensions and the unit templates; no C source, no tests."""
    assert wheel.name.startswith(f"p2pvpn-{p2pvpn.__version__}-cp3")
    assert "linux" in wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("_gcm", "_fastpath"):
        assert any(name.startswith(f"p2pvpn/{module}.") and name.endswith(".so") for name in names)
    assert {"p2pvpn/data/p2pvpn@.service", "p2pvpn/data/p2pvpn-server.service"} <= names
    assert not any(name.endswith(".c") for name in names)
    assert not any(name.startswith("tests/") for name in names)


def _check_installed(venv: Path, cwd: Path) -> None:
    """The console script, the package and its extension all come from the venv."""
    python, script = venv / "bin" / "python", venv / "bin" / "p2pvpn"
    assert _run([script, "--version"], cwd=cwd) == f"p2pvpn {p2pvpn.__version__}\n"
    probe = (
        "import json, p2pvpn, p2pvpn._fastpath, p2pvpn.service as s; "
        "print(json.dumps([p2pvpn.__file__, p2pvpn._fastpath.__file__, "
        "len(s.unit_template(server=False))]))"
    )
    package, extension, unit_size = json.loads(_run([python, "-c", probe], cwd=cwd))
    assert Path(package).is_relative_to(venv), package
    assert Path(extension).is_relative_to(venv), extension
    assert unit_size > 0
    # The console script puts itself into the unit it writes.
    unit = _run([script, "install-service", "lab", "--dry-run", "--prefix", cwd], cwd=cwd)
    assert f"ExecStart={script} run -c /etc/p2pvpn/%i.cfg " in unit


def _check_bench(venv: Path, cwd: Path) -> None:
    """`p2pvpn bench` from the wheel alone (no checkout, no iperf3 needed): crypto with
    the compiled rows measured, --plot without the `plot` extra saying how to get it,
    and (as root) a local run measured by the package's own traffic tool."""
    script, out = venv / "bin" / "p2pvpn", cwd / "crypto.json"
    _run([script, "bench", "crypto", "--quick", "--threads", "0", "--json", out], cwd=cwd)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["machine"]["compiled"] is True
    assert report["ok"] is True
    plot = subprocess.run(
        [script, "bench", "crypto", "--quick", "--threads", "0", "--plot", cwd / "c.png"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert plot.returncode == 1
    assert "pip install 'p2pvpn[plot]'" in plot.stderr
    if not missing_requirements():
        # Root and namespaces: the local bench's traffic agents run from the wheel too
        # (the raw path only, to stay short; tests/bench/test_local.py runs every variant).
        out = cwd / "local.json"
        argv = [script, "bench", "local", "--quick", "--only", "raw", "--no-udp", "--json", out]
        _run(argv, cwd=cwd)
        local = json.loads(out.read_text(encoding="utf-8"))
        assert local["options"]["tool"] == "own"
        assert local["results"]["raw"]["tcp"]["bits_per_second"] > 0


def _run_unit_tests(python: Path, run: Path) -> str:
    """The unit tests, from a copy, against the installed package.

    The copy carries tests/vectors, the Candy captures, as the repository does.
    """
    project = run / "project"
    (project / "tests").mkdir(parents=True)
    # The suite's own helper modules that the copied tests import: all of
    # them, so that a new one cannot be forgotten here.
    for helper in (ROOT / "tests").glob("*.py"):
        if not helper.name.startswith("test_"):
            shutil.copy2(helper, project / "tests" / helper.name)
    # And the helpers that live in a test package's __init__ (tests.fuzz's
    # strategies, which the data-plane property tests use).
    for package in (ROOT / "tests").glob("*/__init__.py"):
        (project / "tests" / package.parent.name).mkdir(exist_ok=True)
        shutil.copy2(package, project / "tests" / package.parent.name / "__init__.py")
    shutil.copytree(ROOT / "tests" / "vectors", project / "tests" / "vectors")
    for name in UNIT_TESTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=BUILD_ARTIFACTS, dirs_exist_ok=True)
        else:
            shutil.copy2(source, project / name)
    (project / "tests" / "test_installed.py").write_text(INSTALLED_CHECK)
    (project / "pytest.ini").write_text(PYTEST_INI)
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return _run([*argv, *UNIT_TESTS, "tests/test_installed.py"], cwd=project)


def test_wheel_installs_into_a_fresh_venv_and_passes_the_unit_tests(tmp_path: Path) -> None:
    _require_build()
    source, dist = tmp_path / "source", tmp_path / "dist"
    _copy_source(source)

    # sdist first, then the wheel from the unpacked sdist (`python -m build`'s default).
    _run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=tmp_path)
    [sdist] = dist.glob("p2pvpn-*.tar.gz")
    [wheel] = dist.glob("p2pvpn-*.whl")
    assert sdist.name == f"p2pvpn-{p2pvpn.__version__}.tar.gz"
    _check_sdist(sdist)
    _check_wheel(wheel)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel, "pytest", "hypothesis"], cwd=tmp_path)
    _check_installed(venv, tmp_path)
    _check_bench(venv, tmp_path)

    out = _run_unit_tests(python, tmp_path / "run")
    assert " passed" in out
    assert " failed" not in out
