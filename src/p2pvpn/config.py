"""Configuration: Candy's ``candy.cfg`` format and TOML -> typed, validated dataclasses.

Reading and validating are two steps so that the CLI can overlay command-line
flags on a file: :func:`read_config_values` turns a file into a mapping of key
-> :class:`ConfigValue` (the raw value and where it came from), and
:func:`client_config_from_values` / :func:`server_config_from_values` validate
such a mapping. :func:`load_config` does both for a file.

Every validation error is a :class:`ConfigError` naming the origin, the key and
the bad value, e.g. ``client.cfg:7: route: 1001 is outside 0..1000``; one error
carries every bad line or key of a file, so that one run reports them all. The
password never appears in an error, a log line, a ``repr`` or
:func:`effective_items`.
"""

import difflib
import logging
import os
import re
import ssl
import stat
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from p2pvpn.logs import LOG_FORMATS, LogFormat
from p2pvpn.wire.names import DEFAULT_DOMAIN, check_domain, clean_label

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPT_ROUTES_MODES",
    "CLUSTER_SCHEMES",
    "DATAPLANES",
    "DEFAULT_CLUSTER_NETWORK",
    "DEFAULT_CLUSTER_TTL",
    "DEFAULT_MTU",
    "DEFAULT_STATE_ROOT",
    "DEFAULT_STUN_PORT",
    "INTERFACE_PREFIX",
    "LOG_FORMATS",
    "OFFLOADS",
    "PASSWORD_ENV",
    "AcceptRoutes",
    "ClientConfig",
    "ConfigError",
    "ConfigValue",
    "Dataplane",
    "LogFormat",
    "Offload",
    "SdwanRule",
    "ServerConfig",
    "StunServer",
    "client_config_from_values",
    "config_from_values",
    "default_server_control_socket",
    "default_state_dir",
    "display_url",
    "effective_items",
    "load_config",
    "overlay_values",
    "parse_candy_text",
    "parse_toml_text",
    "read_config_values",
    "server_config_from_values",
    "server_control_socket_from_values",
    "validate_name",
    "warn_if_exposed",
]

DEFAULT_STUN_PORT = 3478
DEFAULT_MTU = 1400
DEFAULT_STATE_ROOT = Path("/var/lib/p2pvpn")
DEFAULT_SERVER_RUN_DIR = Path("/run/p2pvpn")
# The server's resource caps; p2pvpn.server.limits.ServerLimits has the same
# defaults (tests/test_config.py checks) and says what each one bounds.
DEFAULT_SEND_QUEUE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_UNAUTHENTICATED = 1024
DEFAULT_MAX_UNAUTHENTICATED_PER_IP = 32
DEFAULT_LOGIN_TIMEOUT = 5.0
DEFAULT_MAX_REPLAY_ENTRIES = 65536
DEFAULT_BROADCAST_RATE = 100
DEFAULT_MAX_BROADCAST_SIZE = 2048
DEFAULT_MAX_LEASES_PER_IP = 4
DEFAULT_STUN_RATE = 20
DEFAULT_JUNK_RATE = 200
DEFAULT_CLUSTER_NETWORK = "p2pvpn"
DEFAULT_CLUSTER_TTL = 15.0
# What nats-py connects with: nats/tls over TCP, ws/wss over WebSocket (not mixed).
CLUSTER_SCHEMES = ("nats", "tls", "ws", "wss")
_CLUSTER_NETWORK_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
INTERFACE_PREFIX = "p2pvpn"
IFNAMSIZ = 16  # Linux, including the terminating NUL

Dataplane = Literal["auto", "fast", "pure"]
DATAPLANES: tuple[Dataplane, ...] = ("auto", "fast", "pure")

# TUN offloads: auto = on when the data plane is the fast one and the kernel takes them.
Offload = Literal["auto", "off"]
OFFLOADS: tuple[Offload, ...] = ("auto", "off")

# accept_routes: a mode, or the networks that sdwan routes must lie inside.
AcceptRoutesMode = Literal["none", "safe", "all"]
ACCEPT_ROUTES_MODES: tuple[AcceptRoutesMode, ...] = ("none", "safe", "all")
AcceptRoutes = AcceptRoutesMode | tuple[IPv4Network, ...]

PASSWORD_MASK = "********"
# The password's last source: a flag (-p/--password, --password-file) beats the config
# file's password/password_file, which beat this variable. Env and files keep it out of ps.
PASSWORD_ENV = "P2PVPN_PASSWORD"
_PASSWORD_KEYS = ("password", "password_file")

# Keys of each mode, in display order (the order of effective_items()).
_COMMON_KEYS = ("mode", "websocket", "password", "password_file", "debug", "log_format")
_SERVER_KEYS = (
    *_COMMON_KEYS,
    *("dhcp", "sdwan", "stun_port", "metrics"),
    "tls_cert",
    "tls_key",
    # Resource caps (p2pvpn.server.limits.ServerLimits), one a line.
    "send_queue_bytes",
    "max_unauthenticated",
    "max_unauthenticated_per_ip",
    "login_timeout",
    "max_replay_entries",
    "broadcast_rate",
    "max_broadcast_size",
    "max_leases_per_ip",
    "stun_rate",
    "junk_rate",
    # The relay cluster (p2pvpn.server.cluster), one a line.
    "cluster",
    "cluster_network",
    "cluster_ttl",
    "cluster_credentials",
    "control_socket",
)
_CLIENT_KEYS = (
    *_COMMON_KEYS,
    *("name", "tun", "stun", "discovery", "route", "port", "localhost", "mtu"),
    *("state_dir", "tls_verify", "dataplane", "metrics"),
    "accept_routes",
    "tls_ca",
    "offload",
    "bench_server",
    "exit",
    "exit_allow_lan",
    # Peer names over DNS (issue 16), one a line.
    "hostname",
    "domain",
    "dns",
    "exit_node",
)
# Keys whose TOML array is a list of values in their own right (not joined with commas):
# a URL may hold a comma. candy.cfg has no lists; a flag repeats instead.
_LIST_KEYS = (
    "websocket",  # the client's servers, tried in order
    "cluster",  # the server's NATS URLs
)
# Keys Candy knows that p2pvpn does not implement.
_CANDY_ONLY_KEYS = ("restart", "workers")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used: one problem per bad line or key.

    Each problem names origin, key and value; the message is the problems, one a line.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ConfigValue:
    """One raw setting: the value as read and where it came from.

    ``origin`` is ``"file:line"`` for a candy.cfg line, ``"file:line"`` or
    ``"file"`` for TOML, or the flag name (``"--route"``) for a command-line flag.
    """

    value: str | int | bool | tuple[str, ...]  # a tuple only for the keys of _LIST_KEYS
    origin: str


