#!/usr/bin/env bash
# One model across the Macs of deploy/sharded/hosts.json: the command a supervisor runs (and
# restarts) on the first Mac, where the gateway runs too. See deploy/README.md, "One model
# across several Macs".
#   MLX_GATEWAY_BIN      the venv's bin directory, the same path on every Mac
#   MLX_GATEWAY_HOSTS    the hostfile (default: deploy/sharded/hosts.json beside this script)
#   MLX_GATEWAY_ADDRESS  the gateway's ZeroMQ address as rank 0 reaches it (rank 0 runs on the
#                        hostfile's first host; default: tcp://127.0.0.1:5555)
# Any arguments go to every rank's worker: --model, --served-name, --max-sequences, …
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${MLX_GATEWAY_BIN:?set MLX_GATEWAY_BIN to the venv bin directory}"
exec "$bin/mlx.launch" --hostfile "${MLX_GATEWAY_HOSTS:-$here/hosts.json}" --python "$bin/python" \
    -- -m worker --distributed tensor --gateway "${MLX_GATEWAY_ADDRESS:-tcp://127.0.0.1:5555}" "$@"
