"""systemd units: ``p2pvpn install-service NAME [--server]``.

The package ships two unit templates (``p2pvpn/data/*.service``):

* ``p2pvpn@.service``, the client: the instance ``p2pvpn@NAME`` reads
  ``<config dir>/NAME.cfg``, runs with ``--name NAME`` (interface
  ``p2pvpn-NAME``) and keeps its state in ``/var/lib/p2pvpn/NAME``, so several
  networks run side by side on one host;
* ``p2pvpn-server.service``, the server, reading ``<config dir>/server.cfg``,
  as a transient unprivileged user (``DynamicUser=yes``) whose only capability
  is binding a low port.

The password is in ``<config dir>/NAME.password`` (``server.password``), one
line, mode 0600: the units pass it with ``LoadCredential=`` and
``--password-file``, so it is never on a command line; installing says where
it goes and warns when it is missing or readable by others.

Installing substitutes the command that runs this very p2pvpn (``@P2PVPN@``,
the console script or ``python -m p2pvpn`` of the running interpreter) and the
config directory (``@CONFIG_DIR@``), writes the unit (never replacing a
different one without ``force``) and prints the ``systemctl`` commands to run.
It does not call ``systemctl`` itself.
"""

import os
import re
import stat
import sys
from importlib import resources
from pathlib import Path
from typing import TextIO

from p2pvpn._files import write_atomically

__all__ = [
    "CLIENT_UNIT",
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_UNIT_DIR",
    "SERVER_UNIT",
    "ServiceError",
    "install_service",
    "p2pvpn_command",
    "render_unit",
    "unit_template",
]

CLIENT_UNIT = "p2pvpn@.service"
SERVER_UNIT = "p2pvpn-server.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CONFIG_DIR = Path("/etc/p2pvpn")

_COMMAND_TOKEN = "@P2PVPN@"
_CONFIG_DIR_TOKEN = "@CONFIG_DIR@"
_TOKEN_RE = re.compile(r"@[A-Z_]+@")
# Characters that need no quoting in a systemd command line word.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


class ServiceError(Exception):
    """The unit cannot be installed; the message says why and what to do."""


def unit_template(*, server: bool) -> str:
    """The unit template shipped in the package (with ``@P2PVPN@``/``@CONFIG_DIR@``)."""
    name = SERVER_UNIT if server else CLIENT_UNIT
    try:
        return (resources.files("p2pvpn") / "data" / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceError(f"{name} is missing from this installation of p2pvpn: {exc}") from exc


def p2pvpn_command(argv0: str | None = None, executable: str | None = None) -> list[str]:
    """The absolute command that runs this p2pvpn: its console script, else ``python -m``.

    ``argv0`` defaults to ``sys.argv[0]`` and ``executable`` to ``sys.executable``.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    if argv0 and Path(argv0).name == "p2pvpn":
        script = Path(os.path.abspath(argv0))
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    if not executable:
        raise ServiceError("cannot tell which Python runs p2pvpn (sys.executable is empty)")
    return [os.path.abspath(executable), "-m", "p2pvpn"]


def _systemd_word(word: str) -> str:
    """``word`` for a systemd command line: specifiers and variables escaped, quoted if needed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if _PLAIN_WORD_RE.fullmatch(escaped):
        return escaped
    quoted = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}"'


def render_unit(*, server: bool, command: list[str], config_dir: Path) -> str:
    """The unit text with the command and the config directory filled in."""
    if not config_dir.is_absolute():
        raise ServiceError(f"the config directory must be an absolute path, got {config_dir}")
    config = str(config_dir).rstrip("/") or "/"
    if not _PLAIN_WORD_RE.fullmatch(config) or "%" in config:
        raise ServiceError(f"unsupported characters in the config directory {config!r}")
    text = unit_template(server=server)
    text = text.replace(_COMMAND_TOKEN, " ".join(_systemd_word(word) for word in command))
    text = text.replace(_CONFIG_DIR_TOKEN, config)
    leftover = _TOKEN_RE.search(text)
    if leftover:
        raise ServiceError(f"unit template has an unknown placeholder {leftover.group()}")
    return text


