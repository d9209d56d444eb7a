"""backends/asyncdiff_component/model.py outside the server: how it loads a network.

The module is imported with the python backend's real ``triton_python_backend_utils``
from the nvidia-pytriton wheel (the pure-Python part that the stub extends), so the
functions under test are the ones the server runs. This machine has no GPU: a GPU
instance must fail to load with a message naming the model, the runtime and the fix.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from serve.launcher import PROJECT_BACKENDS, wheel_server_tree


@pytest.fixture(scope="module")
def backend():
    sys.path.insert(0, str(wheel_server_tree() / "backends" / "python"))
    try:
        spec = importlib.util.spec_from_file_location(
            "asyncdiff_component_model", PROJECT_BACKENDS / "asyncdiff_component" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


@pytest.fixture
def identity_onnx(tmp_path):
    """A one-node fp16 graph: what an exported component folder holds, at its smallest."""
    x = helper.make_tensor_value_info("sample", TensorProto.FLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT16, ["batch", 4])
    node = helper.make_node("Identity", ["sample"], ["noise_pred"])
    graph = helper.make_graph([node], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "model.onnx")
    return tmp_path


def onnx_params():
    return {"runtime": "onnxruntime", "artifact": "model.onnx"}


def test_cpu_instance_loads_and_runs_on_the_cpu(backend, identity_onnx):
    runner = backend._load_runner("unet_part_0", onnx_params(), str(identity_onnx), None)
    assert runner.describe() == "onnxruntime ['CPUExecutionProvider']"
    x = np.arange(8, dtype=np.float16).reshape(2, 4)
    assert np.array_equal(runner.run({"sample": x})["noise_pred"], x)
    assert runner.io is backend._HostIO  # numpy in, numpy out, as before GPU support


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has CUDA: the GPU instance would load")
def test_gpu_instance_without_onnxruntime_cuda_fails_to_load(backend, identity_onnx):
    with pytest.raises(RuntimeError) as info:
        backend._load_runner("unet_part_1", onnx_params(), str(identity_onnx), 1)
    message = str(info.value)
    assert message.startswith("unet_part_1: a GPU instance (device 1), but onnxruntime ")
    assert "has no CUDAExecutionProvider" in message and "install onnxruntime-gpu" in message


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this torch has CUDA: the GPU instance would load")
def test_gpu_instance_without_torch_cuda_fails_to_load(backend, tmp_path):
    (tmp_path / "component.json").write_text("{}")  # never read: the CUDA check comes first
    with pytest.raises(RuntimeError) as info:
        backend._load_runner("vae_decoder", {"runtime": "torch", "artifact": "component.json"},
                             str(tmp_path), 0)
    message = str(info.value)
    assert message.startswith(f"vae_decoder: a GPU instance (device 0), but torch {torch.__version__}")
    assert "install a CUDA build of torch" in message


def test_instance_kind_decides_the_device(backend):
    assert backend._device_id({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) is None
    assert backend._device_id({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == 3


def test_dlpack_io_stacks_and_splits_torch_tensors(backend):
    """The GPU path's tensor handling, run on CPU torch tensors (the ops are device-agnostic)."""
    io = backend._DlpackIO(torch, torch.device("cpu"))
    a, b = torch.zeros(2, 3, dtype=torch.float16), torch.ones(1, 3, dtype=torch.float16)
    stacked = backend._stack([{"h": a}, {"h": b}], True, io)
    assert stacked["h"].shape == (3, 3) and io.dtype_name(stacked["h"]) == "float16"
    parts = backend._split(stacked, [2, 1], io)
    assert torch.equal(parts[0]["h"], a) and torch.equal(parts[1]["h"], b)
    with pytest.raises(ValueError, match="output 'h' has batch 3; expected 4"):
        backend._split(stacked, [2, 2], io)


@pytest.fixture(scope="module")
def torch_component(tmp_path_factory):
    """unet_part_1 of the tiny UNet saved for the torch runtime, and example inputs."""
    from asyncdiff.components import build_components, save_component
    from asyncdiff.configs import load_unet, resolve
    from asyncdiff.partition import partition_unet
    from asyncdiff.stages import build_stage_graph
    from export.onnx_export import InterfaceSampler

    unet = load_unet(resolve("tiny"))
    part = partition_unet(unet, 2, model="tiny", batch=2)
    graph = build_stage_graph(unet)
    component = build_components(graph, part)[1]
    folder = tmp_path_factory.mktemp("torch-component")
    save_component(component, dict(unet.config), part.components[1], folder)
    inputs = InterfaceSampler(graph, part.latent_height, part.latent_width, seed=5).inputs(
        component.input_names, 2)
    return folder, dict(zip(component.input_names, inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_torch_gpu_runner_keeps_tensors_on_the_gpu(backend, torch_component):  # pragma: no cover
    folder, feeds = torch_component
    params = {"runtime": "torch", "artifact": "component.json"}
    cpu = backend._load_runner("unet_part_1", params, str(folder), None)
    gpu = backend._load_runner("unet_part_1", params, str(folder), 0)
    assert gpu.describe() == "torch on cuda:0" and isinstance(gpu.io, backend._DlpackIO)
    expected = cpu.run({n: t.numpy() for n, t in feeds.items()})
    outputs = gpu.run({n: t.cuda(0) for n, t in feeds.items()})
    for name, value in outputs.items():
        assert value.device == torch.device("cuda:0"), name
        # the DLPack round trip the backend hands Triton: same memory, same values
        again = torch.from_dlpack(torch.utils.dlpack.to_dlpack(value))
        assert again.data_ptr() == value.data_ptr()
        err = float((again.cpu() - torch.from_numpy(expected[name])).abs().max())
        assert err <= 1e-3, (name, err)  # cuDNN/TF32 kernels against the CPU's
