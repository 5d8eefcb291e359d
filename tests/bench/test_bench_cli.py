"""`p2pvpn bench ...`: what every kind shares (the table, --json, errors, exit status)."""

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest

from p2pvpn import cli
from p2pvpn.bench import cli as bench_cli
from p2pvpn.bench.report import BenchError, Report


def _patch_kind(monkeypatch: pytest.MonkeyPatch, outcome: Report | BenchError) -> None:
    """`p2pvpn bench crypto` runs a fake that returns ``outcome`` (or raises it)."""
    fake = ModuleType("fake_crypto")

    def run(args: argparse.Namespace) -> Report:
        if isinstance(outcome, BenchError):
            raise outcome
        return outcome

    fake.configure_parser = lambda parser: None  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    real = bench_cli._module
    monkeypatch.setattr(bench_cli, "_module", lambda name: fake if name == "crypto" else real(name))


def test_the_table_goes_to_stdout_and_the_json_to_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = Report("crypto", {"cpus": 2}, {}).finish("the table")
    _patch_kind(monkeypatch, report)
    out = tmp_path / "result.json"
    assert cli.main(["bench", "crypto", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the table\n")
    assert json.loads(out.read_text(encoding="utf-8"))["command"] == "crypto"


def test_a_failed_measurement_is_exit_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_kind(monkeypatch, Report("crypto", {}, {}).finish("partial", ok=False))
    assert cli.main(["bench", "crypto"]) == 1


def test_a_bench_error_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _patch_kind(monkeypatch, BenchError("no compiled module: pip install p2pvpn"))
    assert cli.main(["bench", "crypto"]) == 1
    err = capsys.readouterr().err
    assert err == "p2pvpn bench crypto: error: no compiled module: pip install p2pvpn\n"


def test_bench_needs_a_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench"]) == 2
    assert "KIND" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["crypto"], ["local"], ["peer", "10.0.0.2"]])
def test_every_measuring_kind_takes_json_and_plot(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(["bench", *argv, "--json", "a.json", "--plot", "a.png"])
    assert args.json == Path("a.json") and args.plot == Path("a.png")
    assert args.bench_command == argv[0]
