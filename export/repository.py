"""The Triton model repository of an AsyncDiff deployment, built from typed configs.

Models (one folder each, ``config.pbtxt`` + version ``1/``):

* ``unet_part_<k>``: component k. On GPUs a ``tensorrt_plan`` pinned to its
  own GPU; otherwise the shared ``asyncdiff_component`` Python-based backend
  (onnxruntime or torch). Dynamic batching lets concurrent generations at the
  same step share one call.
* ``text_encoder`` (``input_ids`` -> ``last_hidden_state``) and
  ``vae_decoder`` (``latents`` -> ``image``, without the 1/scaling_factor
  step, which the pipeline applies).
* ``asyncdiff``: the pipeline (BLS) model, ``backend: "asyncdiff_pipeline"``;
  its version folder holds ``partition.json``, the scheduler config and the
  tokenizer files, so it can run without the diffusers pipeline folder.

Stride 2 without batched stride puts a second instance of the last component
on one extra GPU (N+1 GPUs): in a round its two timesteps are two separate
calls, and the second instance lets them run side by side. With
``batched_stride`` the last component takes both timesteps as one doubled
batch on its own GPU (N GPUs, one instance).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.onnx_export import TEXT_INPUT, TEXT_OUTPUT, VAE_INPUT, VAE_OUTPUT, IOSpec
from export.triton_config import (
    component_model_config, parse_config, python_model_config, tensor, tensorrt_model_config,
    write_model,
)

PIPELINE_MODEL = "asyncdiff"
PIPELINE_BACKEND = "asyncdiff_pipeline"
TEXT_ENCODER = "text_encoder"
VAE_DECODER = "vae_decoder"
PARTITION_FILE = "partition.json"
SCHEDULER_FILE = "scheduler/scheduler_config.json"  # the diffusers pipeline layout
TOKENIZER_DIR = "tokenizer"
BACKENDS = ("tensorrt", "onnxruntime", "torch")


@dataclass(frozen=True)
class Placement:
    """Where a model's instances run: ``gpus`` empty means ``count`` CPU instances."""

    gpus: tuple[int, ...] = ()
    count: int = 1


def component_placements(num_components: int, stride: int, batched_stride: bool,
                         gpus: Sequence[int] | None) -> list[Placement]:
    """Component k on ``gpus[k]``; plain stride 2 adds ``gpus[N]`` to the last component.

    Without GPUs the extra instance of the last component is a second CPU instance.
    """
    extra = stride == 2 and not batched_stride
    if gpus is None:
        places = [Placement() for _ in range(num_components)]
        if extra:
            places[-1] = Placement(count=2)
        return places
    needed = num_components + int(extra)
    if len(gpus) != needed:
        why = " (stride 2 without --batched-stride adds one GPU for the last component)" if extra else ""
        raise ValueError(f"--gpus lists {len(gpus)} GPUs; {needed} needed for "
                         f"{num_components} components{why}")
    places = [Placement((g,)) for g in gpus[:num_components]]
    if extra:
        places[-1] = Placement((gpus[num_components - 1], gpus[num_components]))
    return places


def triton_tensors(specs: Sequence[IOSpec]):
    # Triton needs non-empty dims: a per-sample scalar (the [batch] timestep) is [1] reshaped to [].
    return [tensor(s.name, s.dtype, s.shape) if s.shape else tensor(s.name, s.dtype, [1], reshape=[])
            for s in specs]


def network_config(name: str, inputs: Sequence[IOSpec], outputs: Sequence[IOSpec], backend: str,
                   runtime: str, artifact: str, max_batch: int, place: Placement):
    """The config of one network model (component, text encoder or VAE decoder)."""
    ins, outs = triton_tensors(inputs), triton_tensors(outputs)
    if backend == "tensorrt":
        if not place.gpus:
            raise ValueError(f"{name}: the tensorrt backend needs a GPU placement")
        config = tensorrt_model_config(name, ins, outs, gpu=place.gpus[0], max_batch_size=max_batch,
                                       dynamic_batching=True)
        # One group listing several GPUs = one instance on each of them.
        config.instance_group[0].gpus.extend(place.gpus[1:])
        return config
    kind = "gpu" if place.gpus else "cpu"
    config = component_model_config(name, ins, outs, runtime=runtime, artifact=artifact,
                                    max_batch_size=max_batch, instance_kind=kind,
                                    gpus=list(place.gpus) or None, count=place.count)
    return config


