"""Typed Triton model configs: fields, validation, and the pbtxt round trip."""

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import (
    component_model_config,
    numpy_dtype,
    parse_config,
    python_model_config,
    tensor,
    tensorrt_model_config,
    to_pbtxt,
    triton_dtype,
    write_model,
)

LATENT = tensor("sample", np.float32, [4, 64, 64])
TIMESTEP = tensor("timestep", np.int64, [1])
NOISE = tensor("noise_pred", "float16", [4, 64, 64])


def roundtrip(config: mc.ModelConfig) -> mc.ModelConfig:
    parsed = parse_config(to_pbtxt(config))
    assert parsed == config
    return parsed


def test_component_config_fields_survive_the_pbtxt_roundtrip():
    config = roundtrip(component_model_config(
        "unet_1", [LATENT, TIMESTEP], [NOISE], runtime="onnxruntime", artifact="model.onnx",
        max_batch_size=2, instance_kind="gpu", gpus=[1], max_queue_delay_us=500))
    assert config.backend == "asyncdiff_component"
    assert config.max_batch_size == 2
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("sample", mc.TYPE_FP32, [4, 64, 64]), ("timestep", mc.TYPE_INT64, [1])]
    assert config.output[0].data_type == mc.TYPE_FP16
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 1, [1])
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"runtime": "onnxruntime", "artifact": "model.onnx"}


def test_component_config_without_batching_has_no_dynamic_batcher():
    config = roundtrip(component_model_config(
        "vae", [LATENT], [NOISE], runtime="torch", artifact="model.pt", max_batch_size=0))
    assert not config.HasField("dynamic_batching")
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and not group.gpus


def test_tensorrt_config_is_pinned_to_one_gpu():
    config = roundtrip(tensorrt_model_config("unet_0", [LATENT], [NOISE], gpu=3, max_batch_size=1))
    assert config.platform == "tensorrt_plan" and not config.backend
    assert config.default_model_filename == "model.plan"
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 1, [3])
    assert not config.HasField("optimization")  # CUDA graphs only when asked (static shapes)
    graphs = roundtrip(tensorrt_model_config("unet_0", [LATENT], [NOISE], gpu=3, max_batch_size=1,
                                             cuda_graphs=True))
    assert graphs.optimization.cuda.graphs
    assert "optimization {\n  cuda {\n    graphs: true\n  }\n}" in to_pbtxt(graphs)


def test_torch_component_on_a_gpu_takes_gpu_inputs():
    """Only the torch runtime reads GPU tensors (DLPack); onnxruntime keeps host inputs."""
    def params(runtime, kind):
        config = roundtrip(component_model_config(
            "unet_part_0", [LATENT], [NOISE], runtime=runtime, artifact="x", max_batch_size=2,
            instance_kind=kind, gpus=[0] if kind == "gpu" else None))
        return {k: v.string_value for k, v in config.parameters.items()}

    assert params("torch", "gpu") == {"runtime": "torch", "artifact": "x",
                                      "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    assert params("torch", "cpu") == {"runtime": "torch", "artifact": "x"}
    assert params("onnxruntime", "gpu") == {"runtime": "onnxruntime", "artifact": "x"}


def test_python_model_config_for_the_bls_pipeline():
    config = roundtrip(python_model_config(
        "pipeline", [tensor("prompt", np.object_, [1])], [tensor("image", np.uint8, [-1, -1, 3])],
        parameters={"components": "unet_0,unet_1"}))
    assert config.backend == "python"
    assert config.input[0].data_type == mc.TYPE_STRING
    assert config.parameters["components"].string_value == "unet_0,unet_1"


def test_reshape_to_a_per_sample_scalar_survives_the_roundtrip():
    config = roundtrip(python_model_config(
        "unet_0", [tensor("timestep", np.float32, [1], reshape=[])], [NOISE], max_batch_size=2))
    (timestep,) = config.input
    assert list(timestep.dims) == [1]
    assert timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert not config.output[0].HasField("reshape")


def test_parse_config_reads_handwritten_pbtxt():
    config = parse_config("""
        name: "conv_onnx"
        backend: "python"
        max_batch_size: 8
        input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 16, 16 ] } ]
        output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
        dynamic_batching { max_queue_delay_microseconds: 1000 }
        instance_group [ { count: 1 kind: KIND_CPU } ]
    """)
    assert list(config.input[0].dims) == [3, 16, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "int32", "int64",
                                   "float16", "float32", "float64", "object"])
def test_dtype_mapping_is_a_bijection(dtype):
    value = triton_dtype(dtype)
    assert numpy_dtype(value) == np.dtype(dtype)
    assert numpy_dtype(mc.DataType.Name(value)) == np.dtype(dtype)


@pytest.mark.parametrize("build, field", [
    (lambda: triton_dtype(np.complex64), "dtype"),
    (lambda: tensor("x", np.float32, [0, 4]), "dims"),
    (lambda: tensor("x", np.float32, []), "dims"),
    (lambda: component_model_config("m", [LATENT], [NOISE], "tensorflow", "m.onnx", 1), "runtime"),
    (lambda: component_model_config("m", [LATENT], [NOISE], "torch", "m.pt", 1, gpus=[0]), "gpus"),
    (lambda: python_model_config("m", [LATENT], [NOISE], dynamic_batching=True), "max_batch_size"),
    (lambda: python_model_config("m", [LATENT], [NOISE], count=0), "count"),
])
def test_invalid_arguments_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_write_model_lays_out_a_repository(tmp_path):
    source = tmp_path / "exported.onnx"
    source.write_bytes(b"onnx bytes")
    config = component_model_config("unet_0", [LATENT], [NOISE], "onnxruntime", "model.onnx", 1)
    model_dir = write_model(tmp_path / "repo", "unet_0", config,
                            {"model.onnx": source, "meta/cut.json": b"{}"})
    assert model_dir == tmp_path / "repo" / "unet_0"
    assert parse_config((model_dir / "config.pbtxt").read_text()) == config
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"onnx bytes"
    assert (model_dir / "1" / "meta" / "cut.json").read_bytes() == b"{}"


def test_write_model_rejects_a_name_other_than_the_folder(tmp_path):
    config = component_model_config("unet_0", [LATENT], [NOISE], "onnxruntime", "model.onnx", 1)
    with pytest.raises(ValueError, match="config.name"):
        write_model(tmp_path, "unet_1", config)
