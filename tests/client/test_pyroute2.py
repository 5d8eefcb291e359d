"""Tests of p2pvpn.client._pyroute2: the lean import of pyroute2's IPRoute.

Each check runs in a fresh interpreter, because what matters is which modules
an import loads, and this test process has imported pyroute2 long ago.
"""

import json
import subprocess
import sys
import textwrap
from typing import Any


def _run_in_fresh_interpreter(code: str) -> Any:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(completed.stdout)


def test_client_imports_iproute_without_the_rest_of_pyroute2() -> None:
    found = _run_in_fresh_interpreter(
        """
        import json, sys
        import p2pvpn.client.node
        from p2pvpn.client.tun import IPRoute, NetlinkError
        with IPRoute() as ipr:
            links = len(ipr.get_links())
        print(json.dumps({
            "iproute": f"{IPRoute.__module__}.{IPRoute.__name__}",
            "error_is_exception": issubclass(NetlinkError, Exception),
            "links": links,
            "ndb_loaded": "pyroute2.ndb.main" in sys.modules,
            "sqlite_loaded": "sqlite3" in sys.modules,
            "package_left_half_imported": "pyroute2" in sys.modules,
        }))
        """
    )
    assert found["iproute"] == "pyroute2.iproute.linux.IPRoute"
    assert found["error_is_exception"]
    assert found["links"] >= 1  # at least lo
    assert not found["ndb_loaded"]
    assert not found["sqlite_loaded"]
    assert not found["package_left_half_imported"]


def test_a_later_full_import_of_pyroute2_gets_the_same_classes() -> None:
    found = _run_in_fresh_interpreter(
        """
        import json
        from p2pvpn.client.tun import IPRoute, NetlinkError
        import pyroute2
        print(json.dumps({
            "same_iproute": pyroute2.IPRoute is IPRoute,
            "same_error": pyroute2.NetlinkError is NetlinkError,
            "ndb_available": hasattr(pyroute2, "NDB"),
        }))
        """
    )
    assert found == {"same_iproute": True, "same_error": True, "ndb_available": True}


def test_falls_back_to_the_ordinary_import_when_the_lean_one_fails() -> None:
    found = _run_in_fresh_interpreter(
        """
        import importlib.util, json, sys
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *args: (
            None if name == "pyroute2" else real_find_spec(name, *args)
        )
        from p2pvpn.client import _pyroute2
        iproute, error = _pyroute2.load()
        print(json.dumps({
            "iproute": iproute.__name__,
            "full_package_loaded": "pyroute2.ndb.main" in sys.modules,
        }))
        """
    )
    assert found == {"iproute": "IPRoute", "full_package_loaded": True}


def test_reuses_an_already_imported_pyroute2() -> None:
    found = _run_in_fresh_interpreter(
        """
        import json
        import pyroute2
        from p2pvpn.client import _pyroute2
        iproute, error = _pyroute2.load()
        print(json.dumps({"same": iproute is pyroute2.IPRoute}))
        """
    )
    assert found == {"same": True}
