#!/usr/bin/env bash
# Installs what the bwrap sandbox driver needs: bubblewrap, and prlimit (util-linux).
# Idempotent; uses apt-get on Debian and Ubuntu, and says what to install elsewhere.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have bwrap && have prlimit; then
    exit 0
fi

if ! have apt-get; then
    echo "install-bwrap: please install bubblewrap and util-linux (prlimit) with your package manager" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then
        sudo="sudo"
    else
        echo "install-bwrap: not root and no sudo; install bubblewrap and util-linux as root" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq bubblewrap util-linux >/dev/null

# A quick check that an unprivileged sandbox works here (user namespaces enabled).
if ! bwrap --unshare-user --unshare-pid --uid 1000 --gid 1000 \
        --ro-bind / / --proc /proc --dev /dev true; then
    echo "install-bwrap: bwrap is installed but cannot make a sandbox here" \
         "(are unprivileged user namespaces disabled?)" >&2
    exit 1
fi
