"""Integration tests: real processes in network namespaces (root; see tests/netns.py)."""
