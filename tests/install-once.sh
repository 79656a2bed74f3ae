# Sourced by the test installers (tests/couchdb.sh, tests/python.sh): install something once
# into a cache directory, pinned by a lock file, safely when parallel test binaries race.
#
#   install_once NAME DIR PINS READY INSTALL
#
# Runs the function INSTALL (which fills DIR) unless DIR/.installed names PINS' digest and the
# function READY succeeds; a changed PINS file therefore reinstalls. One installer runs at a time;
# the others wait on the lock and then find it installed. The lock is held in a subshell so that
# its descriptor is not inherited by servers a script starts afterwards.

install_once() {
    local name=$1 dir=$2 pins=$3 ready=$4 install=$5
    mkdir -p "$(dirname "$dir")"
    (
        flock 9
        want=$(sha256sum "$pins" | cut -c1-16)
        if [[ -f $dir/.installed && $(cat "$dir/.installed") == "$want" ]] && "$ready"; then
            exit 0
        fi
        echo "$name: installing into $dir (once)" >&2
        rm -f "$dir/.installed"
        "$install"
        echo "$want" >"$dir/.installed"
    ) 9>"$dir.lock"
}
