"""p2pvpn's test suite (a package so that helpers import as ``tests.netns``)."""