@dataclass(frozen=True, slots=True)
class StunServer:
    host: str
    port: int = DEFAULT_STUN_PORT

    def __str__(self) -> str:
        return f"stun://{_show_endpoint((self.host, self.port))}"


@dataclass(frozen=True, slots=True)
class SdwanRule:
    """Clients whose tun ip is in ``device`` get a route ``destination`` via ``nexthop``."""

    device: IPv4Network
    destination: IPv4Network
    nexthop: IPv4Address

    def __str__(self) -> str:
        return f"{self.device},{self.destination},{self.nexthop}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    websocket: str  # ws://host:port/path to listen on
    password: str = field(default="", repr=False)
    password_file: Path | None = None  # where the password was read from, if from a file
    password_origin: str = field(default="", compare=False)  # file:line, flag or PASSWORD_ENV
    debug: bool = False
    dhcp: IPv4Network | None = None  # address pool; None: clients need a static tun
    sdwan: tuple[SdwanRule, ...] = ()
    stun_port: int = DEFAULT_STUN_PORT  # built-in STUN responder (UDP); 0 disables
    metrics: tuple[str, int] | None = None
    log_format: LogFormat = "text"  # stderr logs: "text" or "json" (one object a line)
    tls_cert: Path | None = None  # PEM certificate (chain) for wss://
    tls_key: Path | None = None  # its PEM private key, unencrypted
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_ip: int = DEFAULT_MAX_UNAUTHENTICATED_PER_IP
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    max_replay_entries: int = DEFAULT_MAX_REPLAY_ENTRIES
    broadcast_rate: int = DEFAULT_BROADCAST_RATE
    max_broadcast_size: int = DEFAULT_MAX_BROADCAST_SIZE
    max_leases_per_ip: int = DEFAULT_MAX_LEASES_PER_IP
    stun_rate: int = DEFAULT_STUN_RATE
    junk_rate: int = DEFAULT_JUNK_RATE
    cluster: tuple[str, ...] = ()  # NATS URLs; empty: a server on its own, no NATS anywhere
    cluster_network: str = DEFAULT_CLUSTER_NETWORK  # names the subjects and buckets on NATS
    cluster_ttl: float = DEFAULT_CLUSTER_TTL  # seconds an address outlives its silent holder
    cluster_credentials: Path | None = None  # a NATS .creds file (JWT + nkey seed)
    # Where `p2pvpn server status` asks; None: default_server_control_socket().
    control_socket: Path | None = None

    @property
    def control_socket_path(self) -> Path:
        """The control socket this server serves (``control_socket`` or the default)."""
        return self.control_socket or default_server_control_socket()


@dataclass(frozen=True, slots=True)
class ClientConfig:
    websocket: str  # ws:// or wss:// URL of the server: the first of `websockets`
    # Every server URL in the order the client tries them; () means (websocket,).
    websockets: tuple[str, ...] = ()
    password: str = field(default="", repr=False)
    password_file: Path | None = None  # where the password was read from, if from a file
    password_origin: str = field(default="", compare=False)  # file:line, flag or PASSWORD_ENV
    debug: bool = False
    name: str = ""  # interface suffix
    tun: IPv4Interface | None = None  # None: ask the server for an address
    stun: StunServer | None = None  # None: no STUN (no P2P across NATs)
    discovery: int = 0  # seconds; 0 disables
    route: int = 0  # relay cost 0..1000; 0 disables relaying
    port: int = 0  # local UDP port; 0 = any
    localhost: IPv4Address | None = None  # LAN address to advertise; None = detect
    mtu: int = DEFAULT_MTU
    # Path() stands for "not given": replaced by default_state_dir(name).
    state_dir: Path = Path()
    tls_verify: bool = True
    dataplane: Dataplane = "auto"
    metrics: tuple[str, int] | None = None
    log_format: LogFormat = "text"  # stderr logs: "text" or "json" (one object a line)
    accept_routes: AcceptRoutes = "safe"  # which sdwan routes from the server to install
    tls_ca: Path | None = None  # PEM CA certificate(s) to trust instead of the system's
    offload: Offload = "auto"  # TUN offloads (fast data plane only)
    bench_server: bool = False  # answer `p2pvpn bench peer` on the VPN address
    exit: str = ""  # the exit node to send all traffic through: a member's name or address
    exit_allow_lan: bool = True  # with `exit`: the LAN's subnets stay on the main table
    hostname: str = ""  # this member's name in the VPN; "": the machine's host name, cleaned
    domain: str = DEFAULT_DOMAIN  # names resolve as <name>.<domain>
    dns: bool = True  # answer DNS for the domain on the TUN address, port 53
    exit_node: bool = False  # offer this machine as an exit node (forwarding + masquerade)

    def __post_init__(self) -> None:
        if self.state_dir == Path():
            object.__setattr__(self, "state_dir", default_state_dir(self.name))
        if not self.websockets:
            object.__setattr__(self, "websockets", (self.websocket,))
        elif not self.websocket:
            object.__setattr__(self, "websocket", self.websockets[0])
        elif self.websocket != self.websockets[0]:
            # Every user of the single URL (status, sdwan safety, LAN detection) takes
            # `websocket`: it must be the URL the client tries first.
            raise ValueError("ClientConfig: websocket must be the first of websockets")

    @property
    def interface_name(self) -> str:
        """``p2pvpn-<name>``, or ``p2pvpn0`` when the name is empty."""
        return f"{INTERFACE_PREFIX}-{self.name}" if self.name else f"{INTERFACE_PREFIX}0"


def default_state_dir(name: str) -> Path:
    return DEFAULT_STATE_ROOT / (name or "default")


