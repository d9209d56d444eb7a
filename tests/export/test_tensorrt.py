"""TensorRT export for GPU hosts, checked on the CPU: engine profiles, flags, configs, script.

TensorRT cannot be installed on this machine (its PyPI wheels download from NVIDIA's
index at install time), so no engine is built here: these tests cover what export
writes for ``--backend tensorrt --gpus ...``, which is everything a GPU host runs.
"""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from asyncdiff.contract import STREAM_MODEL_NAME
from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from export import cli
from export import repository as repo_mod
from export import tensorrt as trt_mod
from serve import deployment

GPUS = ["--gpus", "4,5"]


def export(out, *argv):
    assert cli.main(["--model", "tiny", "--components", "2", "--backend", "tensorrt",
                     "--no-validate", "--no-progress", "--out", str(out), *argv]) == 0
    return out


@pytest.fixture(scope="module")
def fp16_repo(tmp_path_factory):
    return export(tmp_path_factory.mktemp("trt-fp16"), "--fp16", *GPUS)


@pytest.fixture(scope="module")
def static_repo(tmp_path_factory):
    return export(tmp_path_factory.mktemp("trt-static"), "--max-batch", "2", *GPUS)


def script_commands(repo) -> dict[str, list[str]]:
    """build_engines.sh: model name -> trtexec arguments."""
    lines = [ln for ln in (repo / "build_engines.sh").read_text().splitlines()
             if ln.startswith("trtexec ")]
    commands = {}
    for line in lines:
        args = shlex.split(line)
        onnx_arg = next(a for a in args if a.startswith("--onnx="))
        commands[onnx_arg.split("=", 1)[1].split("/")[0]] = args
    return commands


def flag(args, name):
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_fp16_flag_only_for_networks_exported_fp16(fp16_repo):
    configs = repo_mod.read_configs(fp16_repo)
    commands = script_commands(fp16_repo)
    assert set(commands) == {"unet_part_0", "unet_part_1", "text_encoder", "vae_encoder",
                             "vae_decoder"}
    for name, args in commands.items():
        dtypes = {t.data_type for t in [*configs[name].input, *configs[name].output]}
        assert ("--fp16" in args) == (mc.TYPE_FP16 in dtypes), name
    assert "--fp16" in commands["unet_part_0"] and "--fp16" in commands["unet_part_1"]
    assert "--fp16" not in commands["vae_decoder"]  # kept fp32 (force_upcast)
    sample = next(t for t in configs["unet_part_0"].input if t.name == "sample")
    assert sample.data_type == mc.TYPE_FP16


def test_trtexec_shapes_are_the_onnx_graph_inputs(fp16_repo):
    for name, args in script_commands(fp16_repo).items():
        graph = onnx.load(str(fp16_repo / name / "1" / "model.onnx"), load_external_data=False).graph
        inputs = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
                  for v in graph.input]
        for which, batch in (("minShapes", 1), ("optShapes", 1 if name.startswith("vae_") else 2),
                             ("maxShapes", 8)):
            want = ",".join(f"{n}:{'x'.join(map(str, [batch, *dims]))}" for n, dims in inputs)
            assert flag(args, which) == want, (name, which)


def test_dynamic_batch_configs_are_pinned_and_have_no_cuda_graphs(fp16_repo):
    configs = repo_mod.read_configs(fp16_repo)
    for name, gpus in (("unet_part_0", [4]), ("unet_part_1", [5]), ("text_encoder", [4]),
                       ("vae_decoder", [4])):
        config = configs[name]
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
        assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
            (mc.ModelInstanceGroup.KIND_GPU, gpus)]
        assert not config.optimization.cuda.graphs  # several shapes: no single graph
    pipeline = repo_mod.pipeline_params(configs[STREAM_MODEL_NAME])
    assert pipeline.device == "cuda:4"  # the BLS beside component 0
    assert pipeline.dtypes["sample"] == "float16" and pipeline.dtypes["latents"] == "float32"
    assert configs[STREAM_MODEL_NAME].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    # Preferred memory per call, as the BLS derives it from these parameters: component 0's
    # outputs on component 1's GPU, the noise prediction and text/VAE outputs on the pipeline's.
    part = Partition.load(fp16_repo / STREAM_MODEL_NAME / "1" / "partition.json")
    place = Placement(part.num_components, part.stride, part.batched_stride, pipeline.gpus)
    assert pipeline.gpus == (4, 5)
    assert place.output_gpus(part.components) == (5, 4) and place.output_gpu() == 4


