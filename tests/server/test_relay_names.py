"""Member names on the relay (issue 16): pings name members, HELLO sessions get NAMES."""

from ipaddress import IPv4Address

from p2pvpn.metrics import ServerCollector
from p2pvpn.server.relay import Relay, Send
from p2pvpn.wire.names import encode_ping_payload
from p2pvpn.wire.ws import (
    BROADCAST,
    General,
    Hello,
    NameAnnouncement,
    NameEntry,
    Names,
    decode_ws_message,
)
from tests.server import NOW, PASSWORD, FakeSession, auth_frame, feed, ip, login, perform
from tests.test_metrics import scrape, serving, value


def ping(relay: Relay, session: FakeSession, hostname: str, now: float = NOW) -> None:
    perform(relay.on_ping(session, encode_ping_payload(hostname, "6.1.8"), now))


def hello(relay: Relay, session: FakeSession, *, exit_node: bool = False, now: float = NOW) -> None:
    feed(relay, session, Hello(exit_node).encode(), now)


def names_sent(session: FakeSession) -> list[Names]:
    """The NAMES messages ``session`` got (and forgets them)."""
    messages = [decode_ws_message(frame) for frame in session.sent]
    session.sent.clear()
    assert all(isinstance(message, Names) for message in messages), messages
    return [message for message in messages if isinstance(message, Names)]


def entry(address: str, name: str, *, p2pvpn: bool = True, exit_node: bool = False) -> NameEntry:
    return NameEntry(ip(address), name, exit_node=exit_node, p2pvpn=p2pvpn)


def p2pvpn_member(relay: Relay, address: str, hostname: str, now: float = NOW) -> FakeSession:
    """A p2pvpn client as it logs in: AUTH, a ping with its name, HELLO."""
    session = login(relay, address, now=int(now))
    ping(relay, session, hostname, now)
    hello(relay, session, now=now)
    return session


def test_hello_gets_the_whole_table_and_others_get_the_change() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    assert names_sent(a) == [Names(True, (entry("10.0.0.1", "alpha"),))]
    b = p2pvpn_member(relay, "10.0.0.2", "beta", NOW + 1)
    assert names_sent(b) == [Names(True, (entry("10.0.0.1", "alpha"), entry("10.0.0.2", "beta")))]
    # Beta's ping named it before its HELLO (p2pvpn flag off), then its HELLO set the flag.
    assert names_sent(a) == [
        Names(False, (entry("10.0.0.2", "beta", p2pvpn=False),)),
        Names(False, (entry("10.0.0.2", "beta"),)),
    ]
    assert relay.stats()["named_sessions"] == 2


def test_a_name_change_goes_to_every_p2pvpn_session_itself_included() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    b = p2pvpn_member(relay, "10.0.0.2", "beta", NOW + 1)
    names_sent(a), names_sent(b)
    ping(relay, b, "Beta Laptop", NOW + 2)
    change = [Names(False, (entry("10.0.0.2", "beta-laptop"),))]
    assert names_sent(a) == change
    assert names_sent(b) == change
    # The same name again (every keepalive ping) sends nothing.
    ping(relay, b, "beta-laptop", NOW + 3)
    assert a.sent == b.sent == []


def test_duplicates_get_the_suffix_of_their_address_in_login_order() -> None:
    relay = Relay(PASSWORD)
    first = p2pvpn_member(relay, "10.0.0.9", "laptop")
    second = p2pvpn_member(relay, "10.0.0.7", "laptop", NOW + 1)
    assert names_sent(second)[-1] == Names(
        True, (entry("10.0.0.7", "laptop-7"), entry("10.0.0.9", "laptop"))
    )
    assert [row["name"] for row in relay.session_rows(NOW)] == ["laptop-7", "laptop"]
    names_sent(first)
    # The first leaves: the second gets the plain name.
    perform(relay.on_disconnect(first))
    assert names_sent(second) == [
        Names(False, (entry("10.0.0.7", "laptop"), NameEntry(ip("10.0.0.9"), "")))
    ]


