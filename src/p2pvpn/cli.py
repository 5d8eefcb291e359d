"""Command-line entry point.

``p2pvpn run | server | status | demo | bench | check-config | install-service``.
"""

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from p2pvpn import __version__
from p2pvpn.config import (
    DATAPLANES,
    DEFAULT_STATE_ROOT,
    OFFLOADS,
    ClientConfig,
    ConfigError,
    ConfigValue,
    ServerConfig,
    client_config_from_values,
    config_from_values,
    effective_items,
    overlay_values,
    read_config_values,
    server_config_from_values,
    server_control_socket_from_values,
    validate_name,
)
from p2pvpn.logs import LOG_FORMATS, TEXT_FORMAT, LogFormat, install_secret_filter, make_formatter
from p2pvpn.logs import secret_filter as _secret_filter
from p2pvpn.service import DEFAULT_CONFIG_DIR, DEFAULT_UNIT_DIR, ServiceError, install_service

logger = logging.getLogger(__name__)

LOG_FORMAT = TEXT_FORMAT
_HANDLER_NAME = "p2pvpn-stderr"
EXIT_USAGE = 2


def configure_logging(debug: bool, log_format: LogFormat = "text") -> None:
    """Log to stderr at DEBUG (``debug``) or INFO, as text or JSON lines.

    Safe to call again to change the level or the format. The handler carries
    the secret filter (:func:`p2pvpn.logs.install_secret_filter`).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(_secret_filter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# Flags that set a config key: (config key, flags, argparse options). The dest is the
# key and the origin of the value (shown in errors) is the last, long, flag.
_Flag = tuple[str, tuple[str, ...], dict[str, Any]]

_COMMON_FLAGS: tuple[_Flag, ...] = (
    (
        "password",
        ("-p", "--password"),
        {
            "metavar": "SECRET",
            "help": "network password; - reads it from standard input (shown in ps otherwise: "
            "prefer --password-file or P2PVPN_PASSWORD)",
        },
    ),
    (
        "password_file",
        ("--password-file",),
        {"metavar": "FILE", "help": "read the network password from FILE (its first line)"},
    ),
)
_DEBUG_FLAG: _Flag = (
    "debug",
    ("-d", "--debug"),
    {"action": "store_const", "const": True, "help": "debug logging"},
)
_LOG_FORMAT_FLAG: _Flag = (
    "log_format",
    ("--log-format",),
    {"choices": LOG_FORMATS, "help": "log lines on stderr: text (default) or json"},
)
_METRICS_FLAG: _Flag = (
    "metrics",
    ("--metrics",),
    {"metavar": "HOST:PORT", "help": "serve metrics on HOST:PORT"},
)
_RUN_FLAGS: tuple[_Flag, ...] = (
    (
        "websocket",
        ("-w", "--websocket"),
        {
            "metavar": "URL",
            "action": "append",
            "help": "server URL; repeat it for servers to fail over to, tried in order "
            "(replaces the config file's list)",
        },
    ),
    *_COMMON_FLAGS,
    ("tun", ("-t", "--tun"), {"metavar": "CIDR", "help": "static address, e.g. 10.0.0.1/24"}),
    ("name", ("-n", "--name"), {"help": "interface suffix: the device is p2pvpn-NAME"}),
    ("stun", ("-s", "--stun"), {"metavar": "URL", "help": "STUN server, stun://host[:port]"}),
    ("port", ("--port",), {"help": "local UDP port (0 = any)"}),
    ("mtu", ("--mtu",), {"help": "TUN MTU (default 1400)"}),
    ("route", ("-r", "--route"), {"metavar": "COST", "help": "relay cost 0..1000 (0 = off)"}),
    ("discovery", ("--discovery",), {"metavar": "SECONDS", "help": "discovery interval"}),
    ("localhost", ("--localhost",), {"metavar": "IP", "help": "LAN IPv4 address to advertise"}),
    (
        "state_dir",
        ("--state-dir",),
        {"metavar": "DIR", "help": f"state directory of this client ({DEFAULT_STATE_ROOT}/NAME)"},
    ),
    ("dataplane", ("--dataplane",), {"choices": DATAPLANES, "help": "data plane (auto)"}),
    (
        "offload",
        ("--offload",),
        {"choices": OFFLOADS, "help": "TUN offloads: auto (with the fast data plane) or off"},
    ),
    (
        "tls_verify",
        ("--no-tls-verify",),
        {"action": "store_const", "const": False, "help": "do not verify the wss:// certificate"},
    ),
    (
        "accept_routes",
        ("--accept-routes",),
        {
            "metavar": "POLICY",
            "help": "sdwan routes to install: none, safe, all or CIDR,... (safe)",
        },
    ),
    (
        "tls_ca",
        ("--tls-ca",),
        {"metavar": "FILE", "help": "trust this CA (or self-signed) certificate for wss://"},
    ),
    (
        "bench_server",
        ("--bench-server",),
        {
            "action": "store_const",
            "const": True,
            "help": "answer `p2pvpn bench peer` from other members, on the VPN address only",
        },
    ),
    (
        "exit",
        ("--exit",),
        {"metavar": "NAME|IP", "help": "send all traffic through this member (an exit node)"},
    ),
    (
        "exit_allow_lan",
        ("--exit-allow-lan",),
        {
            "action": argparse.BooleanOptionalAction,
            "help": "with --exit: keep reaching the LAN directly (default: yes)",
        },
    ),
    ("hostname", ("--hostname",), {"metavar": "NAME", "help": "this member's name in the VPN"}),
    ("domain", ("--domain",), {"metavar": "DOMAIN", "help": "the VPN's DNS domain (vpn)"}),
    (
        "dns",
        ("--no-dns",),
        {"action": "store_const", "const": False, "help": "do not answer DNS on the VPN address"},
    ),
    (
        "exit_node",
        ("--exit-node",),
        {
            "action": "store_const",
            "const": True,
            "help": "offer this machine as an exit node: forward and masquerade (nftables) "
            "the members' internet traffic",
        },
    ),
    _METRICS_FLAG,
    _DEBUG_FLAG,
    _LOG_FORMAT_FLAG,
)
_SERVER_FLAGS: tuple[_Flag, ...] = (
    ("websocket", ("-w", "--websocket"), {"metavar": "URL", "help": "URL to listen on"}),
    *_COMMON_FLAGS,
    ("dhcp", ("--dhcp",), {"metavar": "CIDR", "help": "address pool, e.g. 10.0.0.0/24"}),
    ("sdwan", ("--sdwan",), {"metavar": "RULES", "help": "dev_cidr,dst_cidr,nexthop;..."}),
    ("stun_port", ("--stun-port",), {"metavar": "PORT", "help": "STUN UDP port (0 = off)"}),
    ("tls_cert", ("--tls-cert",), {"metavar": "FILE", "help": "PEM certificate for wss://"}),
    ("tls_key", ("--tls-key",), {"metavar": "FILE", "help": "PEM private key for wss://"}),
    _METRICS_FLAG,
    _DEBUG_FLAG,
    _LOG_FORMAT_FLAG,
    (
        "cluster",
        ("--cluster",),
        {
            "metavar": "URL",
            "action": "append",
            "help": "join the relay cluster on this NATS server (repeatable: several URLs)",
        },
    ),
    (
        "cluster_network",
        ("--cluster-network",),
        {"metavar": "NAME", "help": "the network's name on NATS (default p2pvpn)"},
    ),
    (
        "cluster_ttl",
        ("--cluster-ttl",),
        {"metavar": "SECONDS", "help": "how long a dead server's addresses stay held (15)"},
    ),
    (
        "cluster_credentials",
        ("--cluster-credentials",),
        {"metavar": "FILE", "help": "NATS credentials (.creds) file"},
    ),
    (
        "control_socket",
        ("--control-socket",),
        {"metavar": "PATH", "help": "unix socket that `p2pvpn server status` asks"},
    ),
)
# What `p2pvpn server status` takes besides -c: the rest only goes with running a server.
_SERVER_STATUS_KEYS = ("control_socket", "debug", "log_format")
SERVER_STATUS = "status"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pvpn", description="Peer-to-peer VPN for Linux, compatible with Candy."
    )
    parser.add_argument("--version", action="version", version=f"p2pvpn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_daemon_command(commands, "run", "run a client", _RUN_FLAGS, _cmd_run)
    server = _add_daemon_command(
        commands, "server", "run the signaling/relay server", _SERVER_FLAGS, _cmd_server
    )
    _add_server_status_arguments(server)
    _add_status_command(commands)
    _add_demo_command(commands)
    from p2pvpn.bench.cli import add_bench_command

    add_bench_command(commands, _cmd_bench)
    check = commands.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_cmd_check_config)
    _add_install_service_command(commands)
    return parser


# A string: argparse's subparsers action is generic only to type checkers.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_daemon_command(
    commands: _Commands,
    name: str,
    help_text: str,
    flags: tuple[_Flag, ...],
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    daemon = commands.add_parser(name, help=help_text)
    daemon.add_argument("-c", "--config", metavar="FILE", help="candy.cfg-style or .toml file")
    _add_flags(daemon, flags)
    daemon.set_defaults(handler=handler)
    return daemon


def _add_server_status_arguments(server: argparse.ArgumentParser) -> None:
    # An optional word rather than a sub-command: `p2pvpn server -w URL` runs a
    # server as it always did, `p2pvpn server status` asks the running one.
    server.add_argument(
        "action",
        nargs="?",
        choices=(SERVER_STATUS,),
        metavar=SERVER_STATUS,
        help="show what the running server is doing (sessions, cluster) instead of running one",
    )
    server.add_argument("--json", action="store_true", help="status: print JSON")


def _add_directory_option(
    parser: argparse.ArgumentParser, flag: str, default: Path, help_text: str
) -> None:
    parser.add_argument(flag, metavar="DIR", type=Path, default=default, help=help_text)


def _add_status_command(commands: _Commands) -> None:
    status = commands.add_parser("status", help="show what a running client is doing")
    status.add_argument("-n", "--name", help="the client's name (as given to run)")
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_directory_option(
        status,
        "--state-dir",
        DEFAULT_STATE_ROOT,
        "the client's state directory, as given to run --state-dir, or the directory "
        f"of the clients' state directories, one per NAME (default {DEFAULT_STATE_ROOT})",
    )
    status.set_defaults(handler=_cmd_status)


def _add_demo_command(commands: _Commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="a complete network on this machine (needs root)",
        description="Build a p2pvpn network in network namespaces on this machine (a server, "
        "two NAT routers, three clients), show the peers connecting, measure throughput over "
        "the direct and the relay path, then remove everything.",
    )
    _add_demo_flags(demo)
    demo.set_defaults(handler=_cmd_demo)


def _add_install_service_command(commands: _Commands) -> None:
    install = commands.add_parser(
        "install-service",
        help="install the systemd unit of a client (p2pvpn@NAME) or of the server",
        description=(
            "Write the systemd unit p2pvpn@.service (a client per /etc/p2pvpn/NAME.cfg) "
            "or, with --server, p2pvpn-server.service (/etc/p2pvpn/server.cfg)."
        ),
    )
    install.add_argument("name", metavar="NAME", nargs="?", help="network name (client)")
    install.add_argument("--server", action="store_true", help="install the server's unit")
    _add_directory_option(
        install,
        "--prefix",
        DEFAULT_UNIT_DIR,
        f"directory of the unit files (default {DEFAULT_UNIT_DIR})",
    )
    _add_directory_option(
        install,
        "--config-dir",
        DEFAULT_CONFIG_DIR,
        f"directory of the config files (default {DEFAULT_CONFIG_DIR})",
    )
    install.add_argument("--dry-run", action="store_true", help="print the unit, write nothing")
    install.add_argument("--force", action="store_true", help="replace a different unit")
    install.set_defaults(handler=_cmd_install_service)


DEMO_MAX_DURATION = 600


def _demo_duration(text: str) -> int:
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= seconds <= DEMO_MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{seconds} is outside 1..{DEMO_MAX_DURATION}")
    return seconds


def _add_demo_flags(demo: argparse.ArgumentParser) -> None:
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument(
        "--keep",
        action="store_true",
        help="leave the network running at the end (remove it later with --cleanup)",
    )
    mode.add_argument(
        "--cleanup", action="store_true", help="remove a demo left running with --keep"
    )
    demo.add_argument(
        "--duration",
        metavar="SECONDS",
        type=_demo_duration,
        help="length of each throughput run (default 3; 1 with --quick)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="CI mode: fewer pings, 1 s throughput runs"
    )
    demo.add_argument(
        "--dataplane", choices=DATAPLANES, help="data plane of the clients (default auto)"
    )
    demo.add_argument("--no-color", action="store_true", help="no colors in the output")
    demo.add_argument(
        "-d", "--debug", action="store_true", help="debug logs from server and clients"
    )


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[_Flag]) -> None:
    for key, names, options in flags:
        parser.add_argument(*names, dest=key, default=None, **options)


def _values(args: argparse.Namespace, flags: Sequence[_Flag]) -> tuple[dict[str, ConfigValue], str]:
    """The config file's values (if ``-c``) overlaid with the flags given and the environment."""
    path: str | None = args.config
    file_values = read_config_values(path) if path else {}
    flag_values: dict[str, ConfigValue] = {}
    for key, names, _ in flags:
        value: str | bool | list[str] | None = getattr(args, key)
        if key == "password" and value == "-":
            value = _read_password_from_stdin()
        if isinstance(value, list):  # a repeated flag (action="append")
            flag_values[key] = ConfigValue(tuple(value), names[-1])
        elif value is not None:
            flag_values[key] = ConfigValue(value, names[-1])
    return overlay_values(file_values, flag_values, os.environ), path or "command line"