def default_server_control_socket() -> Path:
    """The server's control socket when ``control_socket`` is not set.

    Root's is in /run/p2pvpn; a user's in $XDG_RUNTIME_DIR (private to that user),
    else in the temp directory under a name with the uid, so that two users'
    servers do not meet there.
    """
    uid = os.geteuid()
    if uid == 0:
        return DEFAULT_SERVER_RUN_DIR / "server.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime_dir and os.path.isabs(runtime_dir):
        return Path(runtime_dir) / "p2pvpn-server.sock"
    return Path(tempfile.gettempdir()) / f"p2pvpn-server-{uid}.sock"


# --------------------------------------------------------------------------- reading


def parse_candy_text(text: str, source_name: str) -> dict[str, ConfigValue]:
    """Parse Candy's ``key = value`` format; values stay strings.

    Full-line ``#`` comments; a ``#`` preceded by whitespace starts a trailing
    comment after an unquoted value (so ``password = a#b`` keeps its ``#``, as
    in Candy); a value in double quotes is taken literally; trailing ``;`` and
    whitespace are dropped. The same key twice: the last one wins.
    """
    values: dict[str, ConfigValue] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        origin = f"{source_name}:{number}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not key:
            # Do not echo the line: it could hold a password.
            problems.append(f"{origin}: expected 'key = value'")
            continue
        try:
            values[key] = ConfigValue(_candy_value(rest.strip(), key, origin), origin)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(*problems)
    return values


def _candy_value(rest: str, key: str, origin: str) -> str:
    if rest.startswith('"'):
        end = rest.find('"', 1)
        if end < 0:
            raise ConfigError(f"{origin}: {key}: missing closing quote")
        tail = rest[end + 1 :].lstrip(" \t;")
        if tail and not tail.startswith("#"):
            raise ConfigError(f"{origin}: {key}: unexpected text after the closing quote")
        return rest[1:end]
    comment = re.search(r"(?:^|\s)#", rest)
    if comment:
        rest = rest[: comment.start()]
    return rest.rstrip(" \t;")


def parse_toml_text(text: str, source_name: str) -> dict[str, ConfigValue]:
    """Parse the same keys from TOML; strings, integers and booleans are accepted.

    An array of strings stands for the candy.cfg comma-separated list
    (``accept_routes = ["10.1.0.0/16", "10.2.0.0/16"]``) and is joined so.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source_name}: invalid TOML: {exc}") from None
    lines = _toml_key_lines(text)
    values: dict[str, ConfigValue] = {}
    problems: list[str] = []
    for key, raw in document.items():
        line = lines.get(key)
        origin = f"{source_name}:{line}" if line else source_name
        value = _listed(raw) if key in _LIST_KEYS else _joined(raw)
        if not isinstance(value, str | int | bool | tuple):
            kind = "table" if isinstance(value, dict) else type(value).__name__
            wanted = "a string or an array of strings" if key in _LIST_KEYS else None
            wanted = wanted or "a string, integer or boolean"
            problems.append(f"{origin}: {key}: expected {wanted}, got {kind}")
            continue
        values[key] = ConfigValue(value, origin)
    if problems:
        raise ConfigError(*problems)
    return values


def _listed(value: object) -> object:
    """An array of strings as a tuple of its elements, for the keys of _LIST_KEYS."""
    if isinstance(value, list) and all(isinstance(element, str) for element in value):
        return tuple(value)
    return value


def _joined(value: object) -> object:
    """An array of strings as the comma-separated list a candy.cfg would hold."""
    if isinstance(value, list) and all(isinstance(element, str) for element in value):
        return ",".join(value)
    return value


_TOML_KEY_RE = re.compile(r"""\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def _toml_key_lines(text: str) -> dict[str, int]:
    """Best-effort line numbers of top-level TOML keys (tomllib gives none)."""
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("["):
            break
        match = _TOML_KEY_RE.match(line)
        if match:
            key = next(group for group in match.groups() if group)
            lines.setdefault(key, number)
    return lines


def read_config_values(path: str | Path) -> dict[str, ConfigValue]:
    """Read a config file (TOML if the name ends in ``.toml``, else candy.cfg)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    values = (
        parse_toml_text(text, name)
        if name.lower().endswith(".toml")
        else parse_candy_text(text, name)
    )
    if values.get("password", ConfigValue("", name)).value:
        warn_if_exposed(Path(path), "holds the password")
    return values


def overlay_values(
    file_values: Mapping[str, ConfigValue],
    flag_values: Mapping[str, ConfigValue],
    environ: Mapping[str, str],
) -> dict[str, ConfigValue]:
    """The config file's values overlaid with the flags', and the password's sources ordered.

    A flag wins over the file; for the password, a password flag (``--password``,
    ``--password-file``) replaces both of the file's password keys, and
    ``P2PVPN_PASSWORD`` in ``environ`` counts only when neither gives one. Both keys
    from one source stay, so that validation names both.
    """
    values = dict(file_values)
    if any(key in flag_values for key in _PASSWORD_KEYS):
        for key in _PASSWORD_KEYS:
            values.pop(key, None)
    values.update(flag_values)
    from_environment = environ.get(PASSWORD_ENV, "")
    if from_environment and not any(key in values for key in _PASSWORD_KEYS):
        values["password"] = ConfigValue(from_environment, PASSWORD_ENV)
    return values


def warn_if_exposed(path: Path, holds: str) -> bool:
    """Log a warning when ``path`` (which ``holds`` a secret) is readable by group or others.

    Returns whether it warned. A file that cannot be stat()ed is left to the reader.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return False
    if not mode & 0o077:
        return False
    logger.warning(
        "%s %s and is readable by group or others (mode %04o): run `chmod 600 %s`",
        path,
        holds,
        mode,
        path,
    )
    return True


def load_config(path: str | Path) -> ClientConfig | ServerConfig:
    return config_from_values(read_config_values(path), str(path))


# ------------------------------------------------------------------------ validating


@dataclass(frozen=True, slots=True)
class _Password:
    text: str = field(default="", repr=False)
    file: Path | None = None
    origin: str = ""


def _password(values: Mapping[str, ConfigValue]) -> _Password:
    """The password from ``password`` or from the file named by ``password_file``, not both."""
    inline, file_item = values.get("password"), values.get("password_file")
    path = None if file_item is None else _path("password_file", file_item)
    if path is None:
        file_item = None  # "password_file =" (empty) gives no file
    if inline is not None and file_item is not None:
        raise ConfigError(
            f"{_name('password', inline.origin)} and {_name('password_file', file_item.origin)} "
            "are both given: keep one of them"
        )
    if file_item is not None and path is not None:
        return _Password(_read_password_file(file_item, path), path, file_item.origin)
    if inline is not None:
        return _Password(_string("password", inline), None, inline.origin)
    return _Password()


