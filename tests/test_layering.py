"""The import rules of docs/internals.md ("Map of the packages"), enforced.

Two rules matter most. The sans-I/O cores (the codecs in wire/, the peer
state machine and the relay core) import no socket, asyncio or websockets, so
they can be driven by tests and fuzzers without a network. And imports only
go down the floors: a module never imports from a floor above its own, so no
cycle can form and a lower floor can be reused (by the demo, the bench,
another front end) without dragging the higher ones in.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "p2pvpn"

# The sans-I/O cores, as paths below src/p2pvpn: a directory means every module in it.
SANS_IO = (
    "wire",
    "client/peer.py",
    "client/route_policy.py",
    "client/names.py",
    "server/relay.py",
    "server/names.py",
    "server/limits.py",
    "server/cluster_state.py",
)
IO_MODULES = frozenset({"socket", "asyncio", "websockets", "selectors", "ssl"})

# Floors, lowest first. A module may import from its own floor and below.
# Keys are the first component below p2pvpn ("wire" for p2pvpn.wire.ws).
FLOORS: dict[str, int] = {
    "__init__": 0,
    "_fastpath": 0,
    "_gcm": 0,
    "wire": 0,
    "_format": 0,
    "_files": 0,
    "_stats": 0,
    "logs": 0,
    "dataplane": 1,
    "config": 1,
    "control": 1,
    "metrics": 1,
    "netns": 1,
    "client": 2,
    "server": 2,
    "service": 2,
    "bench": 2,
    "demo": 3,
    "cli": 4,
    "__main__": 5,
}


def _modules() -> Iterator[Path]:
    yield from sorted(PACKAGE_DIR.rglob("*.py"))


def _component(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return parts[0]


def _is_submodule(name: str) -> bool:
    return (PACKAGE_DIR / name).is_dir() or (PACKAGE_DIR / f"{name}.py").is_file()


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import, function-local ones included."""
    package = ".".join(("p2pvpn", *path.relative_to(PACKAGE_DIR).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield node.lineno, name
            if name == "p2pvpn":
                # "from p2pvpn import client" imports a subpackage.
                for alias in node.names:
                    if _is_submodule(alias.name):
                        yield node.lineno, f"p2pvpn.{alias.name}"


def _is_sans_io(path: Path) -> bool:
    relative = path.relative_to(PACKAGE_DIR).as_posix()
    return any(relative == core or relative.startswith(f"{core}/") for core in SANS_IO)


@pytest.mark.parametrize(
    "path",
    [path for path in _modules() if _is_sans_io(path)],
    ids=lambda path: path.relative_to(PACKAGE_DIR).as_posix(),
)
def test_sans_io_cores_import_no_io(path: Path) -> None:
    offending = [
        f"line {line}: {name}" for line, name in _imports(path) if name.split(".")[0] in IO_MODULES
    ]
    assert not offending, f"{path.name} is a sans-I/O core but imports {offending}"


def test_the_sans_io_cores_exist() -> None:
    # A rename must move the rule with it, not silently drop it.
    for core in SANS_IO:
        assert (PACKAGE_DIR / core).exists(), f"{core} named in SANS_IO does not exist"


def test_every_module_has_a_floor() -> None:
    unmapped = {_component(path) for path in _modules()} - set(FLOORS)
    assert not unmapped, f"add {sorted(unmapped)} to FLOORS and to docs/internals.md"


@pytest.mark.parametrize(
    "path", list(_modules()), ids=lambda path: path.relative_to(PACKAGE_DIR).as_posix()
)
def test_imports_only_go_down_the_floors(path: Path) -> None:
    own = FLOORS.get(_component(path))
    if own is None:
        pytest.fail(f"{path} has no floor")
    upward = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "p2pvpn" or len(parts) == 1:
            continue
        floor = FLOORS.get(parts[1])
        if floor is None or floor > own:
            upward.append(f"line {line}: {name} (floor {floor}, own {own})")
    assert not upward, f"{path.relative_to(PACKAGE_DIR)} imports upward: {upward}"
