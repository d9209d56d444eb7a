"""The Triton model repository of an AsyncDiff deployment, built from typed configs.

Models (one folder each, ``config.pbtxt`` + version ``1/``):

* ``unet_part_<k>``: component k. On GPUs a ``tensorrt_plan`` pinned to its
  own GPU; otherwise the shared ``asyncdiff_component`` Python-based backend
  (onnxruntime or torch). Dynamic batching lets concurrent generations at the
  same step share one call.
* the text encoder (SDXL: two; SD3: two CLIPs and T5 when the folder has one)
  and the VAE decoder (names from ``asyncdiff.contract``; the VAE without the
  1/scaling_factor (+ shift_factor) step, which the pipeline applies).
* ``asyncdiff_stream``: the pipeline engine (BLS, decoupled: per-step progress,
  then the image; requests in flight together, their component calls batched).
  Its parameters are exactly ``PipelineParams.to_parameters()``; its version
  folder holds the partition, the scheduler config and the tokenizer files,
  so it runs without the diffusers pipeline folder.
* ``asyncdiff``: the unary model clients call (HTTP, gRPC, perf_analyzer): the
  contract's inputs (``model_inputs``: SDXL adds its size inputs) and outputs,
  one instance per request in flight, each forwarding to the engine; its queue
  is bounded (``max_queue_size``).

Which GPU runs which instance is ``asyncdiff.placement.Placement``'s rule.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from asyncdiff.contract import (
    MODEL_NAME, NUMPY_DTYPES, OUTPUTS, PIPELINE_BACKEND, STREAM_MODEL_NAME, STREAM_OUTPUTS,
    TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNARY_BACKEND, VAE_DECODER, VAE_ENCODER, IOField,
    PipelineParams, model_inputs,
)
from asyncdiff.placement import Placement
from export.onnx_export import IOSpec
from serve import deployment
from export.triton_config import (
    FORCE_CPU_ONLY, ModelTensor, component_model_config, parse_config, python_model_config, tensor,
    tensorrt_model_config, write_model,
)

BACKENDS = ("tensorrt", "onnxruntime", "torch")
NETWORK_MODELS = (TEXT_ENCODER.model, TEXT_ENCODER_2.model, TEXT_ENCODER_3.model, VAE_ENCODER.model,
                  VAE_DECODER.model)


def triton_tensors(specs: Sequence[IOSpec]) -> list[ModelTensor]:
    # Triton needs non-empty dims: a per-sample scalar (the [batch] timestep) is [1] reshaped to [].
    return [tensor(s.name, s.dtype, s.shape) if s.shape else tensor(s.name, s.dtype, [1], reshape=[])
            for s in specs]


def network_config(name: str, inputs: Sequence[IOSpec], outputs: Sequence[IOSpec], backend: str,
                   runtime: str, artifact: str, max_batch: int, gpus: Sequence[int], count: int,
                   cuda_graphs: bool = False, profiles: int = 1):
    """The config of one network model: an instance on each of ``gpus``, or ``count`` on the CPU.
    ``cuda_graphs``: a static-shape TensorRT plan, run through CUDA graphs. Spatial dims the
    specs leave dynamic (-1: several resolutions) stay -1; ``profiles``: the TensorRT engine's
    optimization profiles (one per resolution)."""
    ins, outs = triton_tensors(inputs), triton_tensors(outputs)
    if backend == "tensorrt":
        if not gpus:
            raise ValueError(f"{name}: the tensorrt backend needs GPUs (--gpus)")
        config = tensorrt_model_config(name, ins, outs, gpu=gpus[0], max_batch_size=max_batch,
                                       dynamic_batching=True, cuda_graphs=cuda_graphs,
                                       profiles=profiles)
        config.instance_group[0].gpus.extend(gpus[1:])  # one group, one instance per GPU listed
        return config
    return component_model_config(name, ins, outs, runtime=runtime, artifact=artifact,
                                  max_batch_size=max_batch, instance_kind="gpu" if gpus else "cpu",
                                  gpus=list(gpus) or None, count=1 if gpus else count)


def model_placement(name: str, place: Placement) -> tuple[tuple[int, ...], int]:
    """(GPU ids, CPU instance count) of a model: component k as the placement says; the
    text encoders (both of SDXL's) and the VAE beside the pipeline."""
    if name.startswith("unet_part_"):
        k = int(name.rsplit("_", 1)[1])
        return place.instance_gpus(k), place.instance_count(k)
    return (() if place.pipeline_gpu is None else (place.pipeline_gpu,)), 1


def _model_tensor(f: IOField) -> ModelTensor:
    # The contract's dims: IMAGE [NUM_IMAGES, H, W, 3], LATENTS [NUM_IMAGES, C, h, w] and
    # PREVIEW [H, W, 3] are all -1 but the channels, whatever sizes the deployment serves.
    return tensor(f.name, NUMPY_DTYPES[f.dtype], f.dims)


def pipeline_config(params: PipelineParams):
    """The engine (``asyncdiff_stream``): decoupled, one instance, ``max_batch_size: 0``."""
    parameters = params.to_parameters()
    # Triton's own: on a GPU, BLS responses stay in GPU memory instead of being copied to the host.
    parameters[FORCE_CPU_ONLY] = "yes" if params.device == "cpu" else "no"
    inputs = model_inputs(params, stream=True)
    config = python_model_config(
        STREAM_MODEL_NAME, [_model_tensor(f) for f in inputs],
        [_model_tensor(f) for f in STREAM_OUTPUTS],
        backend=PIPELINE_BACKEND, max_batch_size=0, parameters=parameters)
    config.model_transaction_policy.decoupled = True
    _mark_optional(config, inputs)
    return config


def unary_config(params: PipelineParams):
    """``asyncdiff``: the contract's IO; an instance per request in flight; a bounded queue."""
    inputs = model_inputs(params, stream=False)  # forwarded as they came (SDXL: sizes too)
    config = python_model_config(
        MODEL_NAME, [_model_tensor(f) for f in inputs],
        [_model_tensor(f) for f in OUTPUTS],
        backend=UNARY_BACKEND, max_batch_size=0, count=params.max_batch_requests)
    _mark_optional(config, inputs)
    # Triton's queue policy works without batching: a full queue answers UNAVAILABLE at once.
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = params.max_queue_size
    return config


def write_pipeline(repo: Path, params: PipelineParams, files: Mapping[str, object]) -> None:
    """The engine (with its version files) and the unary model in front of it."""
    write(repo, pipeline_config(params), files)
    write(repo, unary_config(params))


def _mark_optional(config, fields: Sequence[IOField]) -> None:
    for entry, f in zip(config.input, fields):
        entry.optional = not f.required


def pipeline_params(config) -> PipelineParams:
    """The parameters of a parsed pipeline config, as the BLS reads them."""
    return PipelineParams.from_parameters({k: v.string_value for k, v in config.parameters.items()})


def pipeline_files(part, params: PipelineParams, scheduler_config: Path,
                   tokenizer_dir: Path) -> dict[str, object]:
    """Files of the pipeline's version folder: name inside it -> source path or bytes."""
    files: dict[str, object] = {
        params.partition_file: json.dumps(part.to_json(), indent=1).encode(),
        params.scheduler_config_file: Path(scheduler_config),
    }
    for path in sorted(Path(tokenizer_dir).rglob("*")):
        if path.is_file():
            files[f"{params.tokenizer_dir}/{path.relative_to(tokenizer_dir)}"] = path
    return files


def write(repo: Path, config, files: Mapping[str, object] | None = None) -> Path:
    return write_model(repo, config.name, config, files or {})


def our_models(repo: Path) -> list[Path]:
    """Folders (and files) a previous export may have left in ``repo``."""
    names = {MODEL_NAME, STREAM_MODEL_NAME, *NETWORK_MODELS, "build_engines.sh", deployment.FILE}
    return sorted(p for p in Path(repo).iterdir()
                  if p.name in names or p.name.startswith("unet_part_"))


def clear(repo: Path) -> None:
    """Remove what ``our_models`` lists (never anything else)."""
    for path in our_models(repo):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_configs(repo: Path) -> dict:
    """Every ``<model>/config.pbtxt`` of ``repo``, parsed by the protobuf text parser."""
    return {p.parent.name: parse_config(p.read_text())
            for p in sorted(Path(repo).glob("*/config.pbtxt"))}
