# Sourced by the install scripts: apt_install PACKAGE... installs Debian packages when a tool the
# tests need is missing, as root or through sudo. Its output goes to stderr, so that scripts whose
# stdout is a path (couchdb.sh, python.sh) keep it clean.
apt_install() {
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "apt.sh: installing $* needs root (apt-get) or sudo" >&2; return 1; }
        sudo=(sudo)
    fi
    echo "apt.sh: installing Debian packages: $*" >&2
    # --no-install-recommends: what is asked for, not its suggested companions.
    { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@"; } >&2
}
