#!/usr/bin/env bash
# Installs what the tests need and runs them all. This is the README's test command and what CI runs.
# Everything it needs comes from the registries this project may use; nothing has to be installed
# by hand first.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== install what the tests need"
# Debian's prometheus package (prometheus, promtool) for the monitoring tests; nothing when present.
bash tests/prometheus.sh
# The tansu Kafka-protocol broker for the Kafka adapter's tests: built from crates.io once (about
# 13 minutes on 2 cores) and cached in ~/.cache/streamledger; nothing when cached.
bash tests/tansu.sh install
# pouchdb-server (a CouchDB-API server) for the CouchDB store's tests, from npm, cached in .cache/.
bash tests/couchdb.sh install
# confluent-kafka, fastavro and cryptography (PyPI) for the outside-producer test, in .cache/.
bash tests/python.sh install

echo "== build (all targets, locked dependencies)"
# Incremental caches roughly double the target dir and a clean clone never reuses them.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
echo "free disk for target/: $(df -h --output=avail . | tail -1 | tr -d ' ') (a clean CI build measured 3.1 GB in target/, plus 1.7 GB of cached fuzz targets)"
cargo build --workspace --all-targets --locked

echo "== lint"
# clippy comes with rustup's default profile; add it where a minimal profile left it out.
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
# clippy on every target. In CI (CI=true, on this machine's fixed toolchain) a warning fails the
# run, so that warnings do not pile up again; elsewhere they are printed only, as a newer
# toolchain brings new lints that say nothing about the change being tested.
if [ "${CI:-}" = true ]; then
    cargo clippy --workspace --all-targets --locked -- -D warnings
else
    cargo clippy --workspace --all-targets --locked
fi

echo "== tests"
# --all-targets also runs each criterion benchmark once in test mode, so benchmarks cannot rot.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
bash tests/fuzz.sh  # libFuzzer on every decoder and the policy parser, 10 s each (README: Reliability, Fuzzing)

# One closing line with the totals over every test binary.
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{n += $1} END {print n + 0}'; }
echo "tests: $(sum passed) passed, $(sum failed) failed, $(sum ignored) skipped"
