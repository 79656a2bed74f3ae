#!/usr/bin/env bash
# pouchdb-server, a CouchDB-API server from npm, for the CouchDB state store's tests and benchmark
# (services/couch). There is no Apache CouchDB package here; production uses CouchDB 3 (see
# docker-compose.yaml) and services/couch/src/lib.rs lists what differs.
#
#   tests/couchdb.sh install           installs pouchdb-server into .cache/pouchdb (once; cached)
#                                      with the versions locked in services/couch/pouchdb/
#   tests/couchdb.sh start PORT DIR    starts it on 127.0.0.1:PORT with its databases on disk in DIR
#                                      (DIR "memory": in memory), waits until it answers, prints
#                                      its pid. It stops by itself when the process that ran this
#                                      command exits, so a test that dies leaves nothing behind.
#   tests/couchdb.sh stop PORT         stops the server started on PORT and waits until it is gone
#                                      (nothing to do if it is not running)
#
# Environment: STREAMLEDGER_POUCHDB_DIR moves the install (default: .cache/pouchdb in the repo).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${STREAMLEDGER_POUCHDB_DIR:-$ROOT/.cache/pouchdb}
LOCKED=$ROOT/services/couch/pouchdb
BIN=$CACHE/node_modules/pouchdb-server/bin/pouchdb-server
RUN=$CACHE/run

die() {
    echo "couchdb.sh: $*" >&2
    exit 1
}

# shellcheck source=tests/install-once.sh
. "$ROOT/tests/install-once.sh"
# shellcheck source=tests/apt.sh
. "$ROOT/tests/apt.sh"

pouchdb_ready() {
    [[ -f $BIN ]]
}

npm_install() {
    mkdir -p "$CACHE"
    cp "$LOCKED/package.json" "$LOCKED/package-lock.json" "$CACHE/"
    # --ignore-scripts: leveldown ships prebuilt binaries and loads them at run time; the only
    # other install script (sqlite3's, a backend not used here) would try to download one.
    (cd "$CACHE" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2) \
        || die "npm ci of pouchdb-server failed (see above): the CouchDB tests need it"
    node -e "require('$CACHE/node_modules/leveldown')" \
        || die "leveldown (pouchdb-server's on-disk store) does not load on this machine"
}

install() {
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm || die "pouchdb-server needs Node.js and npm, which could not be installed (apt-get install nodejs npm)"
    fi
    # Takes a minute or two the first time.
    install_once couchdb.sh "$CACHE" "$LOCKED/package-lock.json" pouchdb_ready npm_install
    echo "$BIN"
}

answers() {
    node -e "require('http').get('http://127.0.0.1:$1/', r => process.exit(r.statusCode === 200 ? 0 : 1)).on('error', () => process.exit(1))"
}

start() {
    local port=$1 dir=$2
    [[ $port =~ ^[0-9]+$ ]] || die "start: PORT must be a number, got '$port'"
    install >/dev/null
    mkdir -p "$RUN"
    # Logs and in-memory work folders of servers gone for an hour are of no more use.
    find "$RUN" -mindepth 1 -maxdepth 1 \( -name '*.log' -o -name '*.memory' \) -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    local pidfile=$RUN/$port.pid log=$RUN/$port.log
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "start: a pouchdb-server started by this script already runs on port $port (pid $(cat "$pidfile"))"
    fi
    local args=(-p "$port" -o 127.0.0.1 -n --no-color)
    local work
    if [[ $dir == memory ]]; then
        work=$RUN/$port.memory
        args+=(-m)
    else
        mkdir -p "$dir"
        work=$(cd "$dir" && pwd)
        # Trailing slash: pouchdb-server joins the database name to the directory as a string.
        args+=(-d "$work/")
    fi
    mkdir -p "$work"
    # pouchdb-server writes config.json and log.txt; keep them with the data, not in the cwd.
    args+=(-c "$work/config.json")
    local owner=$PPID
    (cd "$work" && exec node "$BIN" "${args[@]}") >"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$pidfile"
    # Watchdog: stop the server when the process that started it is gone (a test that panics or
    # is killed), and exit when the server stops.
    (
        while kill -0 "$owner" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
        kill "$pid" 2>/dev/null || true
        [[ $(cat "$pidfile" 2>/dev/null) == "$pid" ]] && rm -f "$pidfile"
    ) >/dev/null 2>&1 </dev/null &
    disown -a
    for _ in $(seq 1 300); do
        if answers "$port"; then
            echo "$pid"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            die "pouchdb-server exited at start on port $port; its log ($log):
$(tail -n 20 "$log")"
        fi
        sleep 0.2
    done
    kill "$pid" 2>/dev/null || true
    die "pouchdb-server did not answer on port $port within 60 s; its log ($log):
$(tail -n 20 "$log")"
}

stop() {
    local port=$1
    local pidfile=$RUN/$port.pid
    if [[ ! -f $pidfile ]]; then
        # Already stopped (or its owner exited and the watchdog stopped it): nothing to do.
        echo "couchdb.sh: no pouchdb-server of this script runs on port $port" >&2
        return
    fi
    local pid
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        # Wait for it to exit: an on-disk store is locked until then, and a restart on the same
        # directory must find it free.
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$pidfile"
}

case ${1:-} in
    install) install ;;
    start)
        [[ $# -eq 3 ]] || die "usage: $0 start PORT DIR   (DIR 'memory' for an in-memory store)"
        start "$2" "$3"
        ;;
    stop)
        [[ $# -eq 2 ]] || die "usage: $0 stop PORT"
        stop "$2"
        ;;
    *) die "usage: $0 install | start PORT DIR | stop PORT" ;;
esac
