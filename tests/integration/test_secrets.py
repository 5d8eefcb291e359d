"""The password off the command line (issue 12 part 4), with real processes.

For each new way of passing it (``password_file``, ``P2PVPN_PASSWORD``, ``-p -``
on standard input) a real ``p2pvpn server`` and a real ``p2pvpn run`` get a
distinctive password that way, the client logs in (so the password was really
used), and the password appears in neither process's ``/proc/PID/cmdline``,
its log (stderr, at debug level), ``p2pvpn status --json`` nor the metrics.

``/proc/PID/environ`` is not checked for ``P2PVPN_PASSWORD``: it holds the
variable by design, but unlike ``cmdline`` (world-readable, what ``ps`` shows)
only the process's owner and root may read it.

The client's URL carries userinfo and a query; status, metrics and logs must
show it as ``ws://host:port/path``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest

from p2pvpn.netns import Namespace, Process, TestBed, VpnNetwork, p2pvpn_argv
from p2pvpn.netns._vpn import DHCP, WS_PORT

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("no_namespace_left_behind")]

WAYS = ("password_file", "environment", "stdin")
SERVER_METRICS = 9101
CLIENT_METRICS = 9102
URL_SECRET = "url-userinfo-secret"
URL_TOKEN = "url-query-token"


def start_with_password(
    bed: TestBed, ns: Namespace, args: list[str], *, name: str, way: str, password: str, tmp: Path
) -> Process:
    """``p2pvpn ARGS`` in ``ns`` with ``password`` given the ``way`` way."""
    secret_file = tmp / f"{name}.password"
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    if way == "password_file":
        return bed.start(ns, p2pvpn_argv(*args, "--password-file", str(secret_file)), name)
    if way == "environment":
        return bed.start(ns, p2pvpn_argv(*args), name, env={"P2PVPN_PASSWORD": password})
    # `-p -` reads a line of standard input: the shell redirects the file there and
    # execs p2pvpn, so the process (same pid) has only "-p -" in its command line.
    command = f"exec {shlex.join(p2pvpn_argv(*args, '-p', '-'))} < {shlex.quote(str(secret_file))}"
    return bed.start(ns, ["sh", "-c", command], name)


def fetch(ns: Namespace, url: str) -> str:
    code = (
        "import sys, urllib.request\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    )
    return ns.python(code, url).stdout


def cmdline(process: Process) -> str:
    return Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def status_json(ns: Namespace, state_root: Path, name: str) -> tuple[str, dict[str, Any]]:
    argv = p2pvpn_argv("status", "--json", "--state-dir", str(state_root), "-n", name)
    text = ns.run(argv, check=False).stdout
    try:
        return text, dict(json.loads(text))
    except ValueError:
        return text, {}


@pytest.mark.parametrize("way", WAYS)
def test_the_password_shows_nowhere(testbed: TestBed, tmp_path: Path, way: str) -> None:
    password = f"Distinctive-{way}-{secrets.token_hex(6)}"
    vpn = VpnNetwork(testbed, tmp_path)
    server_args = ["server", "-d", "-w", f"ws://0.0.0.0:{WS_PORT}/", "--dhcp", DHCP]
    server_args += ["--stun-port", "0", "--metrics", f"127.0.0.1:{SERVER_METRICS}"]
    server = start_with_password(
        testbed, vpn.server_ns, server_args, name="server", way=way, password=password, tmp=tmp_path
    )
    vpn.wait_for_server()

    ns = vpn.client_namespace("sec")
    state_root = tmp_path / "state"
    url = f"ws://user:{URL_SECRET}@{vpn.server_ip}:{WS_PORT}/path?token={URL_TOKEN}"
    client_args = ["run", "-d", "-w", url, "-n", "sec", "--state-dir", str(state_root / "sec")]
    client_args += ["--metrics", f"127.0.0.1:{CLIENT_METRICS}"]
    client = start_with_password(
        testbed, ns, client_args, name="client", way=way, password=password, tmp=tmp_path
    )

    # Logged in: the password was really read and used by both sides.
    testbed.wait_until(
        lambda: status_json(ns, state_root, "sec")[1].get("server", {}).get("state") == "connected",
        timeout=30,
        message="the client never logged in",
    )
    server_metrics = fetch(vpn.server_ns, f"http://127.0.0.1:{SERVER_METRICS}/metrics")
    assert "p2pvpn_server_logins_total 1.0" in server_metrics
    status_text, status = status_json(ns, state_root, "sec")
    shown_url = f"ws://{vpn.server_ip}:{WS_PORT}/path"
    assert status["server"]["url"] == shown_url
    client_metrics = fetch(ns, f"http://127.0.0.1:{CLIENT_METRICS}/metrics")
    client.wait_for_log(f"connecting to {shown_url}")

    outputs = {
        "server cmdline": cmdline(server),
        "client cmdline": cmdline(client),
        "server log": server.log_text(),
        "client log": client.log_text(),
        "status --json": status_text,
        "server metrics": server_metrics,
        "client metrics": client_metrics,
    }
    assert "p2pvpn" in outputs["client cmdline"]  # the pid is p2pvpn itself, not a wrapper
    assert stat.S_IMODE((state_root / "sec").stat().st_mode) == 0o700
    for where, text in outputs.items():
        assert password not in text, f"the password shows in the {where}"
        for secret in (URL_SECRET, URL_TOKEN):
            assert secret not in text or where == "client cmdline", f"{secret} in the {where}"


def test_a_state_dir_of_another_user_is_refused(testbed: TestBed, tmp_path: Path) -> None:
    vpn = VpnNetwork(testbed, tmp_path)
    ns = vpn.client_namespace("other")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # nobody: could open it up again whenever it likes
    args = ["run", "-w", vpn.url, "-n", "other", "--state-dir", str(state)]
    client = start_with_password(
        testbed, ns, args, name="client", way="environment", password="pw", tmp=tmp_path
    )
    assert client.wait(timeout=30) == 1
    assert f"state directory {state} is owned by " in client.log_text()
    assert "uid 65534" in client.log_text()
    assert "refusing to keep state there" in client.log_text()
    assert not (state / "control.sock").exists()
    assert "p2pvpn-other" not in ns.interfaces()  # refused before touching anything