def _name(key: str, origin: str) -> str:
    # A flag is the setting's name; a file line is "file:line: key".
    return origin if origin.startswith("-") else f"{origin}: {key}"


def _read_password_file(item: ConfigValue, path: Path) -> str:
    """The password in ``path``, one trailing newline dropped; errors never show the content."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _fail("password_file", item, f"{path}: no such file")
    except OSError as exc:
        _fail("password_file", item, f"{path}: cannot read: {exc.strerror or exc}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _fail("password_file", item, f"{path}: not a UTF-8 text file")
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        _fail("password_file", item, f"{path}: the file is empty")
    if "\n" in password or "\r" in password:
        _fail("password_file", item, f"{path}: expected the password on one line")
    warn_if_exposed(path, "holds the password (password_file)")
    return password


def config_from_values(
    values: Mapping[str, ConfigValue], source: str
) -> ClientConfig | ServerConfig:
    """Validate ``values`` as a client or server configuration according to ``mode``."""
    if _mode(values) == "server":
        return server_config_from_values(values, source)
    return client_config_from_values(values, source)


def client_config_from_values(values: Mapping[str, ConfigValue], source: str) -> ClientConfig:
    """Validate ``values`` as a client configuration; ``source`` names them in errors."""
    _expect_mode(values, "client")
    _warn_unknown(values, _CLIENT_KEYS, _SERVER_KEYS)
    get = _Checker(values)
    name = get("name", validate_name, "")
    state_dir = get("state_dir", _path, None)
    secret = get.check("password", lambda: _password(values), _Password())
    no_urls: tuple[str, ...] = ()
    websockets = get.check("websocket", lambda: _client_websockets(values, source), no_urls)
    config = ClientConfig(
        websocket=websockets[0] if websockets else "",
        websockets=websockets,
        password=secret.text,
        password_file=secret.file,
        password_origin=secret.origin,
        debug=get("debug", _bool, False),
        log_format=get("log_format", _log_format, "text"),
        name=name,
        tun=get("tun", _tun, None),
        stun=get("stun", _stun, None),
        discovery=get("discovery", _int_range(0, 2**31 - 1), 0),
        route=get("route", _int_range(0, 1000), 0),
        port=get("port", _int_range(0, 65535), 0),
        localhost=get("localhost", _address, None),
        mtu=get("mtu", _int_range(576, 9000), DEFAULT_MTU),
        state_dir=state_dir or default_state_dir(name),
        tls_verify=get("tls_verify", _bool, True),
        dataplane=get("dataplane", _dataplane, "auto"),
        metrics=get("metrics", _endpoint, None),
        accept_routes=get("accept_routes", _accept_routes, "safe"),
        tls_ca=get.check("tls_ca", lambda: _client_tls_ca(values), None),
        offload=get("offload", _offload, "auto"),
        bench_server=get("bench_server", _bool, False),
        exit=get("exit", _exit, ""),
        exit_allow_lan=get("exit_allow_lan", _bool, True),
        hostname=get("hostname", _hostname, ""),
        domain=get("domain", _domain, DEFAULT_DOMAIN),
        dns=get("dns", _bool, True),
        exit_node=get("exit_node", _bool, False),
    )
    get.check("exit", lambda: _exit_without_exit_node(values), None)
    get.raise_problems()
    return config


def server_config_from_values(values: Mapping[str, ConfigValue], source: str) -> ServerConfig:
    """Validate ``values`` as a server configuration; ``source`` names them in errors."""
    _expect_mode(values, "server")
    _warn_unknown(values, _SERVER_KEYS, _CLIENT_KEYS)
    get = _Checker(values)
    secret = get.check("password", lambda: _password(values), _Password())
    config = ServerConfig(
        websocket=get.check("websocket", lambda: _websocket(values, source, ("ws", "wss")), ""),
        password=secret.text,
        password_file=secret.file,
        password_origin=secret.origin,
        debug=get("debug", _bool, False),
        log_format=get("log_format", _log_format, "text"),
        dhcp=get("dhcp", _pool, None),
        sdwan=get("sdwan", _sdwan, ()),
        stun_port=get("stun_port", _int_range(0, 65535), DEFAULT_STUN_PORT),
        metrics=get("metrics", _endpoint, None),
        tls_cert=get.check("tls_cert", lambda: _server_tls_file(values, "tls_cert"), None),
        tls_key=get.check("tls_key", lambda: _server_tls_file(values, "tls_key"), None),
        # A queue must hold at least one frame of the largest size (64 KiB).
        send_queue_bytes=get(
            "send_queue_bytes", _int_range(65536, 2**30), DEFAULT_SEND_QUEUE_BYTES
        ),
        max_unauthenticated=get(
            "max_unauthenticated", _int_range(1, 1_000_000), DEFAULT_MAX_UNAUTHENTICATED
        ),
        max_unauthenticated_per_ip=get(
            "max_unauthenticated_per_ip",
            _int_range(1, 1_000_000),
            DEFAULT_MAX_UNAUTHENTICATED_PER_IP,
        ),
        login_timeout=get("login_timeout", _seconds(0.1, 300.0), DEFAULT_LOGIN_TIMEOUT),
        max_replay_entries=get(
            "max_replay_entries", _int_range(16, 100_000_000), DEFAULT_MAX_REPLAY_ENTRIES
        ),
        broadcast_rate=get("broadcast_rate", _int_range(1, 1_000_000), DEFAULT_BROADCAST_RATE),
        # Below 64 bytes even a DISCOVERY or a small IP packet would not pass.
        max_broadcast_size=get(
            "max_broadcast_size", _int_range(64, 65536), DEFAULT_MAX_BROADCAST_SIZE
        ),
        max_leases_per_ip=get(
            "max_leases_per_ip", _int_range(1, 1_000_000), DEFAULT_MAX_LEASES_PER_IP
        ),
        stun_rate=get("stun_rate", _int_range(1, 1_000_000), DEFAULT_STUN_RATE),
        junk_rate=get("junk_rate", _int_range(1, 1_000_000), DEFAULT_JUNK_RATE),
        cluster=get("cluster", _cluster_urls, ()),
        cluster_network=get("cluster_network", _cluster_network, DEFAULT_CLUSTER_NETWORK),
        cluster_ttl=get("cluster_ttl", _seconds(2.0, 300.0), DEFAULT_CLUSTER_TTL),
        cluster_credentials=get.check(
            "cluster_credentials", lambda: _cluster_credentials(values), None
        ),
        control_socket=get("control_socket", _path, None),
    )
    get.raise_problems()
    return config


def server_control_socket_from_values(values: Mapping[str, ConfigValue]) -> Path:
    """The control socket a server with ``values`` serves, checking only that key.

    For `p2pvpn server status`, which must not need what only running a server
    needs (the password file, the certificate).
    """
    _expect_mode(values, "server")
    get = _Checker(values)
    path = get("control_socket", _path, None)
    get.raise_problems()
    return path or default_server_control_socket()


def validate_name(key: str, item: ConfigValue) -> str:
    """The interface suffix: ``p2pvpn-<name>`` must be a valid Linux interface name."""
    name = _string(key, item)
    if not name:
        return ""
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        _fail(key, item, f"{name!r} may only contain letters, digits, '_', '.' and '-'")
    interface = f"{INTERFACE_PREFIX}-{name}"
    if len(interface) > IFNAMSIZ - 1:
        limit = IFNAMSIZ - 1 - len(INTERFACE_PREFIX) - 1
        detail = f"{interface!r} exceeds {IFNAMSIZ - 1} characters (the name may have {limit})"
        _fail(key, item, f"{name!r} is too long: {detail}")
    return name


class _Checker:
    """``get(key, parse, default)``: parse ``values[key]`` if present, else the default.

    A bad value is noted and stands in as the default, so that one run finds every
    bad key; `raise_problems` then raises them together, in the order of the file.
    """

    def __init__(self, values: Mapping[str, ConfigValue]) -> None:
        self._values = values
        self._problems: list[tuple[int, str]] = []

    def __call__(self, key: str, parse: Callable[[str, ConfigValue], T], default: T) -> T:
        item = self._values.get(key)
        return default if item is None else self.check(key, lambda: parse(key, item), default)

    def check(self, key: str, parse: Callable[[], T], default: T) -> T:
        """``parse()``, or ``default`` with its problems noted under ``key``."""
        try:
            return parse()
        except ConfigError as exc:
            position = self._position(key)
            self._problems.extend((position, problem) for problem in exc.problems)
            return default

    def raise_problems(self) -> None:
        if self._problems:
            self._problems.sort(key=lambda noted: noted[0])
            raise ConfigError(*(problem for _, problem in self._problems))

    def _position(self, key: str) -> int:
        # Keys keep the order of the file (flags after it); a missing key comes last.
        keys = list(self._values)
        return keys.index(key) if key in keys else len(keys)


def _where(key: str, origin: str) -> str:
    # A flag names the setting by itself: "--route: ..." rather than "--route: route: ...".
    return f"{origin}: " if origin.startswith("-") else f"{origin}: {key}: "


def _fail(key: str, item: ConfigValue, detail: str) -> NoReturn:
    raise ConfigError(_where(key, item.origin) + detail)


def _mode(values: Mapping[str, ConfigValue]) -> str:
    item = values.get("mode")
    if item is None:
        return "client"
    mode = _string("mode", item)
    if mode not in {"client", "server"}:
        _fail("mode", item, f"expected 'client' or 'server', got {mode!r}")
    return mode


def _expect_mode(values: Mapping[str, ConfigValue], wanted: str) -> None:
    """An explicit ``mode`` must match; an absent one is taken to mean ``wanted``."""
    mode = _mode(values)
    if "mode" in values and mode != wanted:
        command = "p2pvpn server" if mode == "server" else "p2pvpn run"
        _fail("mode", values["mode"], f"this is a {mode} configuration (use `{command}`)")


def _warn_unknown(
    values: Mapping[str, ConfigValue], known: tuple[str, ...], other_mode: tuple[str, ...]
) -> None:
    for key, item in values.items():
        if key in known:
            continue
        if key in other_mode:
            logger.debug("%s: %s: not used in this mode, ignored", item.origin, key)
        elif key in _CANDY_ONLY_KEYS:
            logger.warning(
                "%s: %s: Candy option not supported by p2pvpn, ignored", item.origin, key
            )
        else:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            logger.warning("%s: unknown key %r ignored%s", item.origin, key, hint)


def _websocket(values: Mapping[str, ConfigValue], source: str, schemes: tuple[str, ...]) -> str:
    """The server's one URL to listen on."""
    item = values.get("websocket")
    if item is not None and isinstance(item.value, tuple):
        if len(item.value) != 1:
            _fail("websocket", item, f"a server listens on one URL, got {len(item.value)}")
        item = ConfigValue(item.value[0], item.origin)
    url = "" if item is None else _string("websocket", item).strip()
    if item is None or not url:
        raise ConfigError(f"{source}: missing websocket (a {_wanted(schemes)} URL)")
    _check_url(item, url, schemes)
    return url


