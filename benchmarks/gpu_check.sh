#!/usr/bin/env bash
# `make gpu-check`: the GPU benchmark on a host that has torch (with CUDA) but maybe not
# diffusers. Installs the wheels carried in .whl/ (no index, no downloads) into a private
# folder, then runs benchmarks.gpu; arguments go to it (e.g. --device cpu --quick).
# Then, when `make gpu-check-prepare` left the server archive for this Python and the
# exported repositories in .triton/, the BLS path end to end (benchmarks.gpu_serve). It
# writes its own JSON, so its failure never costs the benchmark's.
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
rc=0
"$PY" -m benchmarks.gpu "$@" || rc=$?
ARCHIVE=.triton/tritonserver-py$("$PY" -c 'import sys; print(*sys.version_info[:2], sep="")').tar.xz
if [[ -f $ARCHIVE && -f .triton/repositories.tar.xz ]]; then
  DEVICE=gpu
  [[ " $* " == *" --device cpu "* ]] && DEVICE=cpu
  serve_rc=0
  # The Python backend stub imports from its interpreter's site-packages and did not see
  # PYTHONPATH (seen on an H200): the carried wheels go into that environment too.
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || true
  fi
  timeout 480 "$PY" -m benchmarks.gpu_serve run --device "$DEVICE" || serve_rc=$?
  if (( serve_rc != 0 )); then
    echo "gpu_serve failed (exit $serve_rc); the benchmark's JSON is kept"
    (( rc != 0 )) || rc=$serve_rc
  fi
else
  echo "gpu_serve skipped: no $ARCHIVE or .triton/repositories.tar.xz (make gpu-check-prepare)" >&2
fi
exit "$rc"
