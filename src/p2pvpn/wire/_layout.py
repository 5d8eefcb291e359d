"""Fixed struct layouts shared by the WebSocket and UDP codecs."""

import struct
from typing import Any

from p2pvpn.wire.errors import DecodeError

TYPE_BYTE = struct.Struct("!B")


def pack(layout: struct.Struct, *fields: object) -> bytes:
    """Pack, turning struct's range errors into ValueError naming the layout."""
    try:
        return layout.pack(*fields)
    except struct.error as exc:
        raise ValueError(f"field out of range for layout {layout.format!r}: {exc}") from exc


def unpack(layout: struct.Struct, data: bytes, name: str) -> tuple[Any, ...]:
    """Unpack the start of `data` (trailing bytes are ignored); DecodeError when short."""
    if len(data) < layout.size:
        raise DecodeError(f"{name} needs {layout.size} bytes, got {len(data)}")
    return layout.unpack_from(data)
