#!/bin/sh
# Applies every Kafka Connect sink config in this directory (connectors/*.json) to a Connect
# cluster with `PUT /connectors/<name>/config` (<name>: the file name without .json), which
# creates the connector or updates it in place: running it again is harmless. Before that, when
# COUCHDB_URL is set, it creates the CouchDB database of the world-state copy and installs the
# design document whose update function the CouchDB sink calls (connectors/couchdb/).
#
# Upper-case ${NAME} placeholders in the files are replaced by the environment's values (URLs
# and credentials; JSON-escaped). Lower-case ones (${key}, ${topic}, ${connector}) belong to the
# connectors and are left alone. An unset variable, a connector Connect refuses, or an
# unreachable server fails the run with a message naming the file and the HTTP status.
#
#   CONNECT_URL           Kafka Connect REST API (default http://localhost:8083)
#   CONNECT_WAIT_SECONDS  how long to wait for it to answer (default 60)
#   CONNECTORS_DIR        where the configs are (default: this script's directory)
#   COUCHDB_URL, COUCHDB_USER, COUCHDB_PASSWORD, COUCHDB_DATABASE   the CouchDB sink's target
#   SCHEMA_REGISTRY_URL, POSTGRES_JDBC_URL, POSTGRES_USER, POSTGRES_PASSWORD,
#   KAFKA_BOOTSTRAP_SERVERS   used by the configs
set -u

CONNECT_URL=${CONNECT_URL:-http://localhost:8083}
CONNECT_WAIT_SECONDS=${CONNECT_WAIT_SECONDS:-60}
CONNECTORS_DIR=${CONNECTORS_DIR:-$(cd "$(dirname "$0")" && pwd)}
COUCHDB_DATABASE=${COUCHDB_DATABASE:-mychannel_worldstate}
export COUCHDB_DATABASE

say() { echo "apply.sh: $*" >&2; }

response=$(mktemp)
trap 'rm -f "$response"' EXIT

# Prints FILE with its upper-case ${NAME} placeholders replaced; fails naming the first unset one.
substitute() {
    awk -v file="$1" '
        function esc(s,   r, i, c) {
            r = ""
            for (i = 1; i <= length(s); i++) {
                c = substr(s, i, 1)
                if (c == "\\" || c == "\"") r = r "\\"
                r = r c
            }
            return r
        }
        {
            line = $0; out = ""
            while (match(line, /\$\{[A-Z][A-Z0-9_]*\}/)) {
                name = substr(line, RSTART + 2, RLENGTH - 3)
                if (!(name in ENVIRON)) {
                    printf "apply.sh: %s: line %d: ${%s} is not set\n", file, NR, name > "/dev/stderr"
                    exit 1
                }
                out = out substr(line, 1, RSTART - 1) esc(ENVIRON[name])
                line = substr(line, RSTART + RLENGTH)
            }
            print out line
        }' "$1"
}

# http AUTH METHOD URL [curl options...]: prints the HTTP status (000 when there was no answer;
# curl says why on stderr) and leaves the response body in $response. AUTH is `user:password` or
# empty; it goes to curl on stdin, not on the command line, where ps would show it.
http() {
    auth=$1 method=$2 url=$3
    shift 3
    if [ -n "$auth" ]; then
        # curl's config syntax: a quoted value escapes " and \ with a backslash.
        printf 'user = "%s"\n' "$(printf '%s' "$auth" | sed 's/[\\"]/\\&/g')" | curl -sS -K - -o "$response" -w '%{http_code}' -X "$method" -H 'Content-Type: application/json' "$@" "$url"
    else
        curl -sS -o "$response" -w '%{http_code}' -X "$method" -H 'Content-Type: application/json' "$@" "$url"
    fi
}

failures=0
fail() {
    say "$*"
    failures=$((failures + 1))
}

# The CouchDB side of the CouchDB sink: the database and the design document it calls.
if [ -n "${COUCHDB_URL:-}" ]; then
    db="$COUCHDB_URL/$COUCHDB_DATABASE"
    couch_auth=""
    [ -z "${COUCHDB_USER:-}" ] || couch_auth="$COUCHDB_USER:${COUCHDB_PASSWORD:-}"
    status=$(http "$couch_auth" PUT "$db")
    case "$status" in
        201 | 202) say "CouchDB database $COUCHDB_DATABASE created" ;;
        412) say "CouchDB database $COUCHDB_DATABASE exists" ;;
        *) fail "PUT $db answered HTTP $status: $(cat "$response")" ;;
    esac
    for design in "$CONNECTORS_DIR"/couchdb/*.json; do
        [ -e "$design" ] || continue
        id=$(sed -n 's/^[[:space:]]*"_id":[[:space:]]*"\([^"]*\)".*/\1/p' "$design" | head -n 1)
        [ -n "$id" ] || { fail "$design: no \"_id\""; continue; }
        body=$(cat "$design")
        # Replacing an existing design document needs its current revision.
        if [ "$(http "$couch_auth" GET "$db/$id")" = 200 ]; then
            rev=$(sed -n 's/.*"_rev":"\([^"]*\)".*/\1/p' "$response")
            body=$(printf '%s' "$body" | sed "1s/^{/{\"_rev\": \"$rev\",/")
        fi
        status=$(http "$couch_auth" PUT "$db/$id" --data-binary "$body")
        case "$status" in
            201 | 202) say "$design: installed as $COUCHDB_DATABASE/$id" ;;
            *) fail "$design: PUT $db/$id answered HTTP $status: $(cat "$response")" ;;
        esac
    done
fi

# Kafka Connect may still be starting.
waited=0
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$CONNECT_URL/connectors")" = 200 ]; do
    if [ "$waited" -ge "$CONNECT_WAIT_SECONDS" ]; then
        say "Kafka Connect at $CONNECT_URL did not answer GET /connectors within $CONNECT_WAIT_SECONDS s"
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

found=0
for file in "$CONNECTORS_DIR"/*.json; do
    [ -e "$file" ] || continue
    found=$((found + 1))
    name=$(basename "$file" .json)
    body=$(substitute "$file") || { failures=$((failures + 1)); continue; }
    url="$CONNECT_URL/connectors/$name/config"
    status=$(http "" PUT "$url" --data-binary "$body")
    case "$status" in
        201) say "$file: connector $name created" ;;
        200) say "$file: connector $name updated" ;;
        *) fail "$file: PUT $url answered HTTP $status: $(cat "$response")" ;;
    esac
done
[ "$found" -gt 0 ] || { say "no connector configs (*.json) in $CONNECTORS_DIR"; exit 1; }
if [ "$failures" -gt 0 ]; then
    say "$failures failure(s)"
    exit 1
fi
