"""Fuzzing the name extensions: HELLO, NAMES, the name announcement, ping payloads.

Valid frames of each extension, mutated (bits flipped, cut, stretched), must
decode or raise DecodeError and nothing else, and what decodes must encode
to a frame that decodes to the same message.
"""

from collections.abc import Callable
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pvpn.server.relay import Relay
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
from tests.server import NOW, PASSWORD, FakeSession, auth_frame, feed, perform

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


# -- the relay: any sequence of logins, pings, HELLOs and departures ---------------------

_MEMBERS = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.7")
_EVENTS = st.tuples(
    st.sampled_from(["login", "ping", "hello", "leave", "tick"]),
    st.integers(0, len(_MEMBERS) - 1),
    st.one_of(
        st.sampled_from([b"candy::linux::1::pc", b"candy::linux::1::pc-7", b"junk"]),
        st.builds(encode_ping_payload, _labels.filter(bool), st.just("1")),
        st.binary(max_size=130),
    ),
    st.booleans(),
)


class _Member:
    """One connection and the table it has learnt from the NAMES it was sent."""

    def __init__(self) -> None:
        self.session = FakeSession()
        self.table: dict[IPv4Address, str] = {}

    def learn(self) -> None:
        for frame in self.session.sent:
            message = decode_ws_message(frame)
            assert isinstance(message, Names), message
            if message.replace:
                self.table = {}
            for entry in message.entries:
                if entry.name:
                    self.table[entry.address] = entry.name
                else:
                    self.table.pop(entry.address, None)
        self.session.sent.clear()


def _apply(
    relay: Relay, members: dict[str, _Member], event: tuple[str, int, bytes, bool], now: float
) -> None:
    kind, index, payload, flag = event
    address = _MEMBERS[index]
    member = members.get(address)
    if kind == "login":
        if member is not None:
            perform(relay.on_disconnect(member.session))
        member = members[address] = _Member()
        relay.on_connect(member.session)
        # Every AUTH with a timestamp of its own, or the second would be a replay.
        timestamp = NOW - relay.stats()["logins"]
        feed(relay, member.session, auth_frame(address, timestamp), now)
    elif member is None:
        return
    elif kind == "ping":
        perform(relay.on_ping(member.session, payload, now))
    elif kind == "hello":
        feed(relay, member.session, Hello(flag).encode(), now)
    elif kind == "leave":
        perform(relay.on_disconnect(member.session))
        del members[address]


@pytest.mark.parametrize("max_examples", RUNS)
def test_every_p2pvpn_session_learns_the_relays_table(max_examples: int) -> None:
    def body(data: st.DataObject) -> None:
        relay = Relay(PASSWORD)
        members: dict[str, _Member] = {}
        now = float(NOW)
        for event in data.draw(st.lists(_EVENTS, max_size=40), label="events"):
            now += 0.5 if event[0] == "tick" else 0.0
            _apply(relay, members, event, now)
            for member in members.values():
                member.learn()
        table = {
            IPv4Address(str(row["address"])): row["name"]
            for row in relay.session_rows(now)
            if row["name"] is not None
        }
        assert len(set(table.values())) == len(table)
        assert relay.stats()["internal_errors"] == 0
        for member in members.values():
            assert member.session.closes == []
            if member.session.extensions:
                assert member.table == table

    _run(max_examples, body)
