"""systemd units and `p2pvpn install-service` (temporary directories, no systemctl)."""

import configparser
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pvpn.cli import main
from p2pvpn.service import (
    CLIENT_UNIT,
    SERVER_UNIT,
    ServiceError,
    install_service,
    p2pvpn_command,
    render_unit,
    unit_template,
)

COMMAND = ["/opt/p2pvpn/bin/p2pvpn"]


def parse_unit(text: str) -> configparser.ConfigParser:
    """A unit file as sections of keys (repeated keys keep the last value)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(text)
    return parser


def all_values(text: str, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (LoadCredential=) in a section, in order."""
    values, current = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            values.append(line.partition("=")[2])
    return values


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    units, configs = tmp_path / "systemd", tmp_path / "etc-p2pvpn"
    configs.mkdir()
    return units, configs


def test_templates_are_package_data() -> None:
    for server in (False, True):
        text = unit_template(server=server)
        assert "@P2PVPN@" in text
        assert "@CONFIG_DIR@" in text


def test_client_unit_runs_one_instance_per_network(tmp_path: Path) -> None:
    text = render_unit(server=False, command=COMMAND, config_dir=Path("/etc/p2pvpn"))
    assert "@" + "P2PVPN@" not in text
    unit = parse_unit(text)
    service = unit["Service"]
    assert service["ExecStart"] == (
        "/opt/p2pvpn/bin/p2pvpn run -c /etc/p2pvpn/%i.cfg --name %i --state-dir %S/p2pvpn/%i"
        " --password-file ${CREDENTIALS_DIRECTORY}/password"
    )
    # The password reaches the service as a credential, never on the command line.
    assert all_values(text, "Service", "LoadCredential") == ["password:/etc/p2pvpn/%i.password"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # config errors: no restart loop
    assert service["StateDirectory"] == "p2pvpn/%i"
    assert service["AmbientCapabilities"] == "CAP_NET_ADMIN CAP_NET_RAW"
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW"
    assert service["DeviceAllow"] == "/dev/net/tun rw"
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "PrivateDevices" not in service  # it would hide /dev/net/tun
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "%i" in unit["Unit"]["Description"]


def test_server_unit() -> None:
    text = render_unit(server=True, command=COMMAND, config_dir=Path("/srv/vpn/"))
    service = parse_unit(text)["Service"]
    assert service["ExecStart"] == (
        "/opt/p2pvpn/bin/p2pvpn server -c ${CREDENTIALS_DIRECTORY}/server.cfg"
        " --password-file ${CREDENTIALS_DIRECTORY}/password"
        " --control-socket %t/p2pvpn/server.sock"
    )
    # Where `p2pvpn server status` run by root asks by default.
    assert service["RuntimeDirectory"] == "p2pvpn"
    assert service["Restart"] == "on-failure"
    assert service["PrivateDevices"] == "yes"
    assert service["ExecReload"] == "kill -HUP $MAINPID"  # rereads the TLS certificate


def test_server_unit_runs_without_root() -> None:
    text = render_unit(server=True, command=COMMAND, config_dir=Path("/etc/p2pvpn"))
    service = parse_unit(text)["Service"]
    # A transient unprivileged user; binding a low port is its only capability.
    assert service["DynamicUser"] == "yes"
    assert "User" not in service
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["NoNewPrivileges"] == "yes"
    assert int(service["LimitNOFILE"]) >= 65536  # the connection caps need descriptors
    # It cannot read /etc/p2pvpn: systemd hands it the config and the password.
    assert all_values(text, "Service", "LoadCredential") == [
        "server.cfg:/etc/p2pvpn/server.cfg",
        "password:/etc/p2pvpn/server.password",
    ]
    # The TLS files are read in place (through a group), not as credentials, which
    # systemd copies only at start: a SIGHUP must see a renewed certificate.
    assert "#   SupplementaryGroups=ssl-cert" in text
    assert "systemctl reload p2pvpn-server" in text
    assert all_values(text, "Service", "ExecReload") == ["kill -HUP $MAINPID"]


def test_command_words_are_quoted_and_escaped() -> None:
    command = ["/opt/my venv/bin/python3", "-m", "p2pvpn"]
    text = render_unit(server=True, command=command, config_dir=Path("/etc/p2pvpn"))
    exec_start = parse_unit(text)["Service"]["ExecStart"]
    assert exec_start.startswith('"/opt/my venv/bin/python3" -m p2pvpn server -c ')
    assert "${CREDENTIALS_DIRECTORY}" in exec_start  # the template's own $ is not escaped
    text = render_unit(server=True, command=["/opt/100%$x/p2pvpn"], config_dir=Path("/etc"))
    assert parse_unit(text)["Service"]["ExecStart"].startswith('"/opt/100%%$$x/p2pvpn" server')
    with pytest.raises(ServiceError, match="absolute"):
        render_unit(server=True, command=COMMAND, config_dir=Path("etc"))
    with pytest.raises(ServiceError, match="unsupported characters"):
        render_unit(server=True, command=COMMAND, config_dir=Path("/etc/my vpn"))


def test_p2pvpn_command(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "p2pvpn"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert p2pvpn_command(str(script), "/usr/bin/python3") == [str(script)]
    # Not the console script (python -m p2pvpn, pytest, ...): the interpreter runs the module.
    assert p2pvpn_command("/x/__main__.py", "/venv/bin/python") == [
        "/venv/bin/python",
        "-m",
        "p2pvpn",
    ]
    assert p2pvpn_command(str(tmp_path / "p2pvpn"), "/venv/bin/python")[1:] == ["-m", "p2pvpn"]
    assert p2pvpn_command()[0] == os.path.abspath(sys.executable)


def test_install_client_unit(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    units, configs = dirs
    (configs / "lab.cfg").write_text("websocket = ws://h\n")
    (configs / "lab.password").write_text("secret\n")
    (configs / "lab.password").chmod(0o600)
    assert (
        main(["install-service", "lab", "--prefix", str(units), "--config-dir", str(configs)]) == 0
    )
    path = units / CLIENT_UNIT
    text = path.read_text()
    assert f" -c {configs}/%i.cfg " in text
    assert f"ExecStart={os.path.abspath(sys.executable)} -m p2pvpn run" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    captured = capsys.readouterr()
    assert f"wrote {path}" in captured.out
    assert "systemctl daemon-reload" in captured.out
    assert "systemctl enable --now p2pvpn@lab" in captured.out
    assert "warning" not in captured.err
    assert [entry.name for entry in units.iterdir()] == [CLIENT_UNIT]  # no temporary left

    # A second network on the same host uses the same template: nothing to rewrite.
    assert (
        main(["install-service", "home", "--prefix", str(units), "--config-dir", str(configs)]) == 0
    )
    captured = capsys.readouterr()
    assert f"{path} is already up to date" in captured.out
    assert "systemctl enable --now p2pvpn@home" in captured.out
    assert f"warning: {configs}/home.cfg does not exist" in captured.err
    assert f"warning: {configs}/home.password does not exist: put the network password" in (
        captured.err
    )
    assert f"`chmod 600 {configs}/home.password`" in captured.err


def test_install_warns_about_a_readable_password_file(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    units, configs = dirs
    (configs / "server.cfg").write_text("mode = server\nwebsocket = ws://0.0.0.0:80\n")
    password = configs / "server.password"
    password.write_text("secret\n")
    password.chmod(0o644)
    argv = ["install-service", "--server", "--prefix", str(units), "--config-dir", str(configs)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: {password} is readable by group or others (mode 0644)" in err
    assert "secret" not in err
    password.chmod(0o600)
    assert main(argv) == 0
    assert "password" not in capsys.readouterr().err


def test_install_warns_when_the_server_user_cannot_run_p2pvpn(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    units, configs = dirs
    private = tmp_path / "root-home"
    (private / "venv" / "bin").mkdir(parents=True)
    private.chmod(0o700)
    program = private / "venv" / "bin" / "p2pvpn"
    out, err = io.StringIO(), io.StringIO()
    assert (
        install_service(
            None, prefix=units, config_dir=configs, command=[str(program)], out=out, err=err
        )
        == 0
    )
    assert f"warning: {private} is not searchable by other users" in err.getvalue()
    assert "DynamicUser" in err.getvalue()
    private.chmod(0o755)
    err = io.StringIO()
    install_service(
        None, prefix=units, config_dir=configs, command=[str(program)], out=out, err=err
    )
    assert f"{private} is not searchable" not in err.getvalue()
    # A client runs as root: no such warning.
    private.chmod(0o700)
    err = io.StringIO()
    install_service(
        "lab", prefix=units, config_dir=configs, command=[str(program)], out=out, err=err
    )
    assert f"{private} is not searchable" not in err.getvalue()


def test_install_server_unit(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    units, configs = dirs
    assert (
        main(["install-service", "--server", "--prefix", str(units), "--config-dir", str(configs)])
        == 0
    )
    text = (units / SERVER_UNIT).read_text()
    assert f"LoadCredential=server.cfg:{configs}/server.cfg\n" in text
    assert "server -c ${CREDENTIALS_DIRECTORY}/server.cfg" in text
    captured = capsys.readouterr()
    assert "systemctl enable --now p2pvpn-server" in captured.out
    assert f"warning: {configs}/server.cfg does not exist" in captured.err
    assert f"warning: {configs}/server.password does not exist" in captured.err


def test_dry_run_writes_nothing(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    units, configs = dirs
    argv = ["install-service", "lab", "--prefix", str(units), "--config-dir", str(configs)]
    assert main([*argv, "--dry-run"]) == 0
    assert not units.exists()
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out
    assert "[Service]" in out
    assert "ExecStart=" in out
    assert "systemctl enable --now p2pvpn@lab" in out


def test_a_different_unit_is_not_overwritten_without_force(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    units, configs = dirs
    units.mkdir()
    path = units / CLIENT_UNIT
    path.write_text("[Service]\nExecStart=/usr/bin/true\n")
    argv = ["install-service", "lab", "--prefix", str(units), "--config-dir", str(configs)]
    assert main(argv) == 1
    assert path.read_text() == "[Service]\nExecStart=/usr/bin/true\n"
    assert "use --force" in capsys.readouterr().err
    assert main([*argv, "--dry-run"]) == 0  # shows what would change
    assert "installing needs --force" in capsys.readouterr().err
    assert path.read_text() == "[Service]\nExecStart=/usr/bin/true\n"
    assert main([*argv, "--force"]) == 0
    assert f"replaced {path}" in capsys.readouterr().out
    assert "p2pvpn run -c" in path.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["install-service"], "needs a NAME (or --server)"),
        (["install-service", "lab", "--server"], "--server takes no NAME"),
        (["install-service", ""], "NAME must not be empty"),
        (["install-service", "a/b"], "NAME: 'a/b' may only contain letters"),
        (["install-service", "toolongna"], "NAME: 'toolongna' is too long"),
    ],
)
def test_bad_names(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unwritable_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["install-service", "lab", "--prefix", str(blocker / "units")]
    assert main(argv) == 1
    assert f"cannot write {blocker}/units/{CLIENT_UNIT}" in capsys.readouterr().err


def test_install_service_api_returns_status(dirs: tuple[Path, Path]) -> None:
    units, configs = dirs
    out, err = io.StringIO(), io.StringIO()
    status = install_service(
        "lab", prefix=units, config_dir=configs, command=COMMAND, out=out, err=err
    )
    assert status == 0
    assert "ExecStart=/opt/p2pvpn/bin/p2pvpn run" in (units / CLIENT_UNIT).read_text()
    assert "does not exist" in err.getvalue()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("server", [False, True])
def test_systemd_accepts_the_units(tmp_path: Path, server: bool) -> None:
    text = render_unit(
        server=server, command=p2pvpn_command("", sys.executable), config_dir=Path("/etc/p2pvpn")
    )
    path = tmp_path / ("p2pvpn-server.service" if server else "p2pvpn@lab.service")
    path.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert path.name not in result.stderr, result.stderr  # no warning about our unit
