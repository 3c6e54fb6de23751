#!/usr/bin/env bash
# Starts a coordinator and one worker serving every capability on this machine, with the
# embedded SQLite backends in ./.data, in the foreground. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release
data=${AO__LOCAL__DATA_DIR:-./.data}
mkdir -p "$data"
chmod 700 "$data"

# A REST API token, made once and kept in the data dir (readable by this user only).
token_file="$data/api-token"
if [[ ! -s $token_file ]]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_file")
fi
export AO__API__TOKEN=${AO__API__TOKEN:-file:$token_file}
export AO__LOCAL__DATA_DIR=$data
export AO__SANDBOX__DRIVER=${AO__SANDBOX__DRIVER:-bwrap}
# Root is never a sandbox user: a root worker runs its sandboxes as an unprivileged host
# user, here nobody's ids unless AO__SANDBOX__HOST_UID/HOST_GID say otherwise.
if [[ $(id -u) == 0 && $AO__SANDBOX__DRIVER == bwrap ]]; then
  export AO__SANDBOX__HOST_UID=${AO__SANDBOX__HOST_UID:-$(id -u nobody)}
  export AO__SANDBOX__HOST_GID=${AO__SANDBOX__HOST_GID:-$(id -g nobody)}
  echo "  running as root: sandboxes run as host uid $AO__SANDBOX__HOST_UID (sandbox.host_uid)"
fi
export AO__AGENT__COMMAND=${AO__AGENT__COMMAND:-claude}
# The model key reaches the sandbox through this secret ref, and nowhere else.
if [[ -n ${ANTHROPIC_API_KEY:-} ]]; then
  export AO__AGENT__API_KEY=${AO__AGENT__API_KEY:-env:ANTHROPIC_API_KEY}
fi
listen=${AO__SERVER__LISTEN:-127.0.0.1:8080}

echo "agent-orchestrator on this machine"
echo "  data:        $data (SQLite queue and state)"
echo "  coordinator: http://$listen"
echo "  agent:       $AO__AGENT__COMMAND, ${AO__AGENT__KIND:-claude} profiles (sandbox: $AO__SANDBOX__DRIVER)"
if [[ ${AO__AGENT__KIND:-claude} == claude ]]; then
  if ! command -v claude >/dev/null; then
    echo "  !! the Claude Code CLI is not installed: npm install -g @anthropic-ai/claude-code" >&2
  fi
  if [[ -z ${ANTHROPIC_API_KEY:-} ]]; then
    echo "  !! ANTHROPIC_API_KEY is not set: the agent cannot call the model. export ANTHROPIC_API_KEY=… and restart." >&2
  fi
fi
echo "  GitHub App:  not configured (tasks come through the REST API; see README)"
echo

pids=()
stop() {
  trap - INT TERM
  echo "stopping…"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

"$bin/coordinator" & pids+=($!)
"$bin/worker" & pids+=($!)

for _ in $(seq 1 100); do
  curl -fsS "http://$listen/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<MSG

Ready. Submit a task (any git URL or local path you can push to):

  curl -sS -X POST http://$listen/api/v1/tasks \\
    -H "Authorization: Bearer \$(cat $token_file)" -H 'Content-Type: application/json' \\
    -d '{"repository": "/path/to/repo.git", "prompt": "Add a CONTRIBUTING.md", "pipeline": "code"}'

Follow it:  curl -sS -N -H 'Accept: text/event-stream' -H "Authorization: Bearer \$(cat $token_file)" \\
              http://$listen/api/v1/tasks/<id>/events
Ctrl-C stops everything.

MSG
wait "${pids[@]}"
