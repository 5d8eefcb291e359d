"""`p2pvpn bench crypto`: checked against the reference before timing, every figure in the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from p2pvpn.bench import crypto, crypto_measure
from p2pvpn.bench.report import BenchError
from p2pvpn.cli import main
from p2pvpn.wire.crypto import DatagramCipher

SIZES = ("64", "512", "1400")


def _no_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> ModuleType:
        raise ImportError("No module named 'p2pvpn._gcm'")

    monkeypatch.setattr(crypto_measure, "_import_gcm", unavailable)


def _run_cli(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "crypto.json"
    code = main(["bench", "crypto", "--quick", "--json", str(path), *extra])
    return code, json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.fastpath
@pytest.mark.parametrize("size", [1, 64, 1400, 9000])
def test_compiled_gives_the_reference_bytes(size: int) -> None:
    compiled, reason = crypto_measure.compiled_implementation()
    assert compiled is not None, reason
    crypto_measure.check(compiled, size)  # raises BenchError on any difference


@pytest.mark.fastpath
def test_compiled_seal_with_fixed_ivs_is_byte_for_byte_the_reference() -> None:
    compiled, _ = crypto_measure.compiled_implementation()
    assert compiled is not None
    key, iv = bytes(range(32)), bytes(range(12))
    plaintexts = [bytes([n]) * 1400 for n in range(4)]
    expected = [DatagramCipher(key).seal(p, iv) for p in plaintexts]
    cipher = compiled.make(key)
    assert [cipher.seal(p, iv) for p in plaintexts] == expected
    assert compiled.seal_many(cipher)(plaintexts, iv * 4) == expected


def test_the_reference_passes_the_published_vector() -> None:
    crypto_measure.check_reference()
    pure, reason = crypto_measure.pure_implementation()
    assert pure is not None, reason
    crypto_measure.check(pure, 64)


@pytest.mark.parametrize("fault", ["flipped bit", "raises"])
def test_a_cipher_that_disagrees_is_refused_and_never_timed(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = DatagramCipher

    class OffByOne:
        """Seals like the reference, except for one flipped bit, or not at all."""

        def __init__(self, key: bytes) -> None:
            self._reference = reference(key)

        def seal(self, plaintext: bytes, iv: bytes | None = None) -> bytes:
            if fault == "raises":
                raise RuntimeError("EVP_EncryptUpdate failed")
            datagram = bytearray(self._reference.seal(plaintext, iv))
            datagram[-1] ^= 0x80
            return bytes(datagram)

        def open(self, datagram: bytes) -> bytes:
            return self._reference.open(datagram)

    def seal_batch(cipher: Any, plaintexts: list[bytes], ivs: bytes | None = None) -> list[bytes]:
        if ivs is None:
            return [cipher.seal(p) for p in plaintexts]
        return [cipher.seal(p, ivs[i * 12 : i * 12 + 12]) for i, p in enumerate(plaintexts)]

    def open_batch(cipher: Any, datagrams: list[bytes]) -> list[bytes | None]:
        return [crypto_measure.open_or_none(cipher, d) for d in datagrams]

    fake = SimpleNamespace(GcmContext=OffByOne, seal_batch=seal_batch, open_batch=open_batch)
    monkeypatch.setattr(crypto_measure, "_import_gcm", lambda: fake)

    def timed(*args: object) -> object:
        raise AssertionError("a cipher that failed the check was timed")

    monkeypatch.setattr(crypto_measure, "_time_rounds", timed)
    monkeypatch.setattr(crypto_measure, "_measure_threads", timed)
    args = argparse.Namespace(quick=True, seconds=None, sizes=(64,), threads=None)
    with pytest.raises(BenchError, match=r"compiled AES-256-GCM disagrees .* seal \(single\)"):
        crypto.run(args)
    # Through the CLI: one clear line and exit status 1.
    assert main(["bench", "crypto", "--quick", "--sizes", "64"]) == 1


@pytest.mark.fastpath
def test_cli_quick_json_has_every_size_operation_and_implementation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _run_cli(tmp_path)
    assert code == 0
    assert report["command"] == "crypto" and report["ok"] is True
    assert report["machine"]["cpus"] and "aes_instructions" in report["machine"]
    measurements = report["results"]["measurements"]
    for operation in ("seal", "open"):
        for size in SIZES:
            for implementation in ("compiled", "pure"):
                for mode in ("single", "batch"):
                    figure = measurements[operation][size][implementation][mode]
                    assert figure["status"] == "ok"
                    assert figure["gbit_per_second"] > 0 and figure["packets_per_second"] > 0
                    assert figure["ns_per_packet"] > 0
                ratio = report["results"]["compiled_over_pure"][operation][size]["batch"]
                assert ratio is not None and ratio > 0
    bars = {(bar["group"], bar["label"]) for bar in report["bars"]}
    assert ("seal 1400 B", "compiled batch") in bars and ("open 64 B", "pure single") in bars
    assert all(bar["unit"].startswith("Gbit/s") for bar in report["bars"])
    out, err = capsys.readouterr()
    assert "AES instructions" in out and "pure batch (Python loop)" in out
    assert "bench crypto" in err  # the progress goes to stderr, the table to stdout


def test_pure_only_when_the_compiled_module_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_compiled(monkeypatch)
    code, report = _run_cli(tmp_path)
    assert code == 0
    measurements = report["results"]["measurements"]
    for operation in ("seal", "open"):
        for size in SIZES:
            assert measurements[operation][size]["pure"]["batch"]["status"] == "ok"
            assert measurements[operation][size]["compiled"]["single"] == {"status": "not built"}
            assert report["results"]["compiled_over_pure"][operation][size]["single"] is None
    assert report["results"]["implementations"]["compiled"]["available"] is False
    assert all(bar["value"] is None for bar in report["bars"] if "compiled" in bar["label"])
    out = capsys.readouterr().out
    assert "not built" in out


@pytest.mark.fastpath
def test_threads_zero_leaves_the_all_cores_figure_out(tmp_path: Path) -> None:
    code, report = _run_cli(tmp_path, "--threads", "0", "--sizes", "64")
    assert code == 0
    assert "threads" not in report["results"]["measurements"]["seal"]["64"]["compiled"]
    code, report = _run_cli(tmp_path, "--threads", "2", "--sizes", "64")
    threads = report["results"]["measurements"]["open"]["64"]["compiled"]["threads"]
    assert threads["status"] == "ok" and threads["threads"] == 2


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--sizes", "64,abc"), ("--sizes", "0"), ("--seconds", "-1"), ("--threads", "many")],
)
def test_bad_options_name_the_flag_and_value(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "crypto", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err