def _client_websockets(values: Mapping[str, ConfigValue], source: str) -> tuple[str, ...]:
    """The client's server URLs, in order: one string or a list; no URL twice."""
    item = values.get("websocket")
    if item is None:
        raise ConfigError(f"{source}: missing websocket (a ws:// or wss:// URL)")
    texts = item.value if isinstance(item.value, tuple) else (_string("websocket", item),)
    urls = tuple(text.strip() for text in texts)
    if not any(urls):
        raise ConfigError(f"{source}: missing websocket (a ws:// or wss:// URL)")
    seen: dict[tuple[object, ...], int] = {}
    for number, url in enumerate(urls, start=1):
        position = f"URL {number} of {len(urls)}: " if len(urls) > 1 else ""
        if not url:
            _fail("websocket", item, f"{position}empty")
        _check_url(item, url, ("ws", "wss"), position)
        identity = _url_identity(url)
        if identity in seen:
            _fail(
                "websocket",
                item,
                f"{position}{display_url(url)!r} is the same server as URL {seen[identity]}",
            )
        seen[identity] = number
    return urls


def _wanted(schemes: tuple[str, ...]) -> str:
    return " or ".join(f"{scheme}://" for scheme in schemes)


def _check_url(item: ConfigValue, url: str, schemes: tuple[str, ...], position: str = "") -> None:
    """A WebSocket URL with one of ``schemes``; ``position`` names it within a list."""
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        _fail("websocket", item, f"{position}{shown!r} is not a valid URL")
    if parts.scheme not in schemes:
        _fail("websocket", item, f"{position}expected a {_wanted(schemes)} URL, got {shown!r}")
    if not parts.hostname:
        _fail("websocket", item, f"{position}{shown!r} has no host")
    if "#" in url:
        _fail("websocket", item, f"{position}{shown!r}: a WebSocket URL has no #fragment")