@dataclass(frozen=True)
class PipelineDefaults:
    """Request defaults the BLS applies to omitted optional inputs."""

    steps: int = 25
    guidance_scale: float = 3.0
    warmup: int = 1
    scheduler: str = "ddim"
    seed: int = 0


def pipeline_inputs():
    """PROMPT is required; the other inputs are optional (defaults in the parameters)."""
    return [
        tensor("PROMPT", np.object_, [1]), tensor("NEGATIVE_PROMPT", np.object_, [1]),
        tensor("SEED", np.int64, [1]), tensor("STEPS", np.int32, [1]),
        tensor("GUIDANCE_SCALE", np.float32, [1]), tensor("WARMUP", np.int32, [1]),
        tensor("SCHEDULER", np.object_, [1]),
    ]


def pipeline_config(part, *, latent_shape: Sequence[int], image_shape: Sequence[int],
                    dtype: str, vae_scaling_factor: float, defaults: PipelineDefaults,
                    gpu: int | None = None):
    """The BLS model: ``max_batch_size: 0``, one generation per request.

    With ``gpu`` the BLS keeps latents and scheduler on that GPU and takes component
    outputs as GPU tensors (no host round-trip per step).
    """
    height, width = image_shape
    outputs = [tensor("IMAGE", np.uint8, [height, width, 3]),
               tensor("LATENTS", np.float32, list(latent_shape))]
    params = {
        "model": part.model,
        "components": part.num_components,
        "stride": part.stride,
        "batched_stride": str(part.batched_stride).lower(),
        "layout": part.layout,
        "unet_batch": part.batch,
        "latent_shape": json.dumps(list(latent_shape)),
        "image_shape": json.dumps([height, width, 3]),
        "dtype": dtype,
        "vae_scaling_factor": repr(float(vae_scaling_factor)),
        "default_steps": defaults.steps,
        "default_guidance_scale": repr(float(defaults.guidance_scale)),
        "default_warmup": defaults.warmup,
        "default_scheduler": defaults.scheduler,
        "default_seed": defaults.seed,
        "component_models": json.dumps([c.name for c in part.components]),
        "latent_channels": latent_shape[0],
        # Model and tensor names of the text encoder and VAE decoder calls.
        "text_encoder": TEXT_ENCODER, "text_input": TEXT_INPUT, "text_output": TEXT_OUTPUT,
        "vae_decoder": VAE_DECODER, "vae_input": VAE_INPUT, "vae_output": VAE_OUTPUT,
        "partition_file": PARTITION_FILE,
        "scheduler_config_file": SCHEDULER_FILE,
        "tokenizer_dir": TOKENIZER_DIR,
        "device": "cpu" if gpu is None else f"cuda:{gpu}",
        # Let BLS responses stay in GPU memory instead of being copied to the host.
        "FORCE_CPU_ONLY_INPUT_TENSORS": "yes" if gpu is None else "no",
    }
    config = python_model_config(PIPELINE_MODEL, pipeline_inputs(), outputs,
                                 backend=PIPELINE_BACKEND, max_batch_size=0, parameters=params)
    for entry in config.input:
        entry.optional = entry.name != "PROMPT"
    return config


def pipeline_files(part, scheduler_config: Path, tokenizer_dir: Path) -> dict[str, object]:
    """Files of the pipeline's version folder: name inside it -> source path or bytes."""
    files: dict[str, object] = {
        PARTITION_FILE: json.dumps(part.to_json(), indent=1).encode(),
        SCHEDULER_FILE: Path(scheduler_config),
    }
    for path in sorted(Path(tokenizer_dir).rglob("*")):
        if path.is_file():
            files[f"{TOKENIZER_DIR}/{path.relative_to(tokenizer_dir)}"] = path
    return files


def write(repo: Path, config, files: Mapping[str, object] | None = None) -> Path:
    return write_model(repo, config.name, config, files or {})


def our_models(repo: Path) -> list[Path]:
    """Folders (and files) a previous export may have left in ``repo``."""
    names = {PIPELINE_MODEL, TEXT_ENCODER, VAE_DECODER, "build_engines.sh"}
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
