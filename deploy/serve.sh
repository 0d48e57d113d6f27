#!/usr/bin/env bash
# Install, then run the gateway and one worker on the default model until Ctrl-C.
#   PORT (default 8000), MODEL (default smollm2-135m) and HOST (default 127.0.0.1) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh worker

.venv/bin/gateway --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" &
gateway_pid=$!
.venv/bin/worker --model "${MODEL:-smollm2-135m}" &
worker_pid=$!
trap 'kill "$worker_pid" "$gateway_pid" 2>/dev/null; wait' EXIT INT TERM
echo "gateway pid $gateway_pid, worker pid $worker_pid: http://${HOST:-127.0.0.1}:${PORT:-8000}/v1"
# Stop both when either exits (a loop: macOS's bash 3.2 has no `wait -n`).
while kill -0 "$gateway_pid" 2>/dev/null && kill -0 "$worker_pid" 2>/dev/null; do sleep 1; done
