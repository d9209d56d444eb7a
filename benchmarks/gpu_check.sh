#!/usr/bin/env bash
# `make gpu-check`: the GPU benchmark on a host that has torch (with CUDA) but maybe not
# diffusers. Installs the wheels carried in .whl/ (no index, no downloads) into a private
# folder, then runs benchmarks.gpu; arguments go to it (e.g. --device cpu --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/asyncdiff-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu "$@"
