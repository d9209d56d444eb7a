"""TensorRT engines from the exported ONNX files (needs a GPU host with TensorRT 10).

Nothing here runs in CI: TensorRT cannot be installed on the CPU machines
(its PyPI wheels are placeholders that download from NVIDIA's index). The
module imports without TensorRT; ``available()`` says whether it can build.

Engines use the FP16 builder flag, one optimisation profile whose batch dim
spans ``[min, max]`` (opt = the export batch) and static spatial shapes:
dynamic spatial shapes gave black images in TensorRT's own diffusion demo
(NVIDIA/TensorRT#2943).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

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


def trtexec_command(onnx_path: str, plan_path: str, profile: Profile, fp16: bool = True) -> str:
    """The equivalent ``trtexec`` command line (for hosts without the Python API)."""

    def fmt(batch: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in profile.at(batch).items())

    args = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
        f"--minShapes={fmt(profile.min_batch)}", f"--optShapes={fmt(profile.opt_batch)}",
        f"--maxShapes={fmt(profile.max_batch)}",
    ]
    if fp16:
        args.append("--fp16")
    return " ".join(shlex.quote(a) for a in args)


class Engine:
    """Build, load and run one serialized TensorRT engine (``model.plan``)."""

    def __init__(self, plan_path: str | Path):
        import tensorrt as trt

        self.trt = trt
        self.plan_path = Path(plan_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = None
        self.context = None

    def build(self, onnx_path: str | Path, profile: Profile, fp16: bool = True,
              workspace: int = WORKSPACE_BYTES) -> Path:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
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
        self.plan_path.write_bytes(bytes(serialized))
        return self.plan_path

    def load(self) -> "Engine":
        runtime = self.trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        self.context = self.engine.create_execution_context()
        return self

    def __call__(self, feeds: dict, stream=None) -> dict:
        """Run on CUDA torch tensors keyed by input name; returns the outputs by name."""
        import torch

        if self.context is None:
            self.load()
        trt, engine, context = self.trt, self.engine, self.context
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = feeds[name].contiguous()
                feeds[name] = tensor  # keep the contiguous copy alive until the run ends
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = _TORCH_DTYPES[engine.get_tensor_dtype(name).name]
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
        stream = stream or torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.plan_path}")
        stream.synchronize()
        return outputs


def _torch_dtypes() -> dict:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    return {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32,
            "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


_TORCH_DTYPES = _torch_dtypes()
