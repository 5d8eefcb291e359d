"""Member names (issue 16), sans I/O: DNS labels, the Candy ping payload, unique names.

A Candy client already tells its server its host name: the payload of its
WebSocket ping is ``candy::<os>::<version>::<hostname>``. A p2pvpn client
sends the same, so a server learns every member's name without a new frame.
Names are DNS labels (``clean_label``); duplicates get a suffix that depends
only on the member's address and on the members ranked before it, so a name
never changes because somebody joined later.
"""

import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

__all__ = [
    "DEFAULT_DOMAIN",
    "MAX_DOMAIN_LENGTH",
    "MAX_LABEL_LENGTH",
    "MAX_PING_PAYLOAD",
    "PING_PREFIX",
    "PingIdentity",
    "check_domain",
    "clean_label",
    "decode_ping_payload",
    "encode_ping_payload",
    "is_clean_label",
    "unique_name",
    "unique_names",
]

DEFAULT_DOMAIN = "vpn"
MAX_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253
# A control frame's payload is at most 125 bytes (RFC 6455 5.5).
MAX_PING_PAYLOAD = 125
PING_PREFIX = "candy::"
_PING_SEPARATOR = "::"
_PING_FIELDS = 4
_LABEL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# What clean_label gives: empty, or 1..63 of [a-z0-9-] starting and ending
# with a letter or digit (and no "--", checked apart).
_CLEAN_LABEL = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)?")


def _label_character(character: str) -> str:
    # Only ASCII letters are lowered: str.lower() maps some non-ASCII
    # characters (the Kelvin sign) to ASCII ones, or to two characters.
    if "A" <= character <= "Z":
        return character.lower()
    return character if character in _LABEL_CHARACTERS else "-"


def _collapse_dashes(text: str) -> str:
    while "--" in text:
        text = text.replace("--", "-")
    return text


def clean_label(text: str) -> str:
    """`text` as a lowercase DNS label of [a-z0-9-], at most 63 characters; "" if none is left."""
    label = _collapse_dashes("".join(_label_character(character) for character in text))
    return label.strip("-")[:MAX_LABEL_LENGTH].rstrip("-")


def is_clean_label(text: str) -> bool:
    """``clean_label(text) == text``, without building the cleaned text (one per decoded name)."""
    return _CLEAN_LABEL.fullmatch(text) is not None and "--" not in text


def check_domain(text: str) -> str | None:
    """None when `text` is a usable domain (lowercase labels joined by dots); else the reason."""
    if not text:
        return "it is empty"
    if len(text) > MAX_DOMAIN_LENGTH:
        return f"it has {len(text)} characters, a DNS name at most {MAX_DOMAIN_LENGTH}"
    if text.startswith(".") or text.endswith("."):
        return "it starts or ends with a dot"
    for label in text.split("."):
        if not label:
            return "it has an empty label (two dots in a row)"
        if not is_clean_label(label):
            return (
                f"label {label!r} is not a lowercase DNS label "
                "(a-z, 0-9 and inner '-', at most 63 characters)"
            )
    return None


@dataclass(frozen=True, slots=True)
class PingIdentity:
    """What a member's ping payload says about it; `hostname` is already a clean label."""

    os: str
    version: str
    hostname: str


def encode_ping_payload(hostname: str, version: str, os_name: str = "linux") -> bytes:
    """The ping payload a Candy client sends: ``candy::<os>::<version>::<hostname>``."""
    for field_name, value in (("os", os_name), ("version", version)):
        if _PING_SEPARATOR in value:
            raise ValueError(f"ping payload {field_name} {value!r} contains '::'")
    payload = _PING_SEPARATOR.join(("candy", os_name, version, hostname)).encode("utf-8")
    if len(payload) > MAX_PING_PAYLOAD:
        raise ValueError(
            f"ping payload of {len(payload)} bytes is over the {MAX_PING_PAYLOAD} of a ping"
        )
    return payload


def decode_ping_payload(payload: bytes) -> PingIdentity | None:
    """The identity in a Candy-style ping payload; None for any other payload."""
    if len(payload) > MAX_PING_PAYLOAD:
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.startswith(PING_PREFIX):
        return None
    fields = text.split(_PING_SEPARATOR, _PING_FIELDS - 1)
    if len(fields) != _PING_FIELDS:
        return None
    _, os_name, version, raw_hostname = fields
    hostname = clean_label(raw_hostname)
    if not hostname:
        return None
    return PingIdentity(os_name, version, hostname)


def _with_suffix(base: str, suffix: str) -> str:
    # Cutting the base may leave a trailing "-", which would make "--".
    return base[: MAX_LABEL_LENGTH - len(suffix)].rstrip("-") + suffix


def _candidates(name: str, address: IPv4Address) -> Iterable[str]:
    yield name
    octets = address.packed
    yield _with_suffix(name, f"-{octets[-1]}")
    full = "-" + "-".join(str(octet) for octet in octets)
    yield _with_suffix(name, full)
    # Only reached when members named themselves like the suffixed forms.
    counter = 2
    while True:
        yield _with_suffix(name, f"{full}-{counter}")
        counter += 1


def unique_name(name: str, address: IPv4Address, taken: Container[str]) -> str:
    """The name ``address`` gets for the clean label ``name`` when ``taken`` are gone.

    One step of :func:`unique_names`, for callers that keep the taken names
    between updates.
    """
    return next(candidate for candidate in _candidates(name, address) if candidate not in taken)


def unique_names(entries: Sequence[tuple[IPv4Address, str]]) -> dict[IPv4Address, str]:
    """Each address's unique name; `entries` in priority order, the first keeps the plain name.

    A later duplicate gets "-<last octet>" (laptop-7), or "-<a>-<b>-<c>-<d>" when
    that is taken too. An entry's result depends only on the entries before it.
    Names are cleaned first; an address with no usable name, or listed a second
    time, is left out.
    """
    names: dict[IPv4Address, str] = {}
    taken: set[str] = set()
    for address, raw_name in entries:
        name = clean_label(raw_name)
        if not name or address in names:
            continue
        unique = unique_name(name, address, taken)
        names[address] = unique
        taken.add(unique)
    return names
