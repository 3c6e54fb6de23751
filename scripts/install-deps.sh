#!/usr/bin/env bash
# Installs the system packages `make run` or `make test` need, only when missing.
# Usage: scripts/install-deps.sh run|test
set -euo pipefail
what=${1:-run}

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v curl >/dev/null || need_apt+=(curl)
# The dashboard's browser test drives Debian's Chromium (tests/browser).
if [[ $what == test && ! -x /usr/bin/chromium ]]; then need_apt+=(chromium); fi

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} — install them (e.g. sudo apt-get install ${need_apt[*]}) and retry" >&2
    exit 1
  fi
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The sandbox tests' unprivileged host user: the sandbox user of a root worker
# (sandbox.host_uid) and the user an ordinary-user worker runs as.
if [[ $what == test && $(id -u) -eq 0 ]] && ! id ao-sandbox-test >/dev/null 2>&1; then
  echo "adding the sandbox tests' user ao-sandbox-test"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ao-sandbox-test
fi

if [[ $what == test ]] && ! command -v cargo >/dev/null; then
  echo "cargo is missing: install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi

# The Claude Code CLI: the agent of `make run`, and the real agent of the end-to-end
# tests (pinned there, so the tests meet the version they were written against).
CLAUDE_CODE_VERSION=2.1.197
claude_ok() {
  command -v claude >/dev/null &&
    { [[ $what != test ]] || claude --version 2>/dev/null | grep -q "^$CLAUDE_CODE_VERSION "; }
}
if ! claude_ok; then
  if ! command -v npm >/dev/null; then
    echo "npm is missing: install Node.js and npm, then retry (needed for the Claude Code CLI)" >&2
    exit 1
  fi
  echo "installing the Claude Code CLI $CLAUDE_CODE_VERSION (npm)"
  npm install -g --silent --no-audit --no-fund "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null
  claude --version >/dev/null
fi

# playwright-core for the dashboard's browser test, as locked in tests/browser.
browser_tests="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
if [[ $what == test && ! -d $browser_tests/node_modules/playwright-core ]]; then
  if ! command -v npm >/dev/null; then
    echo "npm is missing: install Node.js and npm, then retry (needed for the browser test)" >&2
    exit 1
  fi
  echo "installing the browser test's npm packages (tests/browser)"
  npm ci --prefix "$browser_tests" --silent --no-audit --no-fund >/dev/null
fi

# GitHub's webhook payload examples (tests/tests/github_examples.rs), REST description and
# webhook schemas (the fake GitHub's contract check, tests/src/fake_github/openapi.rs), as
# locked in tests/github-examples.
github_examples="$(cd "$(dirname "$0")/.." && pwd)/tests/github-examples"
github_packages_ok() {
  local p
  for p in webhooks-examples openapi openapi-webhooks; do
    [[ -d $github_examples/node_modules/@octokit/$p ]] || return 1
  done
}
if [[ $what == test ]] && ! github_packages_ok; then
  if ! command -v npm >/dev/null; then
    echo "npm is missing: install Node.js and npm, then retry (needed for GitHub's descriptions)" >&2
    exit 1
  fi
  echo "installing GitHub's webhook examples, REST description and webhook schemas (tests/github-examples)"
  npm ci --prefix "$github_examples" --silent --no-audit --no-fund >/dev/null
fi
