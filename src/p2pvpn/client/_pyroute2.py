"""pyroute2's ``IPRoute`` and ``NetlinkError`` without the rest of pyroute2.

``import pyroute2`` runs a package ``__init__`` that imports every API the
library has (NDB with sqlite3, IPDB, nftables, wireless, process helpers...):
about 11 MiB of resident memory in a client whose budget is 40 MB and that
only needs rtnetlink. Importing the two submodules we use with that
``__init__`` skipped costs about 5 MiB. The ``__init__`` only re-exports, so
skipping it changes no behaviour; if an installed pyroute2 ever disagrees,
the ordinary import is used instead.
"""

import importlib
import importlib.util
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

_PACKAGE = "pyroute2"


def _import_without_package_init() -> tuple[Any, Any]:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{_PACKAGE} is not installed as a package")
    # A package module that has not run its __init__: submodules import from
    # its __path__ as usual.
    sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    try:
        linux = importlib.import_module("pyroute2.iproute.linux")
        exceptions = importlib.import_module("pyroute2.netlink.exceptions")
    finally:
        # Whoever imports pyroute2 later gets the real package, __init__ and
        # all; the submodules loaded here are reused by it.
        del sys.modules[_PACKAGE]
    return linux.IPRoute, exceptions.NetlinkError


def load() -> tuple[Any, Any]:
    """Return ``(IPRoute, NetlinkError)``, importing as little as possible."""
    if _PACKAGE not in sys.modules:
        try:
            return _import_without_package_init()
        except (ImportError, AttributeError) as exc:
            logger.debug("lean pyroute2 import failed (%s); importing all of it", exc)
    import pyroute2
    from pyroute2.netlink.exceptions import NetlinkError

    return pyroute2.IPRoute, NetlinkError