def _url_identity(url: str) -> tuple[object, ...]:
    """What makes two URLs the same server: credentials and the default port aside."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    return (parts.scheme, parts.hostname, port, parts.path or "/", parts.query)


def _schemes(values: Mapping[str, ConfigValue]) -> set[str]:
    """The schemes of the websocket URL(s) as given, before validation."""
    item = values.get("websocket")
    if item is None:
        return set()
    urls = item.value if isinstance(item.value, tuple) else (str(item.value),)
    return {urlsplit(url.strip()).scheme for url in urls}


def _server_tls_file(values: Mapping[str, ConfigValue], key: str) -> Path | None:
    """``tls_cert`` or ``tls_key``: both go with a wss:// websocket, neither with ws://.

    The files are read when the server starts (and on SIGHUP), by p2pvpn.server.tls.
    """
    item = values.get(key)
    path = None if item is None else _path(key, item)
    wss = "wss" in _schemes(values)
    if path is None and wss:
        _fail("websocket", values["websocket"], f"a wss:// URL needs {key} (a PEM file)")
    if item is not None and path is not None and not wss:
        _fail(key, item, "only used with a wss:// websocket URL (the server speaks ws://)")
    return path


def _client_tls_ca(values: Mapping[str, ConfigValue]) -> Path | None:
    """``tls_ca``: a readable PEM file of certificates, for a wss:// URL that is verified."""
    item = values.get("tls_ca")
    path = None if item is None else _path("tls_ca", item)
    if item is None or path is None:
        return None
    if "wss" not in _schemes(values):
        _fail("tls_ca", item, "only used with a wss:// websocket URL")
    verify = values.get("tls_verify")
    if verify is not None and str(verify.value).strip().lower() in _FALSE:
        _fail("tls_ca", item, "not used when tls_verify is false (nothing is verified)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except FileNotFoundError:
        _fail("tls_ca", item, f"{path}: no such file")
    except ssl.SSLError:
        _fail("tls_ca", item, f"{path}: no PEM certificate in it")
    except OSError as exc:
        _fail("tls_ca", item, f"{path}: cannot read: {exc.strerror or exc}")
    return path


# Parsers: (key, item) -> value, raising ConfigError through _fail.


def _string(key: str, item: ConfigValue) -> str:
    if not isinstance(item.value, str):
        _fail(key, item, f"expected a string, got {type(item.value).__name__}")
    return item.value


def _bool(key: str, item: ConfigValue) -> bool:
    value = item.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in {0, 1}:
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    _fail(key, item, f"expected true/false, yes/no or 1/0, got {value!r}")


def _int(key: str, item: ConfigValue) -> int:
    value = item.value
    if isinstance(value, bool):
        _fail(key, item, f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if not isinstance(value, str) or not _INT_RE.fullmatch(value.strip()):
        _fail(key, item, f"expected an integer, got {value!r}")
    return int(value)


def _int_range(low: int, high: int) -> Callable[[str, ConfigValue], int]:
    def parse(key: str, item: ConfigValue) -> int:
        number = _int(key, item)
        if not low <= number <= high:
            _fail(key, item, f"{number} is outside {low}..{high}")
        return number

    return parse


def _seconds(low: float, high: float) -> Callable[[str, ConfigValue], float]:
    def parse(key: str, item: ConfigValue) -> float:
        value = item.value
        if isinstance(value, bool | tuple):
            _fail(key, item, f"expected a number of seconds, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            _fail(key, item, f"expected a number of seconds, got {value!r}")
        if not low <= number <= high:
            _fail(key, item, f"{number:g} is outside {low:g}..{high:g} seconds")
        return number

    return parse


def _path(key: str, item: ConfigValue) -> Path | None:
    text = _string(key, item).strip()
    return Path(text).expanduser().absolute() if text else None


def _address(key: str, item: ConfigValue) -> IPv4Address | None:
    text = _string(key, item).strip()
    if not text:
        return None
    try:
        return IPv4Address(text)
    except AddressValueError:
        _fail(key, item, f"{text!r} is not an IPv4 address")


def _tun(key: str, item: ConfigValue) -> IPv4Interface | None:
    text = _string(key, item).strip()
    if not text:
        return None
    try:
        interface = IPv4Interface(text)
    except ValueError:
        _fail(key, item, f"{text!r} is not an IPv4 address with a prefix (e.g. 10.0.0.1/24)")
    network = interface.network
    if "/" not in text or network.prefixlen > 30:
        _fail(key, item, f"{text!r} needs a prefix of /30 or shorter (e.g. 10.0.0.1/24)")
    if interface.ip in {network.network_address, network.broadcast_address}:
        _fail(key, item, f"{text!r} is the network or broadcast address of {network}")
    return interface


def _network(key: str, item: ConfigValue, text: str, context: str = "") -> IPv4Network:
    try:
        return IPv4Network(text, strict=False)
    except ValueError:
        _fail(key, item, f"{context}{text!r} is not an IPv4 cidr (e.g. 10.0.0.0/24)")


def _pool(key: str, item: ConfigValue) -> IPv4Network | None:
    text = _string(key, item).strip()
    if not text:
        return None
    network = _network(key, item, text)
    if "/" not in text or network.prefixlen > 30:
        _fail(key, item, f"{text!r} needs a prefix of /30 or shorter (e.g. 10.0.0.0/24)")
    return network


def _sdwan(key: str, item: ConfigValue) -> tuple[SdwanRule, ...]:
    rules = []
    for number, rule in enumerate(_string(key, item).split(";"), start=1):
        if not rule.strip():
            continue
        fields = [part.strip() for part in rule.split(",")]
        if len(fields) != 3:
            _fail(key, item, f"rule {number} {rule.strip()!r}: expected dev_cidr,dst_cidr,nexthop")
        context = f"rule {number}: "
        device = _network(key, item, fields[0], context)
        destination = _network(key, item, fields[1], context)
        try:
            nexthop = IPv4Address(fields[2])
        except AddressValueError:
            _fail(key, item, f"{context}{fields[2]!r} is not an IPv4 address")
        rules.append(SdwanRule(device, destination, nexthop))
    return tuple(rules)


def _cluster_urls(key: str, item: ConfigValue) -> tuple[str, ...]:
    """NATS URLs: a TOML array, repeated flags or one comma-separated string; empty: no cluster."""
    listed = item.value if isinstance(item.value, tuple) else _string(key, item).split(",")
    urls = tuple(part.strip() for part in listed if part.strip())
    for url in urls:
        shown = display_url(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            _fail(key, item, f"{shown!r} is not a valid URL")
        if parts.scheme not in CLUSTER_SCHEMES:
            wanted = ", ".join(f"{scheme}://" for scheme in CLUSTER_SCHEMES)
            _fail(key, item, f"expected a NATS URL ({wanted}), got {shown!r}")
        if not parts.hostname:
            _fail(key, item, f"{shown!r} has no host")
    websocket = {urlsplit(url).scheme in {"ws", "wss"} for url in urls}
    if len(websocket) > 1:
        _fail(key, item, "nats:// or tls:// URLs cannot be mixed with ws:// or wss:// ones")
    return urls


def _cluster_network(key: str, item: ConfigValue) -> str:
    name = _string(key, item).strip()
    if not _CLUSTER_NETWORK_RE.fullmatch(name):
        _fail(key, item, f"{name!r} must be 1 to 32 letters, digits, '_' or '-'")
    return name


def _as_tuple(value: object) -> tuple[object, ...]:
    return value if isinstance(value, tuple) else (value,)


def _cluster_credentials(values: Mapping[str, ConfigValue]) -> Path | None:
    """``cluster_credentials``: a readable NATS .creds file, only with ``cluster``."""
    item = values.get("cluster_credentials")
    path = None if item is None else _path("cluster_credentials", item)
    if item is None or path is None:
        return None
    cluster = values.get("cluster")
    if cluster is None or not any(str(url).strip() for url in _as_tuple(cluster.value)):
        _fail("cluster_credentials", item, "only used with cluster (NATS URLs)")
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        _fail("cluster_credentials", item, f"{path}: no such file")
    except OSError as exc:
        _fail("cluster_credentials", item, f"{path}: cannot read: {exc.strerror or exc}")
    warn_if_exposed(path, "holds NATS credentials (cluster_credentials)")
    return path


def _stun(key: str, item: ConfigValue) -> StunServer | None:
    text = _string(key, item).strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        _fail(key, item, f"{text!r} has a bad port (expected stun://host[:port])")
    if parts.scheme != "stun" or not parts.hostname or parts.path not in {"", "/"}:
        _fail(key, item, f"expected stun://host[:port], got {text!r}")
    if port == 0:
        _fail(key, item, f"{text!r} has a bad port (expected stun://host[:port])")
    return StunServer(parts.hostname, DEFAULT_STUN_PORT if port is None else port)


def _endpoint(key: str, item: ConfigValue) -> tuple[str, int] | None:
    text = _string(key, item).strip()
    if not text:
        return None
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not _INT_RE.fullmatch(port) or not 0 < int(port) <= 65535:
        _fail(key, item, f"expected host:port, got {text!r}")
    return host, int(port)


def _accept_routes(key: str, item: ConfigValue) -> AcceptRoutes:
    """``none``, ``safe``, ``all`` or comma-separated cidrs (a TOML array is joined so)."""
    text = _string(key, item).strip()
    for mode in ACCEPT_ROUTES_MODES:
        if text.lower() == mode:
            return mode
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        _fail(key, item, "expected none, safe, all or a list of cidrs, got ''")
    try:
        return tuple(IPv4Network(part, strict=False) for part in parts)
    except ValueError:
        _fail(key, item, f"expected none, safe, all or a list of cidrs, got {text!r}")


def _show_accept_routes(value: AcceptRoutes) -> str:
    return value if isinstance(value, str) else ",".join(str(network) for network in value)


_Choice = TypeVar("_Choice", bound=str)


def _one_of(key: str, item: ConfigValue, choices: tuple[_Choice, ...]) -> _Choice:
    """One of `choices`, case-insensitively; the error lists them."""
    text = _string(key, item).strip().lower()
    for choice in choices:
        if text == choice:
            return choice
    _fail(key, item, f"expected one of {', '.join(choices)}, got {text!r}")


def _exit(key: str, item: ConfigValue) -> str:
    """A member's IPv4 address, or its name: a DNS label (compared without case)."""
    text = _string(key, item).strip()
    try:
        return str(IPv4Address(text))
    except ValueError:
        pass
    name = text.lower()
    if name and clean_label(name) != name:  # as the name table has it
        _fail(
            key,
            item,
            f"{text!r} is neither an IPv4 address nor a name (a DNS label: letters, digits "
            "and '-' (not first or last), at most 63 characters)",
        )
    return name


def _exit_without_exit_node(values: Mapping[str, ConfigValue]) -> None:
    """`exit` and `exit_node = true` together: a member offers an exit or uses one.

    Read from the raw values: a bad `exit_node` is reported by its own check.
    """
    item, offer = values.get("exit"), values.get("exit_node")
    if item is None or offer is None or not str(item.value).strip():
        return
    try:
        offering = _bool("exit_node", offer)
    except ConfigError:
        return
    if offering:
        _fail(
            "exit",
            item,
            f"cannot be used with exit_node = true ({offer.origin}): a member either "
            "offers itself as an exit node or sends its traffic through one",
        )


def _hostname(key: str, item: ConfigValue) -> str:
    """A DNS label (stored lowercase), or "" for the machine's host name."""
    text = _string(key, item).strip()
    name = text.lower()
    if name and clean_label(name) != name:
        suggestion = clean_label(name)
        hint = f" (e.g. {suggestion!r})" if suggestion else ""
        _fail(
            key,
            item,
            f"{text!r} is not a DNS label: letters, digits and '-' (not first or last), "
            f"at most 63 characters{hint}",
        )
    return name


def _domain(key: str, item: ConfigValue) -> str:
    """A DNS name such as ``vpn`` or ``home.arpa`` (stored lowercase, no trailing dot)."""
    text = _string(key, item).strip()
    name = text.lower().removesuffix(".")
    reason = check_domain(name)
    if reason is not None:
        _fail(key, item, f"{text!r} is not a DNS name: {reason}")
    return name


def _log_format(key: str, item: ConfigValue) -> LogFormat:
    return _one_of(key, item, LOG_FORMATS)


def _dataplane(key: str, item: ConfigValue) -> Dataplane:
    return _one_of(key, item, DATAPLANES)


def _offload(key: str, item: ConfigValue) -> Offload:
    return _one_of(key, item, OFFLOADS)


# ------------------------------------------------------------------------ displaying


def effective_items(config: ClientConfig | ServerConfig) -> list[tuple[str, str]]:
    """The effective configuration as ordered ``(key, display value)`` pairs.

    The password is shown as ``********`` (or ``(empty)``), never in clear.
    """
    password = _show_password(config)
    password_file = "(none)" if config.password_file is None else str(config.password_file)
    metrics = "(off)" if config.metrics is None else _show_endpoint(config.metrics)
    if isinstance(config, ServerConfig):
        return [
            ("mode", "server"),
            ("websocket", display_url(config.websocket)),
            ("password", password),
            ("password_file", password_file),
            ("debug", _show_bool(config.debug)),
            ("log_format", config.log_format),
            (
                "dhcp",
                "(off: clients need a static tun)" if config.dhcp is None else str(config.dhcp),
            ),
            ("sdwan", ";".join(str(rule) for rule in config.sdwan) or "(none)"),
            ("stun_port", f"{config.stun_port}" if config.stun_port else "0 (off)"),
            ("metrics", metrics),
            ("tls_cert", _show_path(config.tls_cert, "(none: ws://)")),
            ("tls_key", _show_path(config.tls_key, "(none: ws://)")),
            ("send_queue_bytes", str(config.send_queue_bytes)),
            ("max_unauthenticated", str(config.max_unauthenticated)),
            ("max_unauthenticated_per_ip", str(config.max_unauthenticated_per_ip)),
            ("login_timeout", f"{config.login_timeout:g} s"),
            ("max_replay_entries", str(config.max_replay_entries)),
            ("broadcast_rate", f"{config.broadcast_rate}/s"),
            ("max_broadcast_size", str(config.max_broadcast_size)),
            ("max_leases_per_ip", str(config.max_leases_per_ip)),
            ("stun_rate", f"{config.stun_rate}/s"),
            ("junk_rate", f"{config.junk_rate}/s"),
            ("cluster", ",".join(display_url(url) for url in config.cluster) or "(off)"),
            ("cluster_network", config.cluster_network),
            ("cluster_ttl", f"{config.cluster_ttl:g} s"),
            ("cluster_credentials", _show_path(config.cluster_credentials, "(none)")),
            ("control_socket", _show_control_socket(config)),
        ]
    return [
        ("mode", "client"),
        ("websocket", ", ".join(display_url(url) for url in config.websockets)),
        ("password", password),
        ("password_file", password_file),
        ("debug", _show_bool(config.debug)),
        ("log_format", config.log_format),
        ("name", f"{config.name or '(none)'} (interface {config.interface_name})"),
        ("tun", "(dynamic, from the server)" if config.tun is None else str(config.tun)),
        ("stun", "(none)" if config.stun is None else str(config.stun)),
        ("discovery", f"{config.discovery}" if config.discovery else "0 (off)"),
        ("route", f"{config.route}" if config.route else "0 (relaying off)"),
        ("port", f"{config.port}" if config.port else "0 (any)"),
        ("localhost", "(auto)" if config.localhost is None else str(config.localhost)),
        ("mtu", str(config.mtu)),
        ("state_dir", str(config.state_dir)),
        ("tls_verify", _show_bool(config.tls_verify)),
        ("dataplane", config.dataplane),
        ("metrics", metrics),
        ("accept_routes", _show_accept_routes(config.accept_routes)),
        ("tls_ca", _show_path(config.tls_ca, "(the system's CAs)")),
        ("offload", _show_offload(config.offload)),
        ("bench_server", _show_bench_server(config.bench_server)),
        ("exit", config.exit or "(none: this machine's default route)"),
        ("exit_allow_lan", _show_bool(config.exit_allow_lan)),
        ("hostname", config.hostname or "(the machine's host name)"),
        ("domain", config.domain),
        ("dns", "true (answers on the TUN address, port 53)" if config.dns else "false"),
        ("exit_node", _show_exit_node(config.exit_node)),
    ]


def _show_control_socket(config: ServerConfig) -> str:
    if config.control_socket is None:
        return f"{config.control_socket_path} (default)"
    return str(config.control_socket)


def _show_bench_server(bench_server: bool) -> str:
    return "true (answers p2pvpn bench peer on the VPN address)" if bench_server else "false"


def _show_exit_node(exit_node: bool) -> str:
    return "true (forwards and masquerades the VPN's internet traffic)" if exit_node else "false"


def _show_offload(offload: Offload) -> str:
    return "auto (TUN offloads with the fast data plane)" if offload == "auto" else "off"


def _show_path(path: Path | None, absent: str) -> str:
    return absent if path is None else str(path)


def display_url(url: str) -> str:
    """``url`` as status, metrics, logs and errors show it: no userinfo, query or fragment.

    ``ws://user:secret@host:1/path?token=x`` shows as ``ws://host:1/path``: the parts
    left out may carry credentials. Split by hand rather than with urlsplit, so that
    a malformed URL (a bad port, an unclosed ``[``) is still shown without them.
    """
    head = url.partition("#")[0].partition("?")[0]
    scheme, separator, rest = head.partition("://")
    if not separator:
        scheme, rest = "", head
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"{scheme}{separator}{host}{slash}{path}"


def _show_password(config: ClientConfig | ServerConfig) -> str:
    if not config.password:
        return "(empty)"
    if config.password_file is not None:
        return f"{PASSWORD_MASK} (from password_file)"
    if config.password_origin == PASSWORD_ENV:
        return f"{PASSWORD_MASK} (from {PASSWORD_ENV})"
    return PASSWORD_MASK


def _show_bool(value: bool) -> str:
    return "true" if value else "false"


def _show_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
