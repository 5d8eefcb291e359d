"""Member names: DNS labels, domains, the Candy ping payload, unique names."""

import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.names import (
    MAX_LABEL_LENGTH,
    PingIdentity,
    check_domain,
    clean_label,
    decode_ping_payload,
    encode_ping_payload,
    is_clean_label,
    unique_names,
)

VALID_LABEL = re.compile(r"^([a-z0-9]([a-z0-9-]*[a-z0-9])?)?$")


def address(text: str) -> IPv4Address:
    return IPv4Address(text)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("laptop", "laptop"),
        ("My-Laptop", "my-laptop"),
        ("Jo's MacBook Pro", "jo-s-macbook-pro"),
        ("--a__b--", "a-b"),
        ("host.example.com", "host-example-com"),
        ("", ""),
        ("!!!", ""),
        ("Ünïcödé", "n-c-d"),
        ("\u212a", ""),  # the Kelvin sign lowers to an ASCII "k" in str.lower()
        ("a" * 70, "a" * 63),
        ("a" * 62 + "-b", "a" * 62),  # cut at 63 leaves a trailing "-"
    ],
)
def test_clean_label(text: str, label: str) -> None:
    assert clean_label(text) == label


@given(st.text())
def test_clean_label_is_valid_and_idempotent(text: str) -> None:
    label = clean_label(text)
    assert VALID_LABEL.match(label)
    assert len(label) <= MAX_LABEL_LENGTH
    assert "--" not in label
    assert clean_label(label) == label


@given(st.one_of(st.text(max_size=70), st.text(alphabet="ab-9Z.", max_size=70)))
def test_is_clean_label_says_whether_clean_label_keeps_it(text: str) -> None:
    assert is_clean_label(text) == (clean_label(text) == text)
    assert is_clean_label(clean_label(text))


@pytest.mark.parametrize("domain", ["vpn", "home.arpa", "a-b.example", "x" * 63 + ".vpn"])
def test_check_domain_accepts(domain: str) -> None:
    assert check_domain(domain) is None


@pytest.mark.parametrize(
    "domain",
    ["", ".vpn", "vpn.", "a..b", "VPN", "my_net", "-vpn", "x" * 64, ".".join(["abc"] * 64)],
)
def test_check_domain_gives_a_reason(domain: str) -> None:
    reason = check_domain(domain)
    assert isinstance(reason, str) and reason


def test_ping_payload_is_what_candy_sends() -> None:
    assert encode_ping_payload("laptop", "6.0.1") == b"candy::linux::6.0.1::laptop"
    assert encode_ping_payload("pc", "1", os_name="windows") == b"candy::windows::1::pc"


def test_ping_payload_round_trip() -> None:
    payload = encode_ping_payload("laptop", "0.9.0")
    assert decode_ping_payload(payload) == PingIdentity("linux", "0.9.0", "laptop")


@pytest.mark.parametrize(
    ("payload", "identity"),
    [
        (b"candy::linux::6.1.2::My Laptop", PingIdentity("linux", "6.1.2", "my-laptop")),
        (b"candy::macos::1::a::b", PingIdentity("macos", "1", "a-b")),
        (b"candy::::::x", PingIdentity("", "", "x")),
    ],
)
def test_decode_ping_payload_cleans_the_hostname(payload: bytes, identity: PingIdentity) -> None:
    assert decode_ping_payload(payload) == identity


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"keepalive",
        b"candy::linux::6.0",
        b"candy::linux::6.0::",
        b"candy::linux::6.0::!!!",
        b"Candy::linux::6.0::pc",
        b"candy::linux::6.0::\xff",
        b"candy::linux::6.0::" + b"a" * 107,  # 126 bytes
    ],
)
def test_decode_ping_payload_refuses(payload: bytes) -> None:
    assert decode_ping_payload(payload) is None


def test_encode_ping_payload_refuses_what_cannot_travel() -> None:
    with pytest.raises(ValueError, match="125"):
        encode_ping_payload("a" * 63, "v" * 60)
    with pytest.raises(ValueError, match="::"):
        encode_ping_payload("pc", "1::2")


