#!/usr/bin/env bash
# Installs everything p2pvpn needs on a fresh Debian/Ubuntu machine, into .venv,
# then optionally runs the demo or the tests.
#
#   sudo bash scripts/bootstrap.sh install   # system packages + .venv with p2pvpn[test]
#   sudo bash scripts/bootstrap.sh demo      # install, then: p2pvpn demo
#   sudo bash scripts/bootstrap.sh test      # install, then the test suite
#
# A venv because Debian's own Python refuses `pip install` outside one (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-install}"
case "$action" in install|demo|test) ;; *)
    echo "usage: sudo bash scripts/bootstrap.sh [install|demo|test]" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "bootstrap needs root: it installs system packages, and p2pvpn creates TUN" \
         "devices and network namespaces (try: sudo bash $0 $action)" >&2
    exit 1
fi

echo "== system packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc libssl-dev \
    iproute2 nftables iperf3 iputils-ping procps kmod nats-server >/dev/null

echo "== python environment (.venv) with p2pvpn and its test tools"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The build requirements in the venv too (setuptools>=77 reads the SPDX
# license), so that `setup.py build_ext --inplace` works in the checkout.
.venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
    | xargs .venv/bin/python -m pip install -q --upgrade
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/p2pvpn --version

case "$action" in
    demo) exec .venv/bin/p2pvpn demo ;;
    test) exec .venv/bin/python -m pytest -q ;;
esac