def test_static_plans_get_cuda_graphs(static_repo):
    configs = repo_mod.read_configs(static_repo)
    commands = script_commands(static_repo)
    for name, batch in (("unet_part_0", 2), ("unet_part_1", 2), ("text_encoder", 2),
                        ("vae_decoder", 1)):
        assert configs[name].optimization.cuda.graphs, name
        assert configs[name].max_batch_size == batch  # never more than the engine takes
        shapes = {flag(commands[name], w) for w in ("minShapes", "optShapes", "maxShapes")}
        assert len(shapes) == 1, (name, shapes)
        assert "--fp16" not in commands[name]  # an fp32 export


def test_deployment_records_the_cuda_pool_for_the_gpus_used(fp16_repo):
    info = json.loads((fp16_repo / deployment.FILE).read_text())
    assert info["gpus"] == [4, 5] and (info["batch"], info["max_batch"]) == (2, 8)
    part = Partition.load(fp16_repo / STREAM_MODEL_NAME / "1" / "partition.json")
    assert info["bytes_per_round"] == part.cross_bytes(2)  # fp16 interface tensors
    assert info["cuda_memory_pool_bytes"] == deployment.cuda_pool_bytes(
        part.cross_bytes(2), 2, 8)


def write_graph(path, inputs, initializers=()):
    nodes = [helper.make_node("Identity", [inputs[0].name], ["out"])]
    out = helper.make_tensor_value_info("out", inputs[0].type.tensor_type.elem_type, None)
    graph = helper.make_graph(nodes, "g", list(inputs), [out], initializer=list(initializers))
    onnx.save(helper.make_model(graph), path)
    return path


def test_graph_profile_replaces_the_batch_dim_and_skips_weights(tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    path = write_graph(tmp_path / "m.onnx", [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT16, ["batch", 4, 8, 8]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])], [weight])
    profile = trt_mod.graph_profile(path, 1, 2, 4)
    assert profile.shapes == {"sample": (4, 8, 8), "timestep": ()}
    assert not profile.static and trt_mod.graph_profile(path, 2, 2, 2).static
    command = trt_mod.trtexec_command("m.onnx", "m.plan", profile, fp16=False)
    assert "--maxShapes=sample:4x4x8x8,timestep:4" in command and "--fp16" not in command
    assert trt_mod.trtexec_command("m.onnx", "m.plan", profile, fp16=True).endswith(" --fp16")


def test_graph_profile_refuses_dynamic_spatial_dims_and_bad_batches(tmp_path):
    path = write_graph(tmp_path / "m.onnx", [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, "h", 8])])
    with pytest.raises(ValueError, match="input 'sample' has a dynamic non-batch dim"):
        trt_mod.graph_profile(path, 1, 2, 4)
    with pytest.raises(ValueError, match="need 1 <= min <= opt <= max batch, got 2, 1, 4"):
        trt_mod.graph_profile(path, 2, 1, 4)


def test_is_fp16_reads_the_io_dtypes():
    assert trt_mod.is_fp16([np.float32, np.float16])
    assert not trt_mod.is_fp16([np.float32, np.int64])


@pytest.mark.skipif(not trt_mod.available(), reason="TensorRT is not installable on this CPU "
                    "machine (its wheels download from NVIDIA's index); engines are built on a "
                    "GPU host: bash build_engines.sh")
def test_engines_build_from_the_script_profiles(fp16_repo):  # pragma: no cover - GPU host only
    for name in ("unet_part_0", "vae_decoder"):
        art = fp16_repo / name / "1"
        profile = trt_mod.graph_profile(art / "model.onnx", 1, 1, 2)
        assert trt_mod.build_engine(art / "model.onnx", art / "model.plan", profile,
                                    fp16=name != "vae_decoder").stat().st_size > 0