def _read_password_from_stdin() -> str:
    """One line of standard input (``-p -``), without echo when it is a terminal."""
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            line = getpass.getpass("p2pvpn password: ")
        else:
            line = sys.stdin.readline() if sys.stdin is not None else ""
    except EOFError:
        line = ""
    except UnicodeDecodeError:
        # Not the exception's text: it quotes a byte of the input.
        raise ConfigError("--password -: standard input is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"--password -: cannot read standard input: {exc.strerror}") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError("--password -: no password on standard input (an empty line)")
    return password


def _apply_logging(config: ClientConfig | ServerConfig) -> None:
    """Mask the password in every log line, then log as the configuration says."""
    install_secret_filter(config.password)
    configure_logging(config.debug, config.log_format)


def _cmd_run(args: argparse.Namespace) -> int:
    values, source = _values(args, _RUN_FLAGS)
    config = client_config_from_values(values, source)
    _apply_logging(config)
    from p2pvpn.client.node import run_client

    return run_client(config)


def _cmd_server(args: argparse.Namespace) -> int:
    if args.action == SERVER_STATUS:
        return _cmd_server_status(args)
    if args.json:
        print("p2pvpn: error: --json only goes with `p2pvpn server status`", file=sys.stderr)
        return EXIT_USAGE
    values, source = _values(args, _SERVER_FLAGS)
    config = server_config_from_values(values, source)
    _apply_logging(config)
    from p2pvpn.server.runtime import run_server

    return run_server(config)


def _cmd_server_status(args: argparse.Namespace) -> int:
    running_only = [
        names[-1]
        for key, names, _ in _SERVER_FLAGS
        if key not in _SERVER_STATUS_KEYS and getattr(args, key) is not None
    ]
    if running_only:
        flags = ", ".join(running_only)
        print(
            f"p2pvpn: error: server status: {flags} only go with running a server "
            "(status takes -c, --control-socket and --json)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # Only the socket's key: status must not need the password file or the certificate.
    values = read_config_values(args.config) if args.config else {}
    if args.control_socket is not None:
        values["control_socket"] = ConfigValue(args.control_socket, "--control-socket")
    path = server_control_socket_from_values(values)
    from p2pvpn.server.status import print_server_status

    return print_server_status(path, as_json=bool(args.json))


def _cmd_status(args: argparse.Namespace) -> int:
    name = validate_name("name", ConfigValue(args.name, "--name")) if args.name else None
    from p2pvpn.client.status import print_status

    return print_status(name, bool(args.json), args.state_dir)


def _cmd_demo(args: argparse.Namespace) -> int:
    from p2pvpn.demo import DemoOptions, run_demo

    options = DemoOptions(
        keep=bool(args.keep),
        cleanup=bool(args.cleanup),
        duration=args.duration,
        quick=bool(args.quick),
        dataplane=args.dataplane,
        no_color=bool(args.no_color),
        debug=bool(args.debug),
    )
    return run_demo(options)


def _cmd_bench(args: argparse.Namespace) -> int:
    from p2pvpn.bench.cli import run_bench_command

    return run_bench_command(args)


def _cmd_check_config(args: argparse.Namespace) -> int:
    # As `run` and `server` would see it: P2PVPN_PASSWORD counts when the file has none.
    values = overlay_values(read_config_values(args.file), {}, os.environ)
    config = config_from_values(values, args.file)
    items = effective_items(config)
    width = max(len(key) for key, _ in items)
    for key, value in items:
        print(f"{key:<{width}} = {value}")
    return _check_certificate(config)


def _check_certificate(config: ClientConfig | ServerConfig) -> int:
    """A server's tls_cert/tls_key are read as `p2pvpn server` would: 1 if unusable."""
    if not isinstance(config, ServerConfig) or config.tls_cert is None or config.tls_key is None:
        return 0
    from p2pvpn.server.tls import TlsError, load_server_context

    try:
        _, certificate = load_server_context(config.tls_cert, config.tls_key)
    except TlsError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1
    print(f"# certificate: {certificate.describe()}")
    return 0


def _cmd_install_service(args: argparse.Namespace) -> int:
    if args.server and args.name is not None:
        print("p2pvpn: error: install-service --server takes no NAME", file=sys.stderr)
        return EXIT_USAGE
    if not args.server and args.name is None:
        print("p2pvpn: error: install-service needs a NAME (or --server)", file=sys.stderr)
        return EXIT_USAGE
    name = None if args.server else validate_name("NAME", ConfigValue(args.name, "install-service"))
    if name == "":
        print("p2pvpn: error: install-service: NAME must not be empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        return install_service(
            name,
            prefix=args.prefix,
            config_dir=args.config_dir,
            dry_run=bool(args.dry_run),
            force=bool(args.force),
        )
    except ServiceError as exc:
        print(f"p2pvpn: error: {exc}", file=sys.stderr)
        return 1


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
    configure_logging(
        bool(getattr(args, "debug", False)), getattr(args, "log_format", None) or "text"
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"p2pvpn: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if not _is_ours(exc.name):
            raise  # a missing dependency is a broken installation: show the traceback
        print(f"p2pvpn: error: {exc.name} is not available in this installation", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _is_ours(module: str | None) -> bool:
    """Whether `module` is a part of p2pvpn (a command's back end left out of the install)."""
    return module is not None and (module == "p2pvpn" or module.startswith("p2pvpn."))
