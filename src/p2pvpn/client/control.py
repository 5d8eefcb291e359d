"""Where a client serves its control socket: ``control.sock`` in its state directory.

The socket itself (serving, asking, the password scrubbed) is `p2pvpn.control`;
`p2pvpn.client.status` is the asking end of ``p2pvpn status``.
"""

from collections.abc import Callable
from pathlib import Path

from p2pvpn.client.store import prepare_state_directory
from p2pvpn.control import ControlServer, Snapshot

__all__ = ["SOCKET_NAME", "client_control_server", "control_socket_path"]

SOCKET_NAME = "control.sock"


def control_socket_path(state_dir: Path) -> Path:
    """Where the client whose state directory is `state_dir` serves its control socket."""
    return state_dir / SOCKET_NAME


def _prepare_state_directory(path: Path) -> None:
    # Raises StateDirectoryError (an OSError) for a directory that is not private.
    prepare_state_directory(path.parent)


def client_control_server(path: Path, snapshot: Callable[[], Snapshot]) -> ControlServer:
    """The client's control server at `path`, its state directory made private first."""
    return ControlServer(path, snapshot, role="client", prepare=_prepare_state_directory)
