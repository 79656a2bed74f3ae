#!/usr/bin/env bash
# A tansu 0.6.0 broker for the Kafka tests: the Kafka-protocol broker that runs on this machine
# (no Docker, no JVM). See DESIGN.md, "What this machine has".
#
#   bash tests/tansu.sh install                  build tansu once into $HOME/.cache/streamledger/tansu
#   bash tests/tansu.sh start PORT DATADIR [PID] [--authentication] [--advertised-port PORT2]
#                                                start a broker on 127.0.0.1:PORT storing in DATADIR;
#                                                with PID, the broker is stopped when that process exits;
#                                                --authentication: clients must authenticate with SASL;
#                                                --advertised-port: advertise 127.0.0.1:PORT2 in metadata
#                                                (a TLS front that forwards to PORT listens there)
#   bash tests/tansu.sh user PORT NAME PASSWORD [scram256|scram512]
#                                                create a SCRAM user through the broker on PORT (one
#                                                started without --authentication: tansu's user command
#                                                cannot authenticate); users live in DATADIR's sqlite file
#   bash tests/tansu.sh stop DATADIR             stop the broker started in DATADIR
#   bash tests/tansu.sh path                     print the binary's path (fails when not installed)
#
# What tansu 0.6.0 offers for security, read from its source and tried: SASL with --authentication
# (SCRAM-SHA-256 and SCRAM-SHA-512, checked against the users created above; not PLAIN: its SASL
# library is built without it, and a PLAIN handshake is refused), and no TLS: `--cert` and `--key`
# are in one clap group, so giving both is refused ("the argument '--cert <CERT>' cannot be used
# with '--key <KEY>'"), and the broker never uses the TLS acceptor it would build. The TLS tests
# put a TLS front before it (services/kafka/tests/common/secure.rs).
#
# Storage is sqlite (the libsql engine): the memory engine loses acknowledged records and gives
# consumer groups no assignment. tansu 0.6.0 does not create topics on first use; create them
# with the admin API.
set -euo pipefail

VERSION=0.6.0
CACHE="${STREAMLEDGER_CACHE:-$HOME/.cache/streamledger}"
ROOT="$CACHE/tansu"
BIN="$ROOT/bin/tansu"

die() { echo "tansu.sh: $*" >&2; exit 1; }

installed() { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; }

cmd_install() {
    if installed; then
        echo "tansu $VERSION is installed: $BIN"
        return
    fi
    command -v cargo >/dev/null || die "cargo is needed to build tansu"
    mkdir -p "$CACHE"
    echo "building tansu $VERSION from crates.io into $ROOT (about 15 minutes on 2 cores);"
    echo "progress below, full log in $CACHE/tansu-build.log"
    # A separate target dir keeps tansu's build out of the workspace's target/ (and its cache
    # survives a `cargo clean` of the project). libsql: the sqlite engine; dynostore: the engine
    # the broker is usually built with (memory:// and s3://).
    CARGO_TARGET_DIR="$CACHE/tansu-build" cargo install tansu --version "$VERSION" --locked \
        --features libsql,dynostore --root "$ROOT" 2>&1 \
        | tee "$CACHE/tansu-build.log" \
        | grep --line-buffered -E '^ *(Compiling|Installing|Installed|Finished|error|warning: build failed)' \
        || true
    installed || die "the build did not produce $BIN; see $CACHE/tansu-build.log"
    echo "tansu $VERSION installed: $BIN"
}

# 0 when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_start() {
    local positional=() authentication=() advertised=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --authentication) authentication=(--authentication); shift ;;
            --advertised-port) advertised="${2:-}"; [ -n "$advertised" ] || die "--advertised-port needs a port"; shift 2 ;;
            *) positional+=("$1"); shift ;;
        esac
    done
    local port="${positional[0]:-}" dir="${positional[1]:-}" owner="${positional[2]:-}"
    [ -n "$port" ] && [ -n "$dir" ] || die "usage: tansu.sh start PORT DATADIR [OWNER_PID] [--authentication] [--advertised-port PORT2]"
    advertised="${advertised:-$port}"
    installed || die "tansu $VERSION is not installed: run \`bash tests/tansu.sh install\` first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/tansu.pid" ] && kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; then
        die "a broker is already running for $dir (pid $(cat "$dir/tansu.pid"))"
    fi
    if port_open "$port"; then
        die "port $port is already in use"
    fi
    # tansu resolves a sqlite:// URL against its working directory (it drops the leading '/' of
    # an absolute path) and reads a .env file from there, so run it inside DATADIR with a relative
    # file name. The explicit flags also override any LISTENER_URL/STORAGE_ENGINE/CLUSTER_ID in
    # the environment, which tansu would otherwise pick up.
    (
        cd "$dir"
        exec "$BIN" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$advertised" \
            --storage-engine "sqlite://tansu.db" \
            ${authentication[@]+"${authentication[@]}"} \
            </dev/null >>"$dir/tansu.log" 2>&1
    ) &
    local pid=$!
    echo "$pid" >"$dir/tansu.pid"
    echo "$port" >"$dir/tansu.port"
    local waited=0
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$dir/tansu.pid"
            tail -20 "$dir/tansu.log" >&2 || true
            die "tansu exited during start; log: $dir/tansu.log"
        fi
        if [ "$waited" -ge 300 ]; then
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/tansu.pid"
            die "tansu did not accept connections on port $port within 30 s; log: $dir/tansu.log"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    if [ -n "$owner" ]; then
        # A watchdog, so that a test process that dies without cleaning up leaves no broker behind.
        # It exits with the broker too (a stop, or a kill -9 by a test).
        (
            while kill -0 "$owner" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
            kill -9 "$pid" 2>/dev/null || true
        ) </dev/null >/dev/null 2>&1 &
    fi
    echo "tansu $VERSION on 127.0.0.1:$port (pid $pid, data $dir)"
}

cmd_user() {
    local port="${1:-}" name="${2:-}" password="${3:-}" mechanism="${4:-scram512}"
    [ -n "$port" ] && [ -n "$name" ] && [ -n "$password" ] || die "usage: tansu.sh user PORT NAME PASSWORD [scram256|scram512]"
    installed || die "tansu $VERSION is not installed: run \`bash tests/tansu.sh install\` first"
    "$BIN" user create --broker "tcp://127.0.0.1:$port" --mechanism "$mechanism" "$name" "$password" \
        || die "could not create user $name ($mechanism) through the broker on 127.0.0.1:$port"
}

cmd_stop() {
    local dir="${1:-}"
    [ -n "$dir" ] || die "usage: tansu.sh stop DATADIR"
    local pidfile="$dir/tansu.pid"
    [ -f "$pidfile" ] || { echo "no broker running for $dir"; return; }
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "tansu stopped (pid $pid)"
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    user) shift; cmd_user "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    path) installed || die "tansu $VERSION is not installed: run \`bash tests/tansu.sh install\`"; echo "$BIN" ;;
    *) die "usage: tansu.sh install | start PORT DATADIR [OWNER_PID] [--authentication] [--advertised-port PORT2] | user PORT NAME PASSWORD [MECHANISM] | stop DATADIR | path" ;;
esac