def test_same_login_time_orders_by_address() -> None:
    relay = Relay(PASSWORD)
    b = p2pvpn_member(relay, "10.0.0.20", "pc")
    a = p2pvpn_member(relay, "10.0.0.3", "pc")
    assert names_sent(a)[-1].entries == (entry("10.0.0.3", "pc"), entry("10.0.0.20", "pc-20"))
    # Logged in in the same second: the lower address keeps the plain name.
    assert names_sent(b)[-2:] == [
        Names(False, (entry("10.0.0.3", "pc", p2pvpn=False), entry("10.0.0.20", "pc-20"))),
        Names(False, (entry("10.0.0.3", "pc"),)),
    ]


def test_leaving_sends_a_removal_to_the_others() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    b = p2pvpn_member(relay, "10.0.0.2", "beta")
    names_sent(a)
    perform(relay.on_disconnect(b))
    assert names_sent(a) == [Names(False, (NameEntry(ip("10.0.0.2"), ""),))]
    assert relay.stats()["named_sessions"] == 1
    # A second on_disconnect of the same session sends nothing more.
    perform(relay.on_disconnect(b))
    assert a.sent == []


def test_a_candy_client_is_named_by_its_ping_and_never_sent_names() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    names_sent(a)
    candy = login(relay, "10.0.0.5")
    perform(relay.on_ping(candy, b"candy::linux::6.1.8::vm", NOW))
    assert names_sent(a) == [Names(False, (entry("10.0.0.5", "vm", p2pvpn=False),))]
    ping(relay, candy, "vm2", NOW + 5)
    perform(relay.on_disconnect(candy))
    assert candy.sent == []
    assert [row["address"] for row in relay.session_rows(NOW)] == ["10.0.0.1"]


def test_ping_before_login_only_keeps_the_name() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    names_sent(a)
    early = FakeSession()
    relay.on_connect(early)
    ping(relay, early, "early")
    assert a.sent == [] and early.sent == []
    feed(relay, early, auth_frame("10.0.0.2"))
    assert names_sent(a) == [Names(False, (entry("10.0.0.2", "early", p2pvpn=False),))]
    row = relay.session_rows(NOW)[1]
    assert (row["name"], row["version"], row["p2pvpn"]) == ("early", "6.1.8", False)


def test_hello_before_login_is_dropped_and_counted() -> None:
    relay = Relay(PASSWORD)
    session = FakeSession()
    relay.on_connect(session)
    hello(relay, session)
    assert session.closes == [] and session.sent == []
    assert relay.stats()["drops"] == {"hello_before_login": 1}
    feed(relay, session, auth_frame("10.0.0.1"))
    assert not session.extensions
    # NAMES from a client is ignored, before login or after.
    feed(relay, session, Names(True, ()).encode())
    assert session.closes == [] and session.sent == []


def test_hello_carries_the_exit_node_flag() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    gateway = p2pvpn_member(relay, "10.0.0.2", "gw")
    names_sent(a), names_sent(gateway)
    hello(relay, gateway, exit_node=True, now=NOW + 1)
    assert names_sent(a) == [Names(False, (entry("10.0.0.2", "gw", exit_node=True),))]
    assert names_sent(gateway) == [
        Names(True, (entry("10.0.0.1", "alpha"), entry("10.0.0.2", "gw", exit_node=True)))
    ]
    assert relay.session_rows(NOW)[1]["exit_node"] is True


def test_name_changes_over_the_rate_are_ignored_and_counted() -> None:
    relay = Relay(PASSWORD)
    watcher = p2pvpn_member(relay, "10.0.0.1", "watcher")
    noisy = login(relay, "10.0.0.2")
    names_sent(watcher)
    for index in range(20):
        ping(relay, noisy, f"n{index}")  # all at the same instant
    assert len(names_sent(watcher)) == 5  # the burst
    assert relay.stats()["limits"] == {"name_change_rate": 15}
    assert relay.session_rows(NOW)[1]["name"] == "n4"
    # A second later one more change is allowed.
    ping(relay, noisy, "later", NOW + 1)
    assert names_sent(watcher) == [Names(False, (entry("10.0.0.2", "later", p2pvpn=False),))]


