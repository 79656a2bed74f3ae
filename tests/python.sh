#!/usr/bin/env bash
# A Python environment for the outside-producer test (tests/tests/outside_producer.rs): the
# confluent-kafka client (its own librdkafka), fastavro and cryptography from PyPI, pinned in
# tests/python/requirements.txt, in a virtualenv cached under .cache/.
#
#   tests/python.sh install    creates the virtualenv and installs the pinned packages (once;
#                              quick when cached: nothing happens unless the pins changed)
#   tests/python.sh path       prints the virtualenv's python (fails if not installed)
#
# Environment: STREAMLEDGER_PYTHON_VENV moves the virtualenv (default: .cache/python-venv).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STREAMLEDGER_PYTHON_VENV:-$ROOT/.cache/python-venv}
PINS=$ROOT/tests/python/requirements.txt
PY=$VENV/bin/python

die() {
    echo "python.sh: $*" >&2
    exit 1
}

install() {
    command -v python3 >/dev/null || die "python3 is not installed (apt-get install python3 python3-venv)"
    mkdir -p "$(dirname "$VENV")"
    # One installer at a time (parallel test binaries); the others wait and find it installed.
    (
        flock 9
        # The marker names the pins' digest, so changed pins reinstall.
        want=$(sha256sum "$PINS" | cut -c1-16)
        if [[ -f $VENV/.installed && $(cat "$VENV/.installed") == "$want" && -x $PY ]]; then
            exit 0
        fi
        echo "python.sh: installing confluent-kafka, fastavro and cryptography into $VENV (once)" >&2
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r "$PINS" >&2 \
            || die "pip install of tests/python/requirements.txt failed (see above)"
        "$PY" -c "import confluent_kafka, fastavro, cryptography; from confluent_kafka.schema_registry.avro import AvroSerializer" \
            || die "the installed packages do not import"
        echo "$want" >"$VENV/.installed"
    ) 9>"$(dirname "$VENV")/.python-venv.lock"
    echo "$PY"
}

case "${1:-}" in
install) install ;;
path)
    [[ -f $VENV/.installed && -x $PY ]] || die "not installed: run bash tests/python.sh install"
    echo "$PY"
    ;;
*) die "usage: tests/python.sh install|path" ;;
esac
