"""Integration tests: real processes in network namespaces (root; see `p2pvpn.netns`)."""
