#!/usr/bin/env bash
# Installs what the tests need and runs them all. This is the README's test command and what CI runs.
# Everything it needs comes from the registries this project may use; nothing has to be installed
# by hand first.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== install what the tests need"
# Debian's prometheus package (prometheus, promtool) for the monitoring tests; nothing when present.
bash tests/prometheus.sh

echo "== build (all targets, locked dependencies)"
cargo build --workspace --all-targets --locked

echo "== tests"
# --all-targets also runs each criterion benchmark once in test mode, so benchmarks cannot rot.
cargo test --workspace --all-targets --locked

echo "== doc tests"
cargo test --workspace --doc --locked