@given(st.binary(max_size=200))
def test_decode_ping_payload_never_raises(payload: bytes) -> None:
    identity = decode_ping_payload(payload)
    if identity is not None:
        assert identity.hostname == clean_label(identity.hostname) != ""


def test_unique_names_first_keeps_the_plain_name() -> None:
    names = unique_names(
        [
            (address("10.0.0.9"), "laptop"),
            (address("10.0.0.7"), "laptop"),
            (address("10.0.0.3"), "desk"),
        ]
    )
    assert names == {
        address("10.0.0.9"): "laptop",
        address("10.0.0.7"): "laptop-7",
        address("10.0.0.3"): "desk",
    }


def test_unique_names_full_address_when_the_octet_suffix_is_taken() -> None:
    names = unique_names(
        [
            (address("10.0.0.7"), "laptop"),
            (address("10.0.1.7"), "laptop"),
            (address("10.0.2.7"), "laptop"),
        ]
    )
    assert names[address("10.0.1.7")] == "laptop-7"
    assert names[address("10.0.2.7")] == "laptop-10-0-2-7"


def test_unique_names_when_a_member_took_a_suffixed_form() -> None:
    names = unique_names(
        [
            (address("10.0.0.1"), "laptop"),
            (address("10.0.0.2"), "laptop-7"),
            (address("10.0.0.3"), "laptop-10-0-0-7"),
            (address("10.0.0.7"), "laptop"),
        ]
    )
    assert names[address("10.0.0.7")] == "laptop-10-0-0-7-2"


def test_unique_names_cuts_the_base() -> None:
    names = unique_names([(address("10.0.0.1"), "x" * 63), (address("10.0.0.2"), "x" * 63)])
    assert names[address("10.0.0.2")] == "x" * 61 + "-2"
    names = unique_names(
        [(address("10.0.0.1"), "a" * 60 + "-bc"), (address("10.0.0.200"), "a" * 60 + "-bc")]
    )
    assert names[address("10.0.0.200")] == "a" * 59 + "-200"  # no "--" after the cut


def test_unique_names_leaves_out_empty_and_repeated_addresses() -> None:
    names = unique_names(
        [(address("10.0.0.1"), "!!"), (address("10.0.0.2"), "pc"), (address("10.0.0.2"), "x")]
    )
    assert names == {address("10.0.0.2"): "pc"}


ADDRESSES = st.integers(min_value=0, max_value=2**32 - 1).map(IPv4Address)
# Few distinct names so that duplicates (and suffix collisions) are common.
NAMES = st.sampled_from(["laptop", "laptop-7", "pc", "a" * 63, "laptop-10-0-0-7", "x"])
ENTRIES = st.lists(st.tuples(ADDRESSES, NAMES | st.text(max_size=70)), max_size=30)


@given(ENTRIES)
def test_unique_names_are_unique_and_valid(entries: list[tuple[IPv4Address, str]]) -> None:
    names = unique_names(entries)
    assert len(set(names.values())) == len(names)
    for name in names.values():
        assert name and clean_label(name) == name


@given(ENTRIES)
def test_unique_names_plain_name_unless_taken(entries: list[tuple[IPv4Address, str]]) -> None:
    names = unique_names(entries)
    taken: set[str] = set()
    for entry_address, raw_name in entries:
        name = clean_label(raw_name)
        if not name or names.get(entry_address) in taken:
            continue  # no name, or the address's earlier entry already counted
        unique = names[entry_address]
        assert (unique == name) == (name not in taken)
        if unique != name:
            octets = [str(octet) for octet in entry_address.packed]
            assert unique.endswith("-" + octets[-1]) or "-" + "-".join(octets) in unique
        taken.add(unique)


@given(ENTRIES, ENTRIES)
def test_unique_names_stable_regardless_of_later_entries(
    entries: list[tuple[IPv4Address, str]], later: list[tuple[IPv4Address, str]]
) -> None:
    before = unique_names(entries)
    after = unique_names(entries + later)
    assert {key: after[key] for key in before} == before
