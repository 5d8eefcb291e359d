"""A minimal TCP bulk transfer, for `p2pvpn demo` when iperf3 is not installed.

``python -m p2pvpn.demo.bulk server PORT`` accepts one connection, reads until
the sender closes, answers with a JSON line ``{"bytes": N, "seconds": S}``
(measured from the first byte received) and prints that line too.
``python -m p2pvpn.demo.bulk client HOST PORT SECONDS`` sends for SECONDS,
closes its sending side, and prints the receiver's answer.
"""

import json
import socket
import sys
import time

__all__ = ["main", "receive", "send"]

CHUNK = 128 * 1024
ACCEPT_TIMEOUT = 120.0
IO_TIMEOUT = 30.0


def receive(port: int) -> dict[str, float]:
    with socket.create_server(("0.0.0.0", port), reuse_port=False) as listener:
        print("listening", flush=True)
        listener.settimeout(ACCEPT_TIMEOUT)
        connection, _ = listener.accept()
    with connection:
        connection.settimeout(IO_TIMEOUT)
        total = 0
        first: float | None = None
        buffer = bytearray(CHUNK)
        while True:
            received = connection.recv_into(buffer)
            if not received:
                break
            if first is None:
                first = time.monotonic()
            total += received
        seconds = time.monotonic() - first if first is not None else 0.0
        result = {"bytes": total, "seconds": seconds}
        connection.sendall(json.dumps(result).encode() + b"\n")
    return result


def send(host: str, port: int, seconds: float) -> str:
    payload = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as connection:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode().strip()


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "server":
            print(json.dumps(receive(int(argv[1]))), flush=True)
            return 0
        if len(argv) == 4 and argv[0] == "client":
            print(send(argv[1], int(argv[2]), float(argv[3])), flush=True)
            return 0
    except (OSError, ValueError) as exc:
        print(f"bulk: {exc}", file=sys.stderr)
        return 1
    print("usage: bulk server PORT | bulk client HOST PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
