"""The compatibility evidence is inside the repository, unchanged."""

import hashlib
import re
from pathlib import Path

import pytest

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
# The team's shared folder, beside the repository on our machines only.
SHARED_VECTORS_DIR = VECTORS_DIR.parents[2] / "shared" / "vectors"


def _recorded_hashes() -> dict[str, str]:
    """File name -> sha256 from the table in tests/vectors/README.md."""
    readme = (VECTORS_DIR / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.MULTILINE)
    return dict(rows)


def test_every_vector_file_is_recorded_in_the_readme() -> None:
    present = {path.name for path in VECTORS_DIR.glob("*.json")}
    assert present == set(_recorded_hashes())


@pytest.mark.parametrize("name", sorted(_recorded_hashes()))
def test_vector_file_has_the_recorded_hash(name: str) -> None:
    path = VECTORS_DIR / name
    assert path.is_file(), f"{path} is missing"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _recorded_hashes()[name]


@pytest.mark.parametrize("name", sorted(_recorded_hashes()))
def test_copy_matches_the_shared_folder_where_there_is_one(name: str) -> None:
    shared = SHARED_VECTORS_DIR / name
    if not shared.is_file():
        # A clone elsewhere has only its own copy, which the hash test checks.
        return
    assert (VECTORS_DIR / name).read_bytes() == shared.read_bytes()


def test_a_missing_vector_fails_instead_of_skipping() -> None:
    from tests.conftest import _load_vectors

    with pytest.raises(pytest.fail.Exception, match=r"absent\.json is missing"):
        _load_vectors("absent.json")
