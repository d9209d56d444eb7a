"""TensorRT engines from the exported ONNX files (needs a GPU host with TensorRT 10).

Nothing here builds in CI: TensorRT cannot be installed on the CPU machines (its
PyPI wheels are placeholders that download from NVIDIA's index). The module
imports without TensorRT; ``available()`` says whether it can build.

* Shapes come from the ONNX graph's inputs (names and dims; the batch dim, dim 0,
  becomes the profile's min/opt/max). Spatial dims stay static: dynamic spatial
  shapes gave black images in TensorRT's own diffusion demo (NVIDIA/TensorRT#2943).
* The FP16 builder flag is set only for a network exported fp16 (a float16 tensor
  in its IO); the VAE kept fp32 under ``force_upcast`` and a text encoder kept
  fp32 are built fp32.
* A profile with one batch size (min = max) is fully static: its Triton config
  gets CUDA graphs.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORKSPACE_BYTES = 8 << 30


def available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Profile:
    """Shapes (batch first) of every input at the profile's min, opt and max batch."""

    shapes: dict[str, tuple[int, ...]]  # input name -> shape without the batch dim
    min_batch: int
    opt_batch: int
    max_batch: int

    def at(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {name: (batch, *dims) for name, dims in self.shapes.items()}

    @property
    def static(self) -> bool:
        """One shape per input: what CUDA graphs need."""
        return self.min_batch == self.max_batch


def graph_profile(onnx_path: str | Path, min_batch: int, opt_batch: int,
                  max_batch: int) -> Profile:
    """The profile of ``onnx_path``'s inputs, read from its graph (weights are not loaded)."""
    import onnx

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min <= opt <= max batch, got {min_batch}, {opt_batch}, "
                         f"{max_batch}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in weights:
            continue  # old exporters list initializers as inputs
        dims = value.type.tensor_type.shape.dim[1:]  # dim 0 is the batch
        if any(not d.HasField("dim_value") for d in dims):
            raise ValueError(f"{onnx_path}: input {value.name!r} has a dynamic non-batch dim "
                             f"({[d.dim_param or d.dim_value for d in dims]}); engines need "
                             "static spatial shapes")
        shapes[value.name] = tuple(d.dim_value for d in dims)
    return Profile(shapes, min_batch, opt_batch, max_batch)


def is_fp16(dtypes: Iterable[np.dtype]) -> bool:
    """A network exported fp16 has a float16 tensor in its IO (the dtypes its graph declares)."""
    return any(np.dtype(d) == np.float16 for d in dtypes)


def trtexec_command(onnx_path: str, plan_path: str, profile: Profile, fp16: bool) -> str:
    """The equivalent ``trtexec`` command line (for hosts without the Python API)."""

    def fmt(batch: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in profile.at(batch).items())

    args = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
        f"--minShapes={fmt(profile.min_batch)}", f"--optShapes={fmt(profile.opt_batch)}",
        f"--maxShapes={fmt(profile.max_batch)}", *(["--fp16"] if fp16 else []),
    ]
    return " ".join(shlex.quote(a) for a in args)


def build_engine(onnx_path: str | Path, plan_path: str | Path, profile: Profile, fp16: bool,
                 workspace: int = WORKSPACE_BYTES) -> Path:
    """Build an engine from ``onnx_path`` (fp16 kernels allowed when ``fp16``) into ``plan_path``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name in profile.shapes:
        opt.set_shape(name, profile.at(profile.min_batch)[name],
                      profile.at(profile.opt_batch)[name], profile.at(profile.max_batch)[name])
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)
