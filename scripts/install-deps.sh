#!/usr/bin/env bash
# Installs the system packages `make run` or `make test` need, only when missing.
# Usage: scripts/install-deps.sh run|test
set -euo pipefail
what=${1:-run}

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v curl >/dev/null || need_apt+=(curl)

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} — install them (e.g. sudo apt-get install ${need_apt[*]}) and retry" >&2
    exit 1
  fi
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [[ $what == test ]] && ! command -v cargo >/dev/null; then
  echo "cargo is missing: install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi
