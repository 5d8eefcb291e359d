"""The one exception every wire decoder raises on bad input."""


class DecodeError(ValueError):
    """Raised by every decoder in p2pvpn.wire for input that is not a valid message.

    Covers short input, a wrong type byte for a typed decoder, and malformed
    fields such as a cidr string that does not parse.
    """
