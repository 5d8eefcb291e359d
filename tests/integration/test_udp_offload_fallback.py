"""A path MTU below the tunnel's datagrams makes the kernel refuse UDP GSO.

The compiled data plane must notice, say so in its log, turn segmentation off
and send the same datagrams one by one (as IP fragments), losing none. The
loopback MTU is lowered in a namespace of the test's own, so this needs root.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from p2pvpn.netns import run_namespace
from tests.dataplane.test_fast_udp_offload import assert_every_packet_arrived_alone
from tests.integration.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.fastpath]


def test_a_path_mtu_below_the_datagrams_turns_segmentation_off_and_loses_nothing() -> None:
    """Segments larger than the path MTU make the kernel refuse the GSO send
    (EINVAL); without GSO the same datagrams go out as IP fragments."""
    require_netns()
    code = textwrap.dedent(
        """
        import json, logging, subprocess
        logging.basicConfig(level=logging.INFO)
        subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1280"], check=True)
        from tests.dataplane.test_fast_udp_offload import send_through_a_fast_plane
        print(json.dumps(send_through_a_fast_plane(udp_offload=True)))
        """
    )
    with run_namespace("gso") as namespace:
        completed = namespace.python(code, timeout=60)
    result = json.loads(completed.stdout.splitlines()[-1])
    assert_every_packet_arrived_alone(result)
    assert result["segmentation"] is False
    assert "UDP segmentation offload turned off" in completed.stderr
