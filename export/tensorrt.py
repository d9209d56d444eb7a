"""TensorRT engines from the exported ONNX files (needs a GPU host with TensorRT 10).

Nothing here builds in CI: TensorRT cannot be installed on the CPU machines (its
PyPI wheels are placeholders that download from NVIDIA's index). The module
imports without TensorRT; ``available()`` says whether it can build.

* Shapes come from the ONNX graph's inputs (names and dims; the batch dim, dim 0,
  becomes the profile's min/opt/max). One resolution: spatial dims stay static
  (dynamic spatial shapes gave black images in TensorRT's own diffusion demo,
  NVIDIA/TensorRT#2943). Several (``export --resolutions``): the graph's spatial
  dims are dynamic and the engine gets one optimization profile per resolution,
  each pinning them to that resolution's exact size (only the batch ranges), so no
  profile spans a range of spatial shapes. trtexec (TensorRT 10) takes them as
  ``--profile=<i>`` followed by that profile's --minShapes/--optShapes/--maxShapes;
  the Triton config lists every profile in the instance group (else Triton uses
  profile 0 only).
* The FP16 builder flag is set only for a network exported fp16 (a float16 tensor
  in its IO); the VAE kept fp32 under ``force_upcast`` and a text encoder kept
  fp32 are built fp32.
* A profile with one batch size (min = max) is fully static: its Triton config
  gets CUDA graphs.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
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
    return graph_profiles(onnx_path, min_batch, opt_batch, max_batch)[0]


def graph_profiles(onnx_path: str | Path, min_batch: int, opt_batch: int, max_batch: int,
                   sizes: Sequence[Mapping[str, Sequence[int]]] = ()) -> list[Profile]:
    """One profile per entry of ``sizes`` (input name -> shape without the batch dim, one
    mapping per exported resolution; they fill the graph's dynamic dims), or without
    ``sizes`` the single profile of a graph whose only dynamic dim is the batch."""
    import onnx

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min <= opt <= max batch, got {min_batch}, {opt_batch}, "
                         f"{max_batch}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    declared = {}  # input name -> dims without the batch (None where dynamic)
    for value in graph.input:
        if value.name in weights:
            continue  # old exporters list initializers as inputs
        dims = value.type.tensor_type.shape.dim[1:]  # dim 0 is the batch
        declared[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                     for d in dims)
    if not sizes:
        for name, dims in declared.items():
            if None in dims:
                raise ValueError(f"{onnx_path}: input {name!r} has a dynamic non-batch dim "
                                 f"({list(dims)}); give one shape per resolution (sizes) or "
                                 "export with static spatial shapes")
        return [Profile(dict(declared), min_batch, opt_batch, max_batch)]
    return [Profile(_fill(onnx_path, declared, given), min_batch, opt_batch, max_batch)
            for given in sizes]


def _fill(onnx_path, declared: Mapping[str, tuple], given: Mapping[str, Sequence[int]]
          ) -> dict[str, tuple[int, ...]]:
    """The graph's input dims with the dynamic ones taken from ``given`` (checked against the
    static ones)."""
    shapes = {}
    for name, dims in declared.items():
        if name not in given:
            raise ValueError(f"{onnx_path}: no shape given for input {name!r}")
        shape = tuple(int(d) for d in given[name])
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise ValueError(f"{onnx_path}: input {name!r} declares {list(dims)} (None = "
                             f"dynamic) but the profile gives {list(shape)}")
        shapes[name] = shape
    return shapes


def is_fp16(dtypes: Iterable[np.dtype]) -> bool:
    """A network exported fp16 has a float16 tensor in its IO (the dtypes its graph declares)."""
    return any(np.dtype(d) == np.float16 for d in dtypes)


def trtexec_command(onnx_path: str, plan_path: str, profile: Profile | Sequence[Profile],
                    fp16: bool) -> str:
    """The equivalent ``trtexec`` command line (for hosts without the Python API). Several
    profiles: ``--profile=<i>`` before each one's shapes (trtexec 10 reads them in order)."""
    profiles = [profile] if isinstance(profile, Profile) else list(profile)
    if not profiles:
        raise ValueError("trtexec_command needs at least one profile")

    def shapes(p: Profile) -> list[str]:
        def fmt(batch: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in p.at(batch).items())

        return [f"--minShapes={fmt(p.min_batch)}", f"--optShapes={fmt(p.opt_batch)}",
                f"--maxShapes={fmt(p.max_batch)}"]

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    if len(profiles) == 1:
        args += shapes(profiles[0])
    else:
        for i, p in enumerate(profiles):
            args += [f"--profile={i}", *shapes(p)]
    args += ["--fp16"] if fp16 else []
    return " ".join(shlex.quote(a) for a in args)


def build_engine(onnx_path: str | Path, plan_path: str | Path,
                 profile: Profile | Sequence[Profile], fp16: bool,
                 workspace: int = WORKSPACE_BYTES) -> Path:
    """Build an engine from ``onnx_path`` (fp16 kernels allowed when ``fp16``) into
    ``plan_path``, with one optimization profile per ``profile`` given (in order)."""
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
    for p in [profile] if isinstance(profile, Profile) else profile:
        opt = builder.create_optimization_profile()
        for name in p.shapes:
            opt.set_shape(name, p.at(p.min_batch)[name], p.at(p.opt_batch)[name],
                          p.at(p.max_batch)[name])
        config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)
