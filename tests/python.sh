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

# shellcheck source=tests/install-once.sh
. "$ROOT/tests/install-once.sh"
# shellcheck source=tests/apt.sh
. "$ROOT/tests/apt.sh"

die() {
    echo "python.sh: $*" >&2
    exit 1
}

venv_ready() {
    [[ -x $PY ]]
}

make_venv() {
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r "$PINS" >&2 \
        || die "pip install of tests/python/requirements.txt failed (see above)"
    "$PY" -c "import confluent_kafka, fastavro, cryptography; from confluent_kafka.schema_registry.avro import AvroSerializer" \
        || die "the installed packages do not import"
}

install() {
    if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3 python3-venv || die "python3 with venv could not be installed (apt-get install python3 python3-venv)"
    fi
    install_once python.sh "$VENV" "$PINS" venv_ready make_venv
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
