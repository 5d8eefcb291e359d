"""Log formats (text, JSON lines) and the secret filter; the CLI's --log-format."""

import io
import json
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from p2pvpn.cli import configure_logging, main
from p2pvpn.config import ClientConfig, ServerConfig
from p2pvpn.logs import (
    MASK,
    TEXT_FORMAT,
    JsonFormatter,
    SecretFilter,
    install_secret_filter,
    make_formatter,
    secret_filter,
)

PASSWORD = 'pa\'ss\\word "with" quotes é'


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    last_resort = logging.lastResort
    last_resort_filters = list(last_resort.filters) if last_resort is not None else []
    secret_filter().clear()
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    if last_resort is not None:
        last_resort.filters[:] = last_resort_filters
    secret_filter().clear()


def capture(
    formatter: logging.Formatter, *filters: logging.Filter
) -> tuple[logging.Logger, io.StringIO]:
    """A private logger writing through ``formatter`` into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for item in filters:
        handler.addFilter(item)
    logger = logging.getLogger(f"p2pvpn.test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- JSON lines ------------------------------------------------------------------


def test_json_line_has_time_level_logger_message() -> None:
    logger, stream = capture(JsonFormatter())
    logger.info("peer %s is %s", "10.0.0.2", "CONNECTED")
    [entry] = json_lines(stream)
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["level"] == "INFO"
    assert entry["logger"] == logger.name
    assert entry["message"] == "peer 10.0.0.2 is CONNECTED"
    assert entry["time"].endswith("Z")
    assert len(entry["time"]) == len("2024-01-02T03:04:05.678Z")


def test_json_extra_fields_and_odd_values() -> None:
    logger, stream = capture(JsonFormatter())
    logger.warning(
        "two\nlines", extra={"peer": "10.0.0.2", "rtt_ms": 1.5, "odd": object(), "n": None}
    )
    [entry] = json_lines(stream)  # one line despite the newline in the message
    assert entry["message"] == "two\nlines"
    assert entry["peer"] == "10.0.0.2"
    assert entry["rtt_ms"] == 1.5
    assert entry["n"] is None
    assert entry["odd"].startswith("<object object")


def test_json_exception_and_stack() -> None:
    logger, stream = capture(JsonFormatter())
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    logger.debug("here", stack_info=True)
    first, second = json_lines(stream)
    assert first["level"] == "ERROR"
    assert "ValueError: boom" in first["exception"]
    assert "Traceback" in first["exception"]
    assert "stack" not in first
    assert second["stack"].startswith("Stack (most recent call last)")


def test_make_formatter() -> None:
    text = make_formatter("text")
    assert isinstance(text, logging.Formatter)
    assert text._fmt == TEXT_FORMAT
    assert isinstance(make_formatter("json"), JsonFormatter)
    with pytest.raises(ValueError, match="unknown log format"):
        make_formatter("xml")  # type: ignore[arg-type]


# -- the secret filter -----------------------------------------------------------


def test_filter_masks_message_args_extra_and_exception() -> None:
    masker = SecretFilter()
    masker.add_secret(PASSWORD)
    logger, stream = capture(JsonFormatter(), masker)
    logger.info("password=%s", PASSWORD)
    logger.info("repr %r", PASSWORD)
    logger.info("bytes %r", PASSWORD.encode())
    logger.info("extra", extra={"secret": PASSWORD, "nested": {"key": PASSWORD}})
    try:
        raise RuntimeError(f"bad {PASSWORD}")
    except RuntimeError:
        logger.exception("caught")
    logger.info("innocent %d", 42)
    out = stream.getvalue()
    assert PASSWORD not in out
    assert json.dumps(PASSWORD)[1:-1] not in out
    assert repr(PASSWORD)[1:-1] not in out
    entries = json_lines(stream)
    assert entries[0]["message"] == f"password={MASK}"
    assert MASK in entries[1]["message"]
    assert MASK in entries[2]["message"]
    assert entries[3]["secret"] == MASK
    assert MASK in entries[3]["nested"]
    assert MASK in entries[4]["exception"]
    assert entries[5]["message"] == "innocent 42"


def test_filter_with_text_formatter_and_no_secret() -> None:
    masker = SecretFilter()
    logger, stream = capture(logging.Formatter("%(message)s"), masker)
    logger.info("nothing registered: %s", "hunter2")
    masker.add_secret("")  # ignored
    masker.add_secret("hunter2")
    logger.info("now: %s and %s", "hunter2", "hunter22")
    assert stream.getvalue().splitlines() == [
        "nothing registered: hunter2",
        f"now: {MASK} and {MASK}2",
    ]
    masker.clear()
    logger.info("hunter2")
    assert stream.getvalue().splitlines()[-1] == "hunter2"


def test_filter_never_drops_a_record_with_broken_args() -> None:
    masker = SecretFilter()
    masker.add_secret("hunter2")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert masker.filter(record) is True


def test_install_secret_filter_covers_existing_handlers_and_configure_logging(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    foreign = logging.StreamHandler(stream)
    root.addHandler(foreign)
    install_secret_filter(PASSWORD)
    install_secret_filter(PASSWORD)  # idempotent
    assert foreign.filters.count(secret_filter()) == 1
    assert logging.lastResort is not None
    assert secret_filter() in logging.lastResort.filters
    configure_logging(False, "json")  # the CLI's handler carries the filter from the start
    logging.getLogger("p2pvpn.client.node").warning("login with %s failed", PASSWORD)
    assert PASSWORD not in stream.getvalue()
    assert MASK in stream.getvalue()
    err = capsys.readouterr().err
    assert PASSWORD not in err
    [entry] = [json.loads(line) for line in err.splitlines()]
    assert entry["message"] == f"login with {MASK} failed"
    assert entry["logger"] == "p2pvpn.client.node"


# -- the command line ------------------------------------------------------------


def fake_back_end(monkeypatch: pytest.MonkeyPatch, module: str, attribute: str) -> list[Any]:
    """Replace ``module.attribute`` by a function that logs the password and records its call."""
    calls: list[Any] = []

    def back_end(config: Any) -> int:
        calls.append(config)
        logging.getLogger("p2pvpn.fake").warning(
            "oops %s", config.password, extra={"peer": "10.0.0.2"}
        )
        return 0

    fake = types.ModuleType(module)
    setattr(fake, attribute, back_end)
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


def test_run_log_format_json_masks_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fake_back_end(monkeypatch, "p2pvpn.client.node", "run_client")
    assert main(["run", "-w", "ws://h", "-p", PASSWORD, "--log-format", "json"]) == 0
    [config] = calls
    assert config == ClientConfig(websocket="ws://h", password=PASSWORD, log_format="json")
    err = capsys.readouterr().err
    [entry] = [json.loads(line) for line in err.splitlines()]
    assert entry["message"] == f"oops {MASK}"
    assert entry["peer"] == "10.0.0.2"
    assert PASSWORD not in err


def test_server_log_format_from_the_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fake_back_end(monkeypatch, "p2pvpn.server.runtime", "run_server")
    path = tmp_path / "server.cfg"
    path.write_text(
        "mode = server\nwebsocket = ws://0.0.0.0:80\nlog_format = json\npassword = pw1\n"
    )
    path.chmod(0o600)  # else the warning about a readable password comes first, as text
    assert main(["server", "-c", str(path)]) == 0
    assert calls == [ServerConfig(websocket="ws://0.0.0.0:80", password="pw1", log_format="json")]
    err = capsys.readouterr().err
    assert json.loads(err)["message"] == f"oops {MASK}"
    # The flag overrides the file.
    assert main(["server", "-c", str(path), "--log-format", "text"]) == 0
    err = capsys.readouterr().err
    assert f" WARNING p2pvpn.fake: oops {MASK}\n" in err
    assert "pw1" not in err


def test_bad_log_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-w", "ws://h", "--log-format", "xml"]) == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
