#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian's `prometheus` package, 2.42 on bookworm) for the
# observability tests (tests/tests/observability.rs), when either is missing. Does nothing else:
# it starts no server (each test starts its own, on a free port, with a config of its own).
#
#   bash tests/prometheus.sh
#
# Needs root, or sudo, for apt-get.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    echo "prometheus.sh: already installed: $(command -v prometheus), $(command -v promtool)"
    prometheus --version 2>&1 | head -n 1
    exit 0
fi

# shellcheck source=tests/apt.sh
. "$(dirname "$0")/apt.sh"
echo "prometheus.sh: installing Debian's prometheus package (prometheus and promtool)"
# Only the server and promtool, not the node exporter and friends.
apt_install prometheus

# The package starts a system service where an init system runs; the tests do not use it, and
# leave it alone (they listen on free ports of their own).
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null || { echo "prometheus.sh: $tool is still missing after the install" >&2; exit 1; }
done
prometheus --version 2>&1 | head -n 1
echo "prometheus.sh: done"
