"""WebSocket close codes a p2pvpn server sends when it refuses a client.

Candy's server just closes the connection; these codes (private range
4000-4999, RFC 6455 section 7.4.2) let a p2pvpn client tell a wrong password
from a network fault and stop instead of retrying forever. A Candy client
treats them as any other close.
"""

import enum


class CloseCode(enum.IntEnum):
    AUTHENTICATION_FAILED = 4001
    STALE_OR_REPLAYED = 4002
    ADDRESS_REFUSED = 4003
    KICKED = 4004
    PROTOCOL_VIOLATION = 4005
    NOT_AUTHENTICATED = 4006
    # The server is at a limit that will pass (address pool exhausted, too
    # many addresses for one source address, replay cache full): retry later.
    TRY_AGAIN_LATER = 4007


# Human-readable cause for each code, shown to the user by the client.
CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.AUTHENTICATION_FAILED: "authentication failed: wrong password",
    CloseCode.STALE_OR_REPLAYED: (
        "login refused as stale or replayed: check that this machine's clock is right"
    ),
    CloseCode.ADDRESS_REFUSED: "address refused by the server",
    CloseCode.KICKED: "another client logged in with the same address",
    CloseCode.PROTOCOL_VIOLATION: "the server closed the connection for a protocol violation",
    CloseCode.NOT_AUTHENTICATED: "the server got a message before login",
    CloseCode.TRY_AGAIN_LATER: "the server is at a limit for now (e.g. no free address): retrying",
}

# Codes after which retrying cannot help: the client stops with an error.
# TRY_AGAIN_LATER is never among them: the client retries with its back-off.
FATAL_CLOSE_CODES = frozenset({CloseCode.AUTHENTICATION_FAILED})

# Codes that stop the client only when they repeat (REPEATED_CLOSE_LIMIT times
# in a row without a stable login): one kick or refusal may come from another
# client that took our address for a moment, and must not knock us off for good.
REPEATED_CLOSE_CODES = frozenset({CloseCode.ADDRESS_REFUSED, CloseCode.KICKED})
REPEATED_CLOSE_LIMIT = 3
