"""The machine facts every bench report carries, and the lines at the top of every table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from p2pvpn.bench import machine
from p2pvpn.bench.machine import describe_machine, machine_facts

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme sse2 aes pclmulqdq avx2
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
"""


def _with_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text, encoding="utf-8")
    monkeypatch.setattr(machine, "_CPUINFO", cpuinfo)


def test_the_facts_of_this_machine() -> None:
    facts = machine_facts()
    required = {"hostname", "cpu_model", "cpus", "aes_instructions", "kernel", "python"}
    assert required | {"openssl", "p2pvpn", "compiled", "loadavg"} <= facts.keys()
    assert facts["cpus"] == os.cpu_count()
    assert facts["aes_instructions"] in (True, False, None)
    assert isinstance(facts["compiled"], bool)
    assert facts["cpu_model"]
    assert facts["loadavg"] is None or len(facts["loadavg"]) == 3
    assert facts["openssl"] and "OpenSSL" in facts["openssl"]


@pytest.mark.fastpath
def test_openssl_is_the_libcrypto_of_the_compiled_modules() -> None:
    facts = machine_facts()
    assert facts["compiled"] is True
    assert "libcrypto" in facts["openssl"]


def test_without_compiled_modules_openssl_is_cryptographys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "p2pvpn._gcm", None)  # import now raises ImportError
    facts = machine_facts()
    assert facts["compiled"] is False
    assert facts["openssl"] == facts["cryptography_openssl"]
    assert "cryptography" in facts["openssl"]
    assert "NOT built" in "\n".join(describe_machine(facts))


def test_x86_model_and_aes_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _with_cpuinfo(monkeypatch, tmp_path, X86_CPUINFO)
    facts = machine_facts()
    assert facts["cpu_model"] == "AMD EPYC 7763 64-Core Processor"
    assert facts["aes_instructions"] is True


def test_arm_without_aes_and_without_a_model_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _with_cpuinfo(monkeypatch, tmp_path, ARM_CPUINFO)
    facts = machine_facts()
    assert facts["aes_instructions"] is False
    assert facts["cpu_model"]  # platform's answer instead of an empty name


def test_unreadable_cpuinfo_means_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(machine, "_CPUINFO", tmp_path / "missing")
    facts = machine_facts()
    assert facts["aes_instructions"] is None
    assert "AES instructions: unknown" in describe_machine(facts)[0]


def test_description_is_short_and_says_what_matters() -> None:
    lines = describe_machine(machine_facts())
    assert 1 <= len(lines) <= 3
    assert "AES instructions" in lines[0]
    assert "CPUs" in lines[0]
    assert "p2pvpn" in lines[1]


def test_description_survives_missing_facts() -> None:
    lines = describe_machine({})
    assert 1 <= len(lines) <= 3
    assert "AES instructions: unknown" in lines[0]
    no_aes = describe_machine({"aes_instructions": False})[0]
    assert "AES instructions: NO" in no_aes
