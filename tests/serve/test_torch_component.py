"""A saved UNet component served with ``runtime: "torch"`` matches local torch.

Opt-in (ASYNCDIFF_SLOW_TESTS=1): the stub imports torch and diffusers, which
takes 10-30 s on the 2-core CI machine.
"""

import os

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from export.triton_config import component_model_config, tensor, write_model

pytestmark = pytest.mark.skipif(not os.environ.get("ASYNCDIFF_SLOW_TESTS"),
                                reason="slow: set ASYNCDIFF_SLOW_TESTS=1")


def triton_tensor(spec):
    # Triton needs non-empty dims: a [batch] tensor travels as [batch, 1].
    if len(spec.shape) == 1:
        return tensor(spec.name, spec.dtype, [1], reshape=[])
    return tensor(spec.name, spec.dtype, spec.shape[1:])


def test_torch_component_matches_local_torch(start_triton, small_unets, tmp_path):
    from asyncdiff.components import build_components, save_component
    from asyncdiff.configs import example_inputs
    from asyncdiff.partition import partition_unet

    unet = small_unets["sd21"]
    part = partition_unet(unet, 2, model="sd21")
    component, spec = build_components(unet, part)[0], part.components[0]
    config = component_model_config(
        spec.name, [triton_tensor(t) for t in spec.inputs], [triton_tensor(t) for t in spec.outputs],
        runtime="torch", artifact="component.json", max_batch_size=4)
    save_component(component, dict(unet.config), spec, write_model(tmp_path, spec.name, config) / "1")

    sample, timestep, text, _ = example_inputs(dict(unet.config), 2, 16, 16)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
    with torch.no_grad():
        expected = component.run(feeds)

    server = start_triton(tmp_path, startup_timeout=300)
    inputs = []
    for name, value in feeds.items():
        array = value.numpy().reshape(2, -1) if value.dim() == 1 else value.numpy()
        inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32"))
        inputs[-1].set_data_from_numpy(array)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(spec.name, inputs)
    for name, value in expected.items():
        assert np.max(np.abs(result.as_numpy(name) - value.numpy())) <= 1e-5, name
    server.stop()