def install_service(
    name: str | None,
    *,
    prefix: Path = DEFAULT_UNIT_DIR,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    dry_run: bool = False,
    force: bool = False,
    command: list[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Install the client unit (``name`` given) or the server unit (``name`` None).

    Returns the exit status (0, or 1 when a different unit is in the way);
    raises ServiceError when the unit cannot be written. ``name`` must be a
    valid network name (``config.validate_name``).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    server = name is None
    config_dir = Path(os.path.abspath(config_dir))
    unit_name = SERVER_UNIT if server else CLIENT_UNIT
    command = p2pvpn_command() if command is None else command
    text = render_unit(server=server, command=command, config_dir=config_dir)
    path = Path(os.path.abspath(prefix)) / unit_name
    config = config_dir / ("server.cfg" if server else f"{name}.cfg")
    password = config_dir / ("server.password" if server else f"{name}.password")
    instance = "p2pvpn-server" if server else f"p2pvpn@{name}"

    existing = _read_existing(path)
    if existing is not None and existing != text and not force and not dry_run:
        print(
            f"p2pvpn: error: {path} exists and differs from the unit this p2pvpn would "
            "write; use --force to replace it (or --dry-run to see the new one)",
            file=err,
        )
        return 1

    if dry_run:
        print(f"# {path} (dry run: nothing written)", file=out)
        print(text, end="" if text.endswith("\n") else "\n", file=out)
        if existing is not None and existing != text:
            print(f"note: {path} exists and differs; installing needs --force", file=err)
    elif existing == text:
        print(f"{path} is already up to date", file=out)
    else:
        _write_atomically(path, text)
        print(f"{'replaced' if existing is not None else 'wrote'} {path}", file=out)

    if not config.is_file():
        print(
            f"warning: {config} does not exist: create it before starting {instance} "
            f"(check it with `p2pvpn check-config {config}`)",
            file=err,
        )
    _check_password_file(password, instance, err)
    if server:
        _check_runs_as_anyone(Path(command[0]), err)
    _print_next_steps(instance, name, out)
    return 0


def _check_runs_as_anyone(program: Path, err: TextIO) -> None:
    """Warn when the server's unprivileged (dynamic) user could not run ``program``.

    A p2pvpn in a virtualenv under /root (mode 0700) starts as root, not as the
    server's unit's DynamicUser.
    """
    for directory in program.parents:
        try:
            mode = directory.stat().st_mode
        except OSError:
            return  # a path that does not exist here: nothing to judge
        if not mode & stat.S_IXOTH:
            print(
                f"warning: {directory} is not searchable by other users, so the server's "
                f"unprivileged user (DynamicUser=) cannot run {program}: install p2pvpn "
                "where every user can read it (e.g. /opt/p2pvpn)",
                file=err,
            )
            return


def _check_password_file(path: Path, instance: str, err: TextIO) -> None:
    """Say where the password goes (the unit's LoadCredential=) when it is not there yet."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        print(
            f"warning: {path} does not exist: put the network password there (one line, "
            f"`chmod 600 {path}`) before starting {instance}; systemd hands it to the service "
            "(LoadCredential=), so it is never on a command line. A password key in the "
            "config file is not used by the unit.",
            file=err,
        )
        return
    except OSError as exc:
        print(f"warning: cannot check {path}: {exc.strerror or exc}", file=err)
        return
    if mode & 0o077:
        print(
            f"warning: {path} is readable by group or others (mode {mode:04o}): "
            f"run `chmod 600 {path}`",
            file=err,
        )


def _print_next_steps(instance: str, name: str | None, out: TextIO) -> None:
    print("next:", file=out)
    print("  systemctl daemon-reload", file=out)
    print(f"  systemctl enable --now {instance}", file=out)
    if name is not None:
        print(f"  p2pvpn status -n {name}", file=out)
    print(f"  journalctl -u {instance} -f", file=out)


def _read_existing(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None  # writing says what is wrong with the directory
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"cannot read {path}: {exc}") from exc


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0644) through a temporary file and a rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text, mode=0o644)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from exc
