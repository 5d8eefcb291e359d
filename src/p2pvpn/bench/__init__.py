"""`p2pvpn bench`: what a VPN costs on this machine, and what a link between two members can do.

* `crypto` (`p2pvpn bench crypto`): AES-256-GCM seal/open throughput per core,
  compiled and pure, no root.
* `local` (`p2pvpn bench local`): raw veth against the tunnel in network
  namespaces on this machine (root).
* `peer` (`p2pvpn bench peer`, `p2pvpn bench serve`): throughput and latency
  through the running tunnel to another member that agreed to answer.
* `traffic`: the traffic generator and receiver all of them use (TCP, UDP
  with loss, UDP echo for RTT), so nothing needs iperf3.
* `report`, `progress`, `machine`, `plot`: the JSON report, the live progress
  line, the machine facts every report carries, the optional PNG.

This package imports nothing heavy at import time: the client imports
`p2pvpn.bench.traffic` for ``bench_server = true``.
"""
