#!/usr/bin/env bash
# First start: export the model repository for the GPUs present into the
# volume; every start: run tritonserver on it. Extra arguments go to tritonserver.
#   MODEL       tiny | path of a diffusers pipeline folder (mount it)   [tiny]
#   COMPONENTS  N UNet components                         [number of GPUs]
#   STRIDE      AsyncDiff stride S                                      [1]
#   GPUS        GPU ids for the components, comma-separated [all visible]
#   MODEL_REPOSITORY  where the repository lives         [/models/repository]
#   EXPORT_ARGS extra arguments for `python3 -m export` (e.g. --fp16)
set -euo pipefail

repo="${MODEL_REPOSITORY:-/models/repository}"
marker="$repo/.asyncdiff-export"

gpu_count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
if [ "${gpu_count:-0}" -lt 1 ]; then
    echo "entrypoint: no GPU visible (nvidia-smi -L); start the container with GPUs" >&2
    exit 1
fi
components="${COMPONENTS:-$gpu_count}"
stride="${STRIDE:-1}"
gpus="${GPUS:-$(seq -s, 0 $((gpu_count - 1)))}"
settings="model=${MODEL:-tiny} components=$components stride=$stride gpus=$gpus${EXPORT_ARGS:+ $EXPORT_ARGS}"

if [ -f "$marker" ]; then
    if [ "$(cat "$marker")" != "$settings" ]; then
        echo "entrypoint: $repo was exported with [$(cat "$marker")], not [$settings];" \
             "serving it as is (delete it to re-export)" >&2
    fi
else
    # Export into a scratch folder and rename it at the end, so an interrupted
    # export (e.g. a long engine build) is redone instead of served half-built.
    tmp="$repo.partial"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$repo")"
    echo "entrypoint: exporting [$settings] into $repo (TensorRT engine build; first start only)"
    # shellcheck disable=SC2086  # EXPORT_ARGS is a list of words on purpose
    python3 -m export --model "${MODEL:-tiny}" --components "$components" --stride "$stride" \
        --backend tensorrt --build-engines --gpus "$gpus" --out "$tmp" ${EXPORT_ARGS:-}
    echo "$settings" > "$tmp/.asyncdiff-export"
    rm -rf "$repo"
    mv "$tmp" "$repo"
fi

exec tritonserver --model-repository="$repo" "$@"
