"""Triton model configs as typed protobuf messages, rendered to config.pbtxt.

Configs are built with ``model_config_pb2.ModelConfig`` (the server's own
schema, shipped with tritonclient) so a typo in a field name fails here, at
build time, instead of at model load on the server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
from numpy.typing import DTypeLike
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

COMPONENT_BACKEND = "asyncdiff_component"
# The python backend's own parameter: "no" lets a model receive GPU tensors (default "yes").
FORCE_CPU_ONLY = "FORCE_CPU_ONLY_INPUT_TENSORS"
Runtime = Literal["onnxruntime", "torch"]
InstanceKind = Literal["cpu", "gpu"]
FileSource = Union[str, Path, bytes]

# The single numpy <-> Triton dtype table; everything else derives from it.
_DTYPES: dict[np.dtype, int] = {
    np.dtype(np.bool_): mc.TYPE_BOOL,
    np.dtype(np.uint8): mc.TYPE_UINT8,
    np.dtype(np.uint16): mc.TYPE_UINT16,
    np.dtype(np.uint32): mc.TYPE_UINT32,
    np.dtype(np.uint64): mc.TYPE_UINT64,
    np.dtype(np.int8): mc.TYPE_INT8,
    np.dtype(np.int16): mc.TYPE_INT16,
    np.dtype(np.int32): mc.TYPE_INT32,
    np.dtype(np.int64): mc.TYPE_INT64,
    np.dtype(np.float16): mc.TYPE_FP16,
    np.dtype(np.float32): mc.TYPE_FP32,
    np.dtype(np.float64): mc.TYPE_FP64,
    np.dtype(np.object_): mc.TYPE_STRING,
}
_NUMPY_OF = {v: k for k, v in _DTYPES.items()}
_KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}


def triton_dtype(dtype: DTypeLike) -> int:
    """numpy dtype -> ``DataType`` enum value (e.g. ``mc.TYPE_FP32``)."""
    key = np.dtype(dtype)
    if key not in _DTYPES:
        raise ValueError(f"dtype: {key} has no Triton equivalent; expected one of "
                         f"{sorted(str(d) for d in _DTYPES)}")
    return _DTYPES[key]


def numpy_dtype(data_type: int | str) -> np.dtype:
    """``DataType`` enum value or name ("TYPE_FP32") -> numpy dtype."""
    value = mc.DataType.Value(data_type) if isinstance(data_type, str) else data_type
    if value not in _NUMPY_OF:
        raise ValueError(f"data_type: {mc.DataType.Name(value)} has no numpy equivalent")
    return _NUMPY_OF[value]


@dataclass(frozen=True)
class ModelTensor:
    """One input or output: dims exclude the batch dim when batching is on.

    ``reshape`` is the shape the model sees; Triton needs non-empty dims, so a
    per-sample scalar (e.g. a [batch] timestep) is ``dims=(1,), reshape=()``.
    """

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


def tensor(name: str, dtype: DTypeLike, dims: Sequence[int],
           reshape: Sequence[int] | None = None) -> ModelTensor:
    dims = tuple(int(d) for d in dims)
    if not dims or any(d < -1 or d == 0 for d in dims):
        raise ValueError(f"dims of {name!r}: {dims}; expected one or more positive sizes or -1 "
                         "(use dims=[1], reshape=[] for a per-sample scalar)")
    triton_dtype(dtype)  # validate early
    return ModelTensor(name, np.dtype(dtype), dims, None if reshape is None else tuple(reshape))


def python_model_config(
    name: str,
    inputs: Iterable[ModelTensor],
    outputs: Iterable[ModelTensor],
    *,
    backend: str = "python",
    max_batch_size: int = 0,
    instance_kind: InstanceKind = "cpu",
    gpus: Sequence[int] | None = None,
    count: int = 1,
    dynamic_batching: bool = False,
    max_queue_delay_us: int = 0,
    parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """A model run by the Python backend or a Python-based backend (e.g. the BLS)."""
    config = _base(name, inputs, outputs, max_batch_size)
    config.backend = backend
    config.instance_group.append(_instance_group(instance_kind, gpus, count))
    if dynamic_batching:
        _enable_dynamic_batching(config, max_queue_delay_us)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


def component_model_config(
    name: str,
    inputs: Iterable[ModelTensor],
    outputs: Iterable[ModelTensor],
    runtime: Runtime,
    artifact: str,
    max_batch_size: int,
    instance_kind: InstanceKind = "cpu",
    gpus: Sequence[int] | None = None,
    count: int = 1,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 0,
) -> mc.ModelConfig:
    """One network served by ``backends/asyncdiff_component/model.py``.

    Dynamic batching is only enabled when ``max_batch_size > 0``. A torch network on GPUs
    takes its inputs where they are (FORCE_CPU_ONLY_INPUT_TENSORS "no", read through DLPack);
    onnxruntime reads host arrays, so Triton keeps copying its inputs to the host.
    """
    if runtime not in ("onnxruntime", "torch"):
        raise ValueError(f"runtime: {runtime!r}; expected 'onnxruntime' or 'torch'")
    parameters = {"runtime": runtime, "artifact": artifact}
    if runtime == "torch" and instance_kind == "gpu":
        parameters[FORCE_CPU_ONLY] = "no"
    return python_model_config(
        name, inputs, outputs,
        backend=COMPONENT_BACKEND,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        gpus=gpus,
        count=count,
        dynamic_batching=dynamic_batching and max_batch_size > 0,
        max_queue_delay_us=max_queue_delay_us,
        parameters=parameters,
    )


def tensorrt_model_config(
    name: str,
    inputs: Iterable[ModelTensor],
    outputs: Iterable[ModelTensor],
    gpu: int,
    max_batch_size: int = 0,
    count: int = 1,
    dynamic_batching: bool = False,
    max_queue_delay_us: int = 0,
    plan_file: str = "model.plan",
    cuda_graphs: bool = False,
    profiles: int = 1,
) -> mc.ModelConfig:
    """A TensorRT engine pinned to one GPU (needs a server with the tensorrt backend).

    ``cuda_graphs``: the backend captures the engine's launches as CUDA graphs (static shapes).
    ``profiles``: optimization profiles in the engine (one per exported resolution); with
    more than one the instances list them all (unlisted, Triton uses profile 0 only) and the
    backend picks, per call, the one its input shapes fit.
    """
    if profiles < 1:
        raise ValueError(f"profiles: {profiles}; expected >= 1")
    config = _base(name, inputs, outputs, max_batch_size)
    config.platform = "tensorrt_plan"
    if cuda_graphs:
        config.optimization.cuda.graphs = True
    config.default_model_filename = plan_file
    config.instance_group.append(_instance_group("gpu", [gpu], count))
    if profiles > 1:
        config.instance_group[0].profile.extend(str(i) for i in range(profiles))
    if dynamic_batching:
        _enable_dynamic_batching(config, max_queue_delay_us)
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """config.pbtxt text -> ModelConfig; raises ``text_format.ParseError`` on bad text."""
    return text_format.Parse(text, mc.ModelConfig())


def write_model(
    repo_dir: str | Path,
    name: str,
    config: mc.ModelConfig,
    files: Mapping[str, FileSource] | None = None,
    version: int = 1,
) -> Path:
    """Write ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/<version>/<files>``.

    ``files`` maps a file name inside the version folder to a source path
    (copied) or to bytes (written). Returns the model folder.
    """
    if config.name != name:
        raise ValueError(f"config.name: {config.name!r}; expected the folder name {name!r}")
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config))
    for file_name, source in (files or {}).items():
        target = version_dir / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    return model_dir


def _base(name: str, inputs: Iterable[ModelTensor], outputs: Iterable[ModelTensor],
          max_batch_size: int) -> mc.ModelConfig:
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size: {max_batch_size}; expected >= 0")
    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    for spec in inputs:
        entry = config.input.add(name=spec.name, data_type=triton_dtype(spec.dtype), dims=spec.dims)
        _set_reshape(entry, spec)
    for spec in outputs:
        entry = config.output.add(name=spec.name, data_type=triton_dtype(spec.dtype), dims=spec.dims)
        _set_reshape(entry, spec)
    return config


def _set_reshape(entry: mc.ModelInput | mc.ModelOutput, spec: ModelTensor) -> None:
    if spec.reshape is not None:
        entry.reshape.SetInParent()  # an empty shape is meaningful: present but []
        entry.reshape.shape.extend(spec.reshape)


def _instance_group(kind: InstanceKind, gpus: Sequence[int] | None,
                    count: int) -> mc.ModelInstanceGroup:
    if kind not in _KINDS:
        raise ValueError(f"instance_kind: {kind!r}; expected 'cpu' or 'gpu'")
    if gpus and kind != "gpu":
        raise ValueError(f"gpus: {list(gpus)} given for instance_kind {kind!r}; expected 'gpu'")
    if count < 1:
        raise ValueError(f"count: {count}; expected >= 1")
    # Without an explicit gpus list Triton places `count` instances on EVERY
    # visible GPU, which breaks one-component-per-GPU pinning.
    return mc.ModelInstanceGroup(kind=_KINDS[kind], count=count, gpus=list(gpus or []))


def _enable_dynamic_batching(config: mc.ModelConfig, max_queue_delay_us: int) -> None:
    """Dynamic batching that waits ``max_queue_delay_us`` for company (default 0: the
    pipeline merges the requests' calls itself, and a lone call should not wait)."""
    if config.max_batch_size == 0:
        raise ValueError("dynamic_batching needs max_batch_size > 0")
    config.dynamic_batching.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