def test_repeated_hellos_are_capped_too() -> None:
    relay = Relay(PASSWORD)
    session = login(relay, "10.0.0.1")
    for _ in range(20):
        hello(relay, session)
    assert len(names_sent(session)) == 1 + 5  # the first HELLO's table, then the burst
    assert relay.stats()["limits"] == {"name_change_rate": 14}


def test_other_ping_payloads_change_nothing() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    names_sent(a)
    for payload in (b"", b"\x00\x01\x02\x03", b"candy::linux::1::", b"candy::x"):
        assert relay.on_ping(a, payload, NOW) == []
    assert relay.session_rows(NOW)[0]["name"] == "alpha"


def test_pings_of_a_closed_session_are_ignored() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    b = p2pvpn_member(relay, "10.0.0.2", "beta")
    names_sent(a)
    perform(relay.on_disconnect(b))
    names_sent(a)
    assert relay.on_ping(b, encode_ping_payload("ghost", "1"), NOW) == []


def test_a_kicked_address_takes_the_new_sessions_name() -> None:
    relay = Relay(PASSWORD)
    a = p2pvpn_member(relay, "10.0.0.1", "alpha")
    old = p2pvpn_member(relay, "10.0.0.2", "old-pc")
    names_sent(a)
    p2pvpn_member(relay, "10.0.0.2", "new-pc", NOW + 1)
    assert old.closes
    perform(relay.on_disconnect(old))
    changes = [message.entries for message in names_sent(a)]
    assert changes[-1] == (entry("10.0.0.2", "new-pc"),)
    assert relay.session_rows(NOW)[1]["name"] == "new-pc"


def test_name_announcements_are_relayed_unchanged_even_junk_ones() -> None:
    relay = Relay(PASSWORD)
    a = login(relay, "10.0.0.1")
    b = login(relay, "10.0.0.2")
    announcement = NameAnnouncement(ip("10.0.0.1"), BROADCAST, "alpha", reply_wanted=True)
    feed(relay, a, announcement.encode())
    assert b.sent == [announcement.encode()]
    junk = General(0x50, 0, ip("10.0.0.1"), ip("10.0.0.2"), b"Not A Label!").encode()
    feed(relay, a, junk)
    assert b.sent[-1] == junk
    assert a.closes == []
    spoofed = NameAnnouncement(ip("10.0.0.9"), BROADCAST, "alpha").encode()
    feed(relay, a, spoofed)
    assert a.closes  # the source check holds for announcements too


def test_names_split_into_messages_of_256() -> None:
    relay = Relay(PASSWORD)
    for index in range(300):
        member = login(relay, str(IPv4Address(0x0A010000 + index)))
        ping(relay, member, f"m{index}")
    late = p2pvpn_member(relay, "10.2.0.1", "late")
    tables = names_sent(late)
    assert [(len(message.entries), message.replace) for message in tables] == [
        (256, True),
        (45, False),
    ]


def test_sends_are_plain_send_actions() -> None:
    relay = Relay(PASSWORD)
    session = login(relay, "10.0.0.1")
    relay.on_ping(session, encode_ping_payload("alpha", "1"), NOW)
    actions = relay.handle_frame(session, Hello().encode(), NOW)
    assert [type(action) for action in actions] == [Send]


def test_named_sessions_metric() -> None:
    relay = Relay(PASSWORD)
    p2pvpn_member(relay, "10.0.0.1", "alpha")
    login(relay, "10.0.0.2")  # no name: not counted
    with serving(ServerCollector(relay.stats)) as server:
        samples, text = scrape(server.url)
    assert value(samples, "p2pvpn_server_named_sessions") == 1
    assert "# TYPE p2pvpn_server_named_sessions gauge" in text
