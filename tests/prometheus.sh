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

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "prometheus.sh: run as root (apt-get needs it) or install sudo" >&2; exit 1; }
    SUDO=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "prometheus.sh: installing Debian's prometheus package (prometheus and promtool)"
"${SUDO[@]}" apt-get update -q
# --no-install-recommends: only the server and promtool, not the node exporter and friends.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus

# The package starts a system service where an init system runs; the tests do not use it, and
# leave it alone (they listen on free ports of their own).
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null || { echo "prometheus.sh: $tool is still missing after the install" >&2; exit 1; }
done
prometheus --version 2>&1 | head -n 1
echo "prometheus.sh: done"
