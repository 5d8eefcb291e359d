"""TLS for ``wss://``: the server's certificate, checked at start and reloaded on SIGHUP.

:class:`ServerTls` owns the :class:`ssl.SSLContext` the listening socket was
made with. A reload builds a complete new context and swaps it in: every new
connection is moved onto the current context from the handshake's SNI
callback (which OpenSSL calls with or without a server name), while the TLS
sessions already open keep theirs, so a renewed certificate needs no restart
and drops nobody. A reload that fails keeps the old certificate.

:func:`make_self_signed_certificate` makes a certificate and key (PEM) for the
demo and the tests with ``cryptography``; nothing here runs ``openssl``.
"""

import datetime
import ipaddress
import logging
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pvpn._files import write_atomically

__all__ = [
    "MINIMUM_TLS_VERSION",
    "CertificateInfo",
    "CertificatePem",
    "ServerTls",
    "TlsError",
    "certificate_info",
    "load_server_context",
    "make_self_signed_certificate",
    "new_server_context",
    "write_certificate",
]

logger = logging.getLogger(__name__)

# TLS 1.0 and 1.1 are deprecated (RFC 8996); every OpenSSL of the last decade,
# Candy's client included, speaks 1.2 or 1.3.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TlsError(Exception):
    """A certificate or key that cannot be used; the message names the key and the file."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the logs say about a certificate."""

    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int
    sha256: str  # fingerprint as hex pairs with colons, as browsers show it

    def describe(self) -> str:
        return (
            f"subject {self.subject}, valid until {self.not_after:%Y-%m-%d %H:%M} UTC, "
            f"serial {self.serial:x}, SHA-256 {self.sha256}"
        )


class CertificatePem(NamedTuple):
    """A certificate and its private key, PEM encoded."""

    certificate: bytes
    key: bytes


def certificate_info(certificate: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string() or "(empty)",
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        serial=certificate.serial_number,
        sha256=certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


# -------------------------------------------------------------------------- loading


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{key} {path}: no such file") from None
    except OSError as exc:
        raise TlsError(f"{key} {path}: cannot read: {exc.strerror or exc}") from None


def _parse_certificate(path: Path) -> x509.Certificate:
    try:
        # The first certificate is the server's; any others are its chain.
        return x509.load_pem_x509_certificates(_read("tls_cert", path))[0]
    except ValueError:
        raise TlsError(f"tls_cert {path}: not a PEM certificate") from None


def _warn_if_world_readable(path: Path) -> None:
    # Group access is a common set-up (an ssl-cert group); everyone is not.
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        logger.warning(
            "tls_key %s is readable by every user (mode %04o): chmod o-r it",
            path,
            stat.S_IMODE(mode),
        )


def _parse_key(path: Path) -> PrivateKeyTypes:
    data = _read("tls_key", path)
    _warn_if_world_readable(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(
            f"tls_key {path}: the key is protected by a passphrase; the server needs it "
            "unencrypted (in a file only the server's user can read)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"tls_key {path}: not a PEM private key") from None


def _check_pair(
    certificate: x509.Certificate, key: PrivateKeyTypes, cert_file: Path, key_file: Path
) -> None:
    try:
        certified = certificate.public_key().public_bytes(*_SPKI)
        matches = key.public_key().public_bytes(*_SPKI) == certified
    except (ValueError, TypeError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        raise TlsError(f"tls_key {key_file} does not match the certificate in tls_cert {cert_file}")


def _warn_if_not_valid_now(info: CertificateInfo, cert_file: Path) -> None:
    # Not fatal: Candy's clients do not verify, and a server that keeps running
    # can pick up the renewed certificate on SIGHUP.
    now = datetime.datetime.now(datetime.UTC)
    if info.not_after < now:
        logger.warning(
            "tls_cert %s expired on %s UTC: clients that verify will refuse it",
            cert_file,
            f"{info.not_after:%Y-%m-%d %H:%M}",
        )
    elif info.not_before > now:
        logger.warning(
            "tls_cert %s is not valid before %s UTC: clients that verify will refuse it",
            cert_file,
            f"{info.not_before:%Y-%m-%d %H:%M}",
        )


def new_server_context() -> ssl.SSLContext:
    """The server side's TLS settings, without a certificate: TLS 1.2+, no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.verify_mode = ssl.CERT_NONE  # clients prove themselves with the password
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def load_server_context(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, CertificateInfo]:
    """A server context serving ``cert_file`` (PEM, chain allowed) with ``key_file``.

    Raises TlsError naming the key and file: missing, unreadable, not PEM, a
    key with a passphrase, or a key that does not belong to the certificate.
    """
    certificate = _parse_certificate(cert_file)
    key = _parse_key(key_file)
    _check_pair(certificate, key, cert_file, key_file)
    info = certificate_info(certificate)
    _warn_if_not_valid_now(info, cert_file)
    context = new_server_context()
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        # The files were read and checked above; they changed since, or OpenSSL
        # refuses something cryptography accepts.
        raise TlsError(f"tls_cert {cert_file} / tls_key {key_file}: {exc}") from None
    return context, info


class ServerTls:
    """The listening context and the certificate it currently serves; see the module doc."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """Load the certificate; raises TlsError naming the file."""
        self.cert_file = cert_file
        self.key_file = key_file
        self._current, self.certificate = load_server_context(cert_file, key_file)
        self.listener = self._current
        self.listener.sni_callback = self._use_current
        self.reloads = 0
        self.failed_reloads = 0

    def _use_current(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if connection.context is not self._current:
            connection.context = self._current

    def reload(self) -> bool:
        """Serve the files' current certificate to new connections; False (logged) if unusable."""
        try:
            context, info = load_server_context(self.cert_file, self.key_file)
        except TlsError as exc:
            self.failed_reloads += 1
            logger.error("TLS certificate not reloaded, still serving the old one: %s", exc)
            return False
        self._current, self.certificate = context, info
        self.reloads += 1
        logger.info("TLS certificate reloaded from %s: %s", self.cert_file, info.describe())
        return True


# ------------------------------------------------------------------------- making


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_self_signed_certificate(
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    common_name: str = "p2pvpn server",
    valid_for: datetime.timedelta = datetime.timedelta(days=30),
    not_before: datetime.datetime | None = None,
) -> CertificatePem:
    """A fresh P-256 key and a self-signed certificate for ``hosts`` (names or IP addresses).

    Clients trust it by naming the certificate file as their ``tls_ca``. The
    validity starts a minute before ``not_before`` (default now) to absorb clock skew.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = (not_before or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=1)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return CertificatePem(certificate.public_bytes(serialization.Encoding.PEM), key_pem)


def write_certificate(
    pem: CertificatePem, directory: Path, stem: str = "server"
) -> tuple[Path, Path]:
    """Write ``<stem>.crt`` (0644) and ``<stem>.key`` (0600) into ``directory``; their paths."""
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_atomically(key_file, pem.key.decode("ascii"), mode=0o600)
    write_atomically(cert_file, pem.certificate.decode("ascii"), mode=0o644)
    return cert_file, key_file
