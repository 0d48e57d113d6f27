#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite. Arguments go to pytest, e.g.
#   bash tests/run.sh -m "not slow"     # the fast set only (no model download)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh worker,test
exec .venv/bin/python -m pytest "$@"
