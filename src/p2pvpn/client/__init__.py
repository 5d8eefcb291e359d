"""The VPN client: peers, signaling, TUN device, control socket."""
