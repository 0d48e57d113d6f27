#!/usr/bin/env bash
# Create .venv in the repository and install mlx-gateway into it with the given extras
# (default: worker). On Linux, also make sure OpenBLAS is there: MLX's CPU wheel bundles a
# reference BLAS that is ~30x slower, and the worker preloads OpenBLAS when it finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-worker}"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "mlx-gateway needs Python 3.10 or newer (found: $("$python" --version 2>&1))" >&2
    exit 1
fi

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "installing OpenBLAS (libopenblas0-pthread)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "warning: OpenBLAS not found; the CPU worker will be slow. Install libopenblas0-pthread." >&2
    fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
