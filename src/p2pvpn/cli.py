"""Command-line entry point: ``p2pvpn run | server | status | demo | check-config``."""

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from p2pvpn import __version__
from p2pvpn.config import (
    DATAPLANES,
    DEFAULT_STATE_ROOT,
    ClientConfig,
    ConfigError,
    ConfigValue,
    ServerConfig,
    client_config_from_values,
    effective_items,
    load_config,
    read_config_values,
    server_config_from_values,
    validate_name,
)

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "p2pvpn-stderr"
EXIT_USAGE = 2


class _RunClient(Protocol):
    def __call__(self, config: ClientConfig, *, debug: bool) -> int: ...


class _RunServer(Protocol):
    def __call__(self, config: ServerConfig, *, debug: bool) -> int: ...


class _PrintStatus(Protocol):
    def __call__(self, name: str | None, as_json: bool, state_root: Path) -> int: ...


class _UnavailableError(Exception):
    """A lazily imported part of p2pvpn is not installed."""


def configure_logging(debug: bool) -> None:
    """Log to stderr at DEBUG (``debug``) or INFO; safe to call again to change the level."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# Flags that set a config key: (config key, flags, argparse options). The dest is the
# key and the origin of the value (shown in errors) is the last, long, flag.
_Flag = tuple[str, tuple[str, ...], dict[str, Any]]

_COMMON_FLAGS: tuple[_Flag, ...] = (
    ("websocket", ("-w", "--websocket"), {"metavar": "URL", "help": "server URL"}),
    ("password", ("-p", "--password"), {"metavar": "SECRET", "help": "network password"}),
)
_DEBUG_FLAG: _Flag = (
    "debug",
    ("-d", "--debug"),
    {"action": "store_const", "const": True, "help": "debug logging"},
)
_METRICS_FLAG: _Flag = (
    "metrics",
    ("--metrics",),
    {"metavar": "HOST:PORT", "help": "serve metrics on HOST:PORT"},
)
_RUN_FLAGS: tuple[_Flag, ...] = (
    *_COMMON_FLAGS,
    ("tun", ("-t", "--tun"), {"metavar": "CIDR", "help": "static address, e.g. 10.0.0.1/24"}),
    ("name", ("-n", "--name"), {"help": "interface suffix: the device is p2pvpn-NAME"}),
    ("stun", ("-s", "--stun"), {"metavar": "URL", "help": "STUN server, stun://host[:port]"}),
    ("port", ("--port",), {"help": "local UDP port (0 = any)"}),
    ("mtu", ("--mtu",), {"help": "TUN MTU (default 1400)"}),
    ("route", ("-r", "--route"), {"metavar": "COST", "help": "relay cost 0..1000 (0 = off)"}),
    ("discovery", ("--discovery",), {"metavar": "SECONDS", "help": "discovery interval"}),
    ("localhost", ("--localhost",), {"metavar": "IP", "help": "LAN IPv4 address to advertise"}),
    ("state_dir", ("--state-dir",), {"metavar": "DIR", "help": "state directory of this client"}),
    ("dataplane", ("--dataplane",), {"choices": DATAPLANES, "help": "data plane (auto)"}),
    (
        "tls_verify",
        ("--no-tls-verify",),
        {"action": "store_const", "const": False, "help": "do not verify the wss:// certificate"},
    ),
    _METRICS_FLAG,
    _DEBUG_FLAG,
)
_SERVER_FLAGS: tuple[_Flag, ...] = (
    *_COMMON_FLAGS,
    ("dhcp", ("--dhcp",), {"metavar": "CIDR", "help": "address pool, e.g. 10.0.0.0/24"}),
    ("sdwan", ("--sdwan",), {"metavar": "RULES", "help": "dev_cidr,dst_cidr,nexthop;..."}),
    ("stun_port", ("--stun-port",), {"metavar": "PORT", "help": "STUN UDP port (0 = off)"}),
    _METRICS_FLAG,
    _DEBUG_FLAG,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pvpn", description="Peer-to-peer VPN for Linux, compatible with Candy."
    )
    parser.add_argument("--version", action="version", version=f"p2pvpn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a client")
    run.add_argument("-c", "--config", metavar="FILE", help="candy.cfg-style or .toml file")
    _add_flags(run, _RUN_FLAGS)
    run.set_defaults(handler=_cmd_run)

    server = commands.add_parser("server", help="run the signaling/relay server")
    server.add_argument("-c", "--config", metavar="FILE", help="candy.cfg-style or .toml file")
    _add_flags(server, _SERVER_FLAGS)
    server.set_defaults(handler=_cmd_server)

    status = commands.add_parser("status", help="show what a running client is doing")
    status.add_argument("-n", "--name", help="the client's name (as given to run)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_STATE_ROOT,
        help=f"root of the clients' state directories (default {DEFAULT_STATE_ROOT})",
    )
    status.set_defaults(handler=_cmd_status)

    demo = commands.add_parser("demo", help="a complete network on this machine (needs root)")
    demo.set_defaults(handler=_cmd_demo)

    check = commands.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_cmd_check_config)
    return parser


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[_Flag]) -> None:
    for key, names, options in flags:
        parser.add_argument(*names, dest=key, default=None, **options)


def _values(args: argparse.Namespace, flags: Sequence[_Flag]) -> tuple[dict[str, ConfigValue], str]:
    """The config file's values (if ``-c``) overlaid with the flags given."""
    path: str | None = args.config
    values = read_config_values(path) if path else {}
    for key, names, _ in flags:
        value: str | bool | None = getattr(args, key)
        if value is not None:
            values[key] = ConfigValue(value, names[-1])
    return values, path or "command line"


def _lazy(module: str, attribute: str) -> object:
    """``module.attribute``, imported only when a command needs it."""
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # a missing dependency inside the module is a real bug
        raise _UnavailableError(f"{module} is not available in this installation") from None
    return getattr(loaded, attribute)


def _cmd_run(args: argparse.Namespace) -> int:
    values, source = _values(args, _RUN_FLAGS)
    config = client_config_from_values(values, source)
    if config.debug:
        configure_logging(True)
    run_client = cast(_RunClient, _lazy("p2pvpn.client.node", "run_client"))
    return run_client(config, debug=config.debug)


def _cmd_server(args: argparse.Namespace) -> int:
    values, source = _values(args, _SERVER_FLAGS)
    config = server_config_from_values(values, source)
    if config.debug:
        configure_logging(True)
    run_server = cast(_RunServer, _lazy("p2pvpn.server.relay", "run_server"))
    return run_server(config, debug=config.debug)


def _cmd_status(args: argparse.Namespace) -> int:
    name = validate_name("name", ConfigValue(args.name, "--name")) if args.name else None
    print_status = cast(_PrintStatus, _lazy("p2pvpn.client.control", "print_status"))
    return print_status(name, bool(args.json), args.state_dir)


def _cmd_demo(args: argparse.Namespace) -> int:
    print("p2pvpn: demo: not available yet", file=sys.stderr)
    return EXIT_USAGE


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    items = effective_items(config)
    width = max(len(key) for key, _ in items)
    for key, value in items:
        print(f"{key:<{width}} = {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("p2pvpn: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(bool(getattr(args, "debug", False)))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _UnavailableError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
