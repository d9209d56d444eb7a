"""Triton Python-based backend: serve one ONNX or torch network.

A model selects it with ``backend: "asyncdiff_component"`` and two config
parameters: ``runtime`` ("onnxruntime" | "torch") and ``artifact`` (a file
in the model's version folder). Tensor names and dtypes come from the
config's input/output lists. Requests that the dynamic batcher hands over
together are run as one batch; a malformed request fails alone.

On a GPU instance (KIND_GPU) the runtime must have CUDA, or the model fails to
load: a silent CPU fallback would serve, slowly, from the wrong device. The
torch runtime on a GPU takes and returns GPU tensors through DLPack (its config
sets FORCE_CPU_ONLY_INPUT_TENSORS "no"); onnxruntime on CUDA reads and writes
host arrays and copies them to its device itself.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class InputError(ValueError):
    """A request's inputs do not match what the model expects."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.batching = config.get("max_batch_size", 0) > 0
        params = _parameters(config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.runner = _load_runner(self.name, params, version_dir, _device_id(args))
        self.io = self.runner.io
        self.inputs = _specs(config["input"], self.batching, self.runner.input_shapes)
        self.outputs = _specs(config["output"], self.batching, {})
        _check_subset("config inputs", self.inputs, "the artifact", self.runner.input_names)
        _check_subset("artifact inputs", self.runner.input_names, "the config", self.inputs)
        _check_subset("config outputs", self.outputs, "the artifact", self.runner.output_names)
        pb_utils.Logger.log_info(f"{self.name}: {self.runner.describe()}")

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # requests whose inputs can be stacked share a key
        for index, request in enumerate(requests):
            try:
                feeds = self._read_inputs(request)
            except InputError as exc:
                responses[index] = _error(f"{self.name}: {exc}")
                continue
            groups.setdefault(self._group_key(index, feeds), []).append((index, feeds))
        for members in groups.values():
            for index, response in self._run_group(members):
                responses[index] = response
        return responses

    def finalize(self):
        self.runner = None

    def _read_inputs(self, request):
        feeds = {spec.name: spec.read(request, self.io) for spec in self.inputs}
        if self.batching and len({a.shape[0] for a in feeds.values()}) > 1:
            sizes = {name: a.shape[0] for name, a in feeds.items()}
            raise InputError(f"inputs disagree on the batch size (dim 0): {sizes}")
        return feeds

    def _group_key(self, index, feeds):
        if not self.batching:
            return index  # nothing to stack along
        return tuple(a.shape[1:] for a in feeds.values())

    def _run_group(self, members):
        indices = [index for index, _ in members]
        try:
            outputs = self.runner.run(
                _stack([feeds for _, feeds in members], self.batching, self.io))
            parts = _split(outputs, [_batch_size(f, self.batching) for _, f in members], self.io)
        except Exception as exc:  # the runtime's message names the offending tensor
            message = f"{self.name}: {type(exc).__name__}: {exc}"
            return [(index, _error(message)) for index in indices]
        return [(index, self._response(part)) for index, part in zip(indices, parts)]

    def _response(self, arrays):
        tensors = [self.io.write(spec.name, arrays[spec.name], spec.dtype) for spec in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)


class _Spec:
    """A config input/output with the batch dim prepended when batching is on."""

    def __init__(self, entry, batching, runtime_shape):
        self.name = entry["name"]
        self.dtype = pb_utils.triton_string_to_numpy(entry["data_type"])
        self.dtype_name = np.dtype(self.dtype).name  # the same for numpy arrays and torch tensors
        # Triton hands the backend tensors in the `reshape` shape when one is set.
        shape = entry["reshape"].get("shape", []) if "reshape" in entry else entry["dims"]
        dims = ([-1] if batching else []) + [int(d) for d in shape]
        if runtime_shape and len(runtime_shape) != len(dims):
            raise ValueError(f"{self.name}: config gives {len(dims)} dims (batch included) "
                             f"but the artifact declares shape {list(runtime_shape)}")
        # Where the config says -1 but the artifact fixes a size, check that size too.
        self.dims = [r if d == -1 and r > 0 else d for d, r in zip(dims, runtime_shape or dims)]

    def read(self, request, io):
        tensor = pb_utils.get_input_tensor_by_name(request, self.name)
        if tensor is None:
            raise InputError(f"input {self.name!r} is missing")
        array = io.read(tensor)
        if io.dtype_name(array) != self.dtype_name:
            raise InputError(f"input {self.name!r} has dtype {array.dtype}; expected {self.dtype}")
        if len(array.shape) != len(self.dims) or any(
                d not in (-1, s) for d, s in zip(self.dims, array.shape)):
            raise InputError(f"input {self.name!r} has shape {list(array.shape)}; "
                             f"expected {self.dims} (-1 = any)")
        return array


class _HostIO:
    """numpy arrays in host memory: CPU instances, and onnxruntime on CUDA (which copies)."""

    @staticmethod
    def read(pb_tensor):
        return pb_tensor.as_numpy()

    @staticmethod
    def dtype_name(array):
        return array.dtype.name

    @staticmethod
    def concat(arrays):
        return np.concatenate(arrays)

    @staticmethod
    def split(value, sizes):
        return np.split(value, np.cumsum(sizes)[:-1])

    @staticmethod
    def write(name, value, dtype):
        return pb_utils.Tensor(name, np.ascontiguousarray(value, dtype))


class _DlpackIO:
    """torch tensors on the instance's GPU, exchanged with Triton through DLPack (no host copy)."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def read(self, pb_tensor):
        if pb_tensor.is_cpu():  # e.g. a host-side timestep: one small copy up
            return self.torch.from_numpy(_writable(pb_tensor.as_numpy())).to(self.device)
        return self.torch.from_dlpack(pb_tensor.to_dlpack()).to(self.device)  # no-op if already there

    @staticmethod
    def dtype_name(tensor):
        return str(tensor.dtype).removeprefix("torch.")

    def concat(self, tensors):
        return self.torch.cat(tensors)

    def split(self, value, sizes):
        return self.torch.split(value, sizes)

    def write(self, name, value, dtype):
        value = value.to(getattr(self.torch, np.dtype(dtype).name)).contiguous()
        return pb_utils.Tensor.from_dlpack(name, self.torch.utils.dlpack.to_dlpack(value))


class _OnnxRunner:
    io = _HostIO

    def __init__(self, name, path, device_id):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread each: several component stubs share a few cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device_id is not None:
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(
                    f"{name}: a GPU instance (device {device_id}), but onnxruntime {ort.__version__} "
                    f"here has no CUDAExecutionProvider (only {available}); install onnxruntime-gpu "
                    "in place of onnxruntime, or export without --gpus for CPU instances")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        if device_id is not None and "CUDAExecutionProvider" not in self.session.get_providers():
            # onnxruntime-gpu falls back to the CPU when its CUDA/cuDNN libraries do not load.
            raise RuntimeError(f"{name}: onnxruntime could not start CUDA on device {device_id} "
                               f"(session providers {self.session.get_providers()}); its log above "
                               "names the CUDA or cuDNN library it could not load")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: [d if isinstance(d, int) else -1 for d in i.shape]
                             for i in self.session.get_inputs()}

    def run(self, feeds):
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))

    def describe(self):
        return f"onnxruntime {self.session.get_providers()}"


class _TorchRunner:
    def __init__(self, name, version_dir, device_id):
        import torch
        from asyncdiff.components import load_component  # only the torch path needs it

        torch.set_num_threads(1)  # see _OnnxRunner: avoid oversubscribing cores
        self.torch = torch
        if device_id is not None and not torch.cuda.is_available():
            raise RuntimeError(
                f"{name}: a GPU instance (device {device_id}), but torch {torch.__version__} here "
                "has no CUDA (torch.cuda.is_available() is False); install a CUDA build of torch, "
                "or export without --gpus for CPU instances")
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.io = _HostIO if device_id is None else _DlpackIO(torch, self.device)
        self.module = load_component(version_dir, device=str(self.device)).eval()
        self.input_names = list(self.module.input_names)
        self.output_names = list(self.module.output_names)
        self.input_shapes = {}

    def run(self, feeds):
        if self.io is _HostIO:
            # from_numpy needs a writable array; Triton's input buffers are read-only.
            tensors = [self.torch.from_numpy(_writable(feeds[n])) for n in self.input_names]
        else:
            tensors = [feeds[n] for n in self.input_names]  # already on self.device
        with self.torch.inference_mode():
            values = self.module(*tensors)
        if self.io is _HostIO:
            return {n: v.detach().numpy() for n, v in zip(self.output_names, values)}
        # The outputs stay on the GPU and go to Triton through DLPack, which does not wait
        # for this stream's kernels: finish them before Triton reads the buffers.
        self.torch.cuda.current_stream(self.device).synchronize()
        return dict(zip(self.output_names, values))

    def describe(self):
        return f"torch on {self.device}"


def _load_runner(name, params, version_dir, device_id):
    """The runner of model ``name``; ``device_id`` None: the CPU, else that GPU (or an error)."""
    runtime, artifact = params.get("runtime"), params.get("artifact")
    if runtime not in ("onnxruntime", "torch"):
        raise ValueError(f"parameter 'runtime' is {runtime!r}; expected 'onnxruntime' or 'torch'")
    if not artifact:
        raise ValueError("parameter 'artifact' is missing; expected a file in the version folder")
    artifact = os.path.join(version_dir, artifact)
    if not os.path.exists(artifact):
        raise FileNotFoundError(f"parameter 'artifact': {artifact} does not exist")
    if runtime == "onnxruntime":
        return _OnnxRunner(name, artifact, device_id)
    return _TorchRunner(name, version_dir, device_id)


def _parameters(config):
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _device_id(args):
    if args.get("model_instance_kind") != "GPU":
        return None
    return int(args["model_instance_device_id"])


def _specs(entries, batching, runtime_shapes):
    return [_Spec(entry, batching, runtime_shapes.get(entry["name"])) for entry in entries]


def _check_subset(what, names, where, available):
    names, available = _names(names), _names(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"{what} {missing} are not in {where}, which has {available}")


def _names(items):
    return [getattr(item, "name", item) for item in items]


def _stack(feeds_list, batching, io):
    if not batching or len(feeds_list) == 1:  # one request: its arrays as they are
        return feeds_list[0]
    return {name: io.concat([feeds[name] for feeds in feeds_list]) for name in feeds_list[0]}


def _batch_size(feeds, batching):
    return next(iter(feeds.values())).shape[0] if batching else None


def _split(outputs, sizes, io):
    """Cut each output back into one slice per request, along dim 0."""
    if sizes == [None]:
        return [outputs]
    total = sum(sizes)
    for name, value in outputs.items():
        if value.shape[0] != total:
            raise ValueError(f"output {name!r} has batch {value.shape[0]}; expected {total}")
    if len(sizes) == 1:  # one request: the outputs as they are
        return [outputs]
    pieces = {name: io.split(value, sizes) for name, value in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(sizes))]


def _writable(array):
    return array if array.flags.writeable else array.copy()


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
