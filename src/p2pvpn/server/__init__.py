"""The ``p2pvpn server`` process: WebSocket relay (PROTOCOL 2.4) and STUN responder."""

from p2pvpn.server.relay import Relay, RelaySession
from p2pvpn.server.runtime import ListenError, ServerRuntime, run_server, serve
from p2pvpn.server.stun import StunResponder, start_stun_responder
from p2pvpn.server.ws import RelayServer

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
