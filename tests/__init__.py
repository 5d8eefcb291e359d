"""p2pvpn's test suite (a package so that helpers import as ``tests.<module>``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout the tests run from."""
