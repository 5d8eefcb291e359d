"""Log formatting (text or JSON lines) and the secret filter.

``p2pvpn run`` and ``p2pvpn server`` log to stderr, either as text
(:data:`TEXT_FORMAT`) or, with ``--log-format json``, as one JSON object per
line: ``{"time", "level", "logger", "message"}`` plus ``"exception"`` /
``"stack"`` when present and any ``extra={...}`` fields given to the call.

The password must never reach a log (ARCHITECTURE.md). The code never logs
it, and as a defence in depth :func:`install_secret_filter` registers it with
a :class:`SecretFilter` that masks it in every record (message, arguments,
extra fields, exception text) before any handler formats it.
"""

import contextlib
import datetime
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any, Final, Literal

__all__ = [
    "LOG_FORMATS",
    "MASK",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogFormat",
    "SecretFilter",
    "install_secret_filter",
    "make_formatter",
    "secret_filter",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK: Final = "********"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES: Final = frozenset(
    {
        *logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def _rfc3339(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``log_format``: :data:`TEXT_FORMAT` or :class:`JsonFormatter`."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r} (expected one of {LOG_FORMATS})")


# Where a WebSocket URL's userinfo and query end up in an HTTP request, which the
# websockets library logs at DEBUG on both ends ("> GET /path?token=x HTTP/1.1",
# "< Authorization: Basic dXNlcjpzZWNyZXQ="): masked like a registered secret.
_HTTP_SECRETS: Final = (
    (re.compile(r"(?i)\b((?:proxy-)?authorization|cookie)(\s*:\s*)\S.*"), rf"\1\2{MASK}"),
    (re.compile(r"(\b[A-Z]+ [^\s?]*\?)\S+(?= HTTP/\d)"), rf"\1{MASK}"),
)


class SecretFilter(logging.Filter):
    """Masks registered secrets in every record it sees; never drops a record.

    Attached to handlers (a filter on a logger does not see records that
    propagate from its children). A secret is masked as it is and as it
    appears inside ``repr()`` of a string or of its UTF-8 bytes; credentials
    in a logged HTTP request (the query, an Authorization header) always are.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._needles: tuple[str, ...] = ()

    def add_secret(self, secret: str) -> None:
        """Mask ``secret`` from now on; an empty secret is ignored."""
        if not secret:
            return
        with self._lock:
            needles = set(self._needles) | set(_variants(secret))
            # Longest first, so a variant that contains another is masked whole.
            self._needles = tuple(sorted(needles, key=len, reverse=True))

    def clear(self) -> None:
        with self._lock:
            self._needles = ()

    def mask(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, MASK)
        for pattern, replacement in _HTTP_SECRETS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        # A broken __str__ in the arguments: the handler reports it when formatting.
        with contextlib.suppress(Exception):
            self._scrub(record)
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key in _RECORD_ATTRIBUTES or key.startswith("_"):
                continue
            text = value if isinstance(value, str) else repr(value)
            if self.mask(text) != text:
                setattr(record, key, self.mask(text))


def _variants(secret: str) -> Iterable[str]:
    yield secret
    yield repr(secret)[1:-1]  # as inside '...' when logged with %r
    yield json.dumps(secret)[1:-1]  # as inside a JSON string
    yield repr(secret.encode("utf-8", "surrogatepass"))[2:-1]  # as inside b'...'


_SECRET_FILTER: Final = SecretFilter()


def secret_filter() -> SecretFilter:
    """The process-wide :class:`SecretFilter` (attach it to any handler you add)."""
    return _SECRET_FILTER


def install_secret_filter(secret: str, *, logger: logging.Logger | None = None) -> SecretFilter:
    """Mask ``secret`` in every log record from now on; idempotent.

    Registers ``secret`` with the process-wide filter and attaches the filter
    to every handler of ``logger`` (default: the root logger) and to
    :data:`logging.lastResort`. Handlers made by ``cli.configure_logging``
    carry the filter from the start. An empty secret changes nothing.
    """
    _SECRET_FILTER.add_secret(secret)
    target = logging.getLogger() if logger is None else logger
    handlers = list(target.handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if _SECRET_FILTER not in handler.filters:
            handler.addFilter(_SECRET_FILTER)
    return _SECRET_FILTER
