"""The facts about this machine that every benchmark report carries.

Results from several routers are only comparable next to what ran them: the
CPU, whether it has AES instructions (without them AES-GCM is several times
slower), the kernel, and the OpenSSL that did the crypto. Everything here is
read from /proc and the running interpreter: cheap, no root, no subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import socket
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "machine_facts"]

_CPUINFO = Path("/proc/cpuinfo")
_LOADAVG = Path("/proc/loadavg")
_MAPS = Path("/proc/self/maps")
# x86 names the CPU in "model name"; arm64 kernels often have no model line at
# all, and some boards name it in "Hardware" or "Model".
_MODEL_KEYS = ("model name", "Hardware", "Model", "cpu model", "cpu")
# x86 lists CPU features in "flags", arm64 in "Features"; both call AES "aes".
_FLAG_KEYS = ("flags", "Features")


def machine_facts() -> dict[str, Any]:
    """What ran the benchmark: CPU, AES instructions, kernel, Python, OpenSSL, p2pvpn."""
    from p2pvpn import __version__

    cpuinfo = _read(_CPUINFO)
    compiled_libcrypto = _compiled_libcrypto()
    cryptography_openssl = _cryptography_openssl()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(cpuinfo),
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "aes_instructions": _aes_instructions(cpuinfo),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": compiled_libcrypto or cryptography_openssl,
        "cryptography_openssl": cryptography_openssl,
        "p2pvpn": __version__,
        "compiled": _compiled_importable(),
        "loadavg": _loadavg(),
    }


def describe_machine(facts: dict[str, Any]) -> list[str]:
    """Two or three lines for the top of a benchmark's table."""
    aes = {True: "yes", False: "NO (AES-GCM runs in software)", None: "unknown"}
    lines = [
        f"machine: {facts.get('hostname', '?')}, {facts.get('cpu_model', '?')}, "
        f"{facts.get('cpus', '?')} CPUs ({facts.get('arch', '?')}), "
        f"AES instructions: {aes.get(facts.get('aes_instructions'), 'unknown')}",
        f"software: p2pvpn {facts.get('p2pvpn', '?')} "
        f"({'compiled modules' if facts.get('compiled') else 'compiled modules NOT built'}), "
        f"Linux {facts.get('kernel', '?')}, Python {facts.get('python', '?')}, "
        f"{facts.get('openssl') or 'OpenSSL unknown'}",
    ]
    loadavg = facts.get("loadavg")
    if loadavg:
        lines.append("load average at the start: " + " ".join(f"{v:.2f}" for v in loadavg))
    return lines


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo_value(cpuinfo: str, key: str) -> str | None:
    match = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else None


def _cpu_model(cpuinfo: str) -> str:
    for key in _MODEL_KEYS:
        value = _cpuinfo_value(cpuinfo, key)
        if value:
            return value
    return platform.processor() or platform.machine() or "unknown"


def _aes_instructions(cpuinfo: str) -> bool | None:
    for key in _FLAG_KEYS:
        flags = _cpuinfo_value(cpuinfo, key)
        if flags is not None:
            return "aes" in flags.split()
    return None  # no flags line: /proc/cpuinfo unreadable or an unusual architecture


def _loadavg() -> list[float] | None:
    try:
        return [float(value) for value in _read(_LOADAVG).split()[:3]]
    except ValueError:
        return None


def _compiled_importable() -> bool:
    try:
        import p2pvpn._fastpath
        import p2pvpn._gcm  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_libcrypto() -> str | None:
    """The OpenSSL version and file of the libcrypto the compiled modules were linked to.

    Once p2pvpn._gcm is imported, its libcrypto is mapped into this process, so
    /proc/self/maps names the file and ctypes asks that very library its
    version (no ``ldd`` needed). None when the compiled modules are not built.
    """
    if not _compiled_importable():
        return None
    libraries = {
        line.split()[-1]
        for line in _read(_MAPS).splitlines()
        if "/libcrypto.so" in line and line.split()[-1].startswith("/")
    }
    for library in sorted(libraries):
        with contextlib.suppress(OSError, AttributeError):
            libcrypto = ctypes.CDLL(library)
            libcrypto.OpenSSL_version.restype = ctypes.c_char_p
            libcrypto.OpenSSL_version.argtypes = [ctypes.c_int]
            version: bytes = libcrypto.OpenSSL_version(0)
            return f"{version.decode(errors='replace')} ({library})"
    return "libcrypto (version unknown)"


def _cryptography_openssl() -> str | None:
    """The OpenSSL inside ``cryptography``, which the pure data plane encrypts with."""
    try:
        from cryptography.hazmat.backends.openssl import backend
    except ImportError:
        return None
    text: str = backend.openssl_version_text()
    return f"{text} (cryptography)"
