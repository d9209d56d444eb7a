#!/usr/bin/env bash
# First start: export the model repository for the GPUs present into the
# volume; every start: run tritonserver on it. Extra arguments go to tritonserver.
#   MODEL       tiny | path of a diffusers pipeline folder (mount it)   [tiny]
#   GPUS        GPU ids to use, comma-separated                  [all visible]
#   COMPONENTS  N UNet components                            [one per GPU]
#   STRIDE      AsyncDiff stride S                                      [1]
#   BATCHED_STRIDE  auto | yes | no: S=2 on N GPUs is batched stride, on
#               N+1 GPUs plain stride (asyncdiff.placement decides) [auto]
#   VALIDATE    1: run the CPU parity checks during the export           [0]
#   MODEL_REPOSITORY  where the repository lives         [/models/repository]
#   EXPORT_ARGS extra arguments for `python3 -m export` (e.g. --fp16)
#   CUDA_MEMORY_POOL_MB  Triton's CUDA memory pool per GPU in use, MiB
#               [the size export recommends in <repository>/deployment.json]
set -euo pipefail

repo="${MODEL_REPOSITORY:-/models/repository}"
marker="$repo/.asyncdiff-export"

gpu_count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
if [ "${gpu_count:-0}" -lt 1 ]; then
    echo "entrypoint: no GPU visible (nvidia-smi -L); start the container with GPUs" >&2
    exit 1
fi
gpus="${GPUS:-$(seq -s, 0 $((gpu_count - 1)))}"
# N, stride mode and GPU list from the one placement rule; an impossible combination
# stops here (exit 2) with its message, before any export work.
place_args="$(python3 -m asyncdiff.placement --gpus "$gpus" --stride "${STRIDE:-1}" \
    --batched-stride "${BATCHED_STRIDE:-auto}" ${COMPONENTS:+--components "$COMPONENTS"} \
    --export-args)"
validate="--no-validate"  # CPU parity checks are slow; the engines are what gets served
[ "${VALIDATE:-0}" = 1 ] && validate=""
settings="model=${MODEL:-tiny} $place_args${EXPORT_ARGS:+ $EXPORT_ARGS}"

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
    # shellcheck disable=SC2086  # place_args, validate and EXPORT_ARGS are lists of words on purpose
    python3 -m export --model "${MODEL:-tiny}" $place_args --backend tensorrt --build-engines \
        $validate --out "$tmp" ${EXPORT_ARGS:-}
    echo "$settings" > "$tmp/.asyncdiff-export"
    rm -rf "$repo"
    mv "$tmp" "$repo"
fi

# --cuda-memory-pool-byte-size=<gpu>:<bytes> for every GPU of the repository (Triton's
# default, 64 MiB, is far below what the cut tensors of one SD round need at 768x768).
pool_args="$(python3 -m serve.deployment "$repo" \
    ${CUDA_MEMORY_POOL_MB:+--cuda-memory-pool-mb "$CUDA_MEMORY_POOL_MB"})"
# Explicit model control, every model loaded: a component whose stub died can be reloaded
# through the repository API (unload, then load) instead of restarting the container.
# shellcheck disable=SC2086  # pool_args is a list of words on purpose
exec tritonserver --model-repository="$repo" --model-control-mode=explicit '--load-model=*' \
    $pool_args "$@"
