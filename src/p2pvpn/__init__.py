"""p2pvpn: a peer-to-peer VPN for Linux that speaks the Candy VPN protocol."""

__version__ = "0.1.0"

__all__ = ["__version__"]
