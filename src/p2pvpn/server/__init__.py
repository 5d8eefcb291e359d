"""The ``p2pvpn server`` process: WebSocket relay (PROTOCOL 2.4) and STUN responder."""

from p2pvpn.server.relay import (
    ListenError,
    Relay,
    RelayServer,
    RelaySession,
    ServerRuntime,
    run_server,
    serve,
)
from p2pvpn.server.stun import StunResponder, start_stun_responder

__all__ = [
    "ListenError",
    "Relay",
    "RelayServer",
    "RelaySession",
    "ServerRuntime",
    "StunResponder",
    "run_server",
    "serve",
    "start_stun_responder",
]
