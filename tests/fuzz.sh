#!/usr/bin/env bash
# Fuzzes every topic decoder (single-object and Confluent framing) and the policy parser with
# cargo fuzz (libFuzzer), each for a bounded time, and prints one line per target with its
# executions and crashes, then the totals. Exits non-zero on any crash; the crashing input is left
# under fuzz/artifacts/<target>/ (check it into a regression test next to the code it broke).
#
#   bash tests/fuzz.sh [SECONDS]     seconds per target: the argument, else $FUZZ_SECONDS, else 10
#
# FUZZ_TARGETS limits the run to some targets (space-separated names, as `cargo fuzz list` gives);
# FUZZ_SANITIZER picks cargo fuzz's sanitizer (default address). cargo fuzz passes nightly flags;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. cargo-fuzz itself is installed from
# crates.io once and cached in ~/.cache/streamledger/cargo-fuzz. The fuzz crate is its own
# workspace with its own target dir, so the main build is left alone: FUZZ_TARGET_DIR, by default
# ~/.cache/streamledger/fuzz-target, kept between runs so that CI's fresh clone rebuilds only the
# project's crates (a cold build of the sanitized targets takes about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-${FUZZ_SECONDS:-10}}
sanitizer=${FUZZ_SANITIZER:-address}
target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/streamledger/fuzz-target}
root="$HOME/.cache/streamledger/cargo-fuzz"
export PATH="$root/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== install cargo-fuzz (cached in $root)"
    cargo install cargo-fuzz --locked --root "$root"
fi

echo "== fuzz: build the targets (sanitizer $sanitizer)"
start=$(date +%s)
# Cargo tells a path crate's changes by file times, and the shared target dir names its artifacts
# the same whichever checkout built them: after a build from another checkout, older files here
# would pass for built. So the project's two crates are rebuilt whenever the checkout changes.
# The seed check's target dir below has the same problem, so it follows the same stamp.
stamp="$target_dir/built-from"
seeds_target_dir="${target_dir}-seeds"
if [ "$(cat "$stamp" 2>/dev/null)" != "$PWD" ] && [ -d "$target_dir" ]; then
    host=$(rustc -vV | sed -n 's/^host: //p')
    (cd fuzz && cargo +stable clean -q --release --target "$host" --target-dir "$target_dir" \
        -p streamledger-fuzz -p streamledger-core)
    if [ -d "$seeds_target_dir" ]; then
        (cd fuzz && cargo +stable clean -q --target-dir "$seeds_target_dir" -p streamledger-fuzz -p streamledger-core)
    fi
fi
set +e
cargo +stable fuzz build -s "$sanitizer" --target-dir "$target_dir" 2>&1 | grep -vE '^ *(Compiling|Downloaded|Downloading) '
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || { echo "fuzz: the targets did not build"; exit 1; }
echo "$PWD" >"$stamp"
echo "fuzz: built in $(( $(date +%s) - start )) s"

# The seed corpus must still decode with today's schemas: a schema change that forgets the seeds
# (`FUZZ_WRITE_SEEDS=1 cargo test --lib` in fuzz/ rewrites them) fails here, not months later.
# A plain test build in a target dir of its own: the sanitized one above is for cargo fuzz only.
echo "== fuzz: check the seed corpus"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
if (cd fuzz && RUST_BACKTRACE=0 cargo +stable test -q --lib --target-dir "$seeds_target_dir" >"$logs/seeds.log" 2>&1); then
    grep 'test result:' "$logs/seeds.log"
else
    grep -vE '^ *(Compiling|Downloaded|Downloading) ' "$logs/seeds.log"
    echo "fuzz: the seed corpus check failed (or did not build)"
    exit 1
fi

echo "== fuzz: ${secs} s per target"
total_execs=0
total_crashes=0
for target in ${FUZZ_TARGETS:-$(cargo +stable fuzz list)}; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    rc=0
    cargo +stable fuzz run -s "$sanitizer" --target-dir "$target_dir" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$target/" >"$logs/$target.log" 2>&1 || rc=$?
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$logs/$target.log" | grep -oE '[0-9]+$' | tail -1)
    execs=${execs:-0}
    crashes=0
    if [ "$rc" -ne 0 ]; then
        crashes=1
        echo "---- $target failed (exit $rc):"
        grep -m5 -E 'panicked at|==ERROR|^SUMMARY|deadly signal|Test unit written' "$logs/$target.log" || true
        echo "---- the end of its log:"
        tail -30 "$logs/$target.log"
    fi
    printf 'fuzz: %-28s %10s executions  %s crashes\n' "$target" "$execs" "$crashes"
    total_execs=$((total_execs + execs))
    total_crashes=$((total_crashes + crashes))
done
echo "fuzz: total $total_execs executions, $total_crashes crashes (${secs} s per target)"
[ "$total_crashes" -eq 0 ]
