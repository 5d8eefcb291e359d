"""Fuzzing the name extensions: HELLO, NAMES, the name announcement, ping payloads.

Valid frames of each extension, mutated (bits flipped, cut, stretched), must
decode or raise DecodeError and nothing else, and what decodes must encode
to a frame that decodes to the same message.
"""

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.wire.errors import DecodeError
from p2pvpn.wire.names import clean_label, decode_ping_payload, encode_ping_payload
from p2pvpn.wire.ws import (
    Hello,
    NameAnnouncement,
    NameEntry,
    Names,
    decode_ws_message,
    encode_names,
)
from tests.fuzz import RUNS, addresses, fuzz_settings, mutated

_labels = st.one_of(
    st.sampled_from(["", "laptop", "laptop-7", "a" * 63, "x"]),
    st.text(max_size=70).map(clean_label),
)
_entries = st.builds(
    NameEntry, addresses("10.0.0.1", "10.0.0.7"), _labels, st.booleans(), st.booleans()
)


def _extension_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(Hello, st.booleans()).map(Hello.encode),
        st.tuples(st.lists(_entries, max_size=300), st.booleans()).flatmap(
            lambda args: st.sampled_from(encode_names(args[0], args[1]) or [b"\x51"])
        ),
        st.builds(
            NameAnnouncement,
            addresses("10.0.0.1"),
            addresses("255.255.255.255", "10.0.0.2"),
            _labels,
            st.booleans(),
            st.booleans(),
        ).map(NameAnnouncement.encode),
    )


def _run(max_examples: int, body: Callable[[st.DataObject], None]) -> None:
    fuzz_settings(max_examples)(given(st.data())(body))()


@pytest.mark.parametrize("max_examples", RUNS)
def test_mutated_extension_frames_decode_or_raise_decode_error(max_examples: int) -> None:
    def body(data: st.DataObject) -> None:
        frame = data.draw(_extension_frames().flatmap(mutated), label="frame")
        try:
            message = decode_ws_message(frame)
        except DecodeError:
            return
        assert decode_ws_message(message.encode()) == message
        if isinstance(message, Names | NameAnnouncement):
            names = (
                [entry.name for entry in message.entries]
                if isinstance(message, Names)
                else [message.name]
            )
            assert all(clean_label(name) == name for name in names)

    _run(max_examples, body)


@pytest.mark.parametrize("max_examples", RUNS)
def test_mutated_ping_payloads_give_a_clean_name_or_none(max_examples: int) -> None:
    payloads = st.builds(
        encode_ping_payload, _labels.filter(bool), st.sampled_from(["6.1.8", "0.9.0", ""])
    )

    def body(data: st.DataObject) -> None:
        payload = data.draw(payloads.flatmap(mutated), label="payload")
        identity = decode_ping_payload(payload)
        if identity is not None:
            assert identity.hostname and clean_label(identity.hostname) == identity.hostname
            assert len(payload) <= 125

    _run(max_examples, body)


def test_ping_payload_of_a_real_candy_client() -> None:
    identity = decode_ping_payload(b"candy::linux::6.1.8::vm")
    assert identity is not None and identity.hostname == "vm"
