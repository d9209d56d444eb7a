"""Exported repositories load in a real tritonserver and serve what torch computes.

The server is the one inside the nvidia-pytriton wheel (serve.launcher). The
pipeline model's backend (``backends/asyncdiff_pipeline``) is written by the
serving work: until it exists only its config is checked, and the servers
load the other models explicitly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from google.protobuf import text_format

from asyncdiff.components import build_components
from asyncdiff.configs import load_unet, resolve
from asyncdiff.contract import (
    INPUTS, MODEL_NAME, NUMPY_DTYPES, PIPELINE_BACKEND, STREAM_MODEL_NAME, UNARY_BACKEND, TRITON_PARAMETERS, PipelineParams, Request,
)
from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from asyncdiff.stages import build_stage_graph
from asyncdiff.tiny import MODEL_DIR
from export import cli
from export import repository as repo_mod
from export import tensorrt as trt_mod
from export.onnx_export import FP32_TOL, Artifact, InterfaceSampler, IOSpec
from export.triton_config import parse_config, to_pbtxt, triton_dtype
from serve.launcher import PROJECT_BACKENDS, TritonServer
from tritonclient.grpc import model_config_pb2 as mc

torch.set_num_threads(1)
HAVE_TINY = (MODEL_DIR / "unet" / "config.json").exists()
HAVE_PIPELINE_BACKEND = (PROJECT_BACKENDS / PIPELINE_BACKEND / "model.py").is_file()
PIPELINE = (STREAM_MODEL_NAME, MODEL_NAME)  # the engine, then the unary model in front of it
# A UNet-only source (components but no text encoder/VAE): the tiny UNet folder exports fastest.
UNET_ONLY = str(MODEL_DIR / "unet") if HAVE_TINY else "sd15"
needs_tiny = pytest.mark.skipif(not HAVE_TINY, reason="asyncdiff/tiny/model is not there yet")

# (components, stride, extra CLI flags): the default path (with parity checks) once.
TINY_REPOS = {"N2-S1": (2, 1, []),
              "N2-S2": (2, 2, ["--no-validate", "--component-timeout-s", "30", "--steps", "12",
                               "--scheduler", "euler", "--negative-prompt", "blurry"])}


def export(out, *argv) -> int:
    return cli.main([*argv, "--out", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    if not HAVE_TINY:
        pytest.skip("asyncdiff/tiny/model is not there yet")
    repos = {}
    for key, (n, s, extra) in TINY_REPOS.items():
        out = tmp_path_factory.mktemp(f"repo-{key}")
        assert export(out, "--model", "tiny", "--components", str(n), "--stride", str(s),
                      *extra) == 0
        repos[key] = out
    return repos


def serve(repo, log_dir, models) -> TritonServer:
    args = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
    return TritonServer(repo, extra_args=args, log_file=log_dir / "server.log")


@needs_tiny
@pytest.mark.parametrize("key", list(TINY_REPOS))
def test_configs_round_trip(tiny_repos, key):
    configs = repo_mod.read_configs(tiny_repos[key])
    n, s, _ = TINY_REPOS[key]
    expected = {f"unet_part_{k}" for k in range(n)} | {"text_encoder", "vae_encoder", "vae_decoder",
                                                       "asyncdiff", "asyncdiff_stream"}
    assert set(configs) == expected
    for name, config in configs.items():
        text = (tiny_repos[key] / name / "config.pbtxt").read_text()
        assert parse_config(to_pbtxt(config)) == config
        assert text_format.MessageToString(config) == text  # written by the same printer
        assert config.name == name
    for k in range(n):
        part = configs[f"unet_part_{k}"]
        assert part.backend == "asyncdiff_component" and part.max_batch_size == 8
        assert part.HasField("dynamic_batching")
        assert part.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        want = 2 if (s == 2 and k == n - 1) else 1  # plain S=2: last component twice
        assert part.instance_group[0].count == want
        assert part.parameters["runtime"].string_value == "onnxruntime"


@needs_tiny
def test_pipeline_model_config_and_files(tiny_repos):
    repo = tiny_repos["N2-S2"]
    configs = repo_mod.read_configs(repo)
    unary, config = configs[MODEL_NAME], configs[STREAM_MODEL_NAME]
    assert unary.backend == UNARY_BACKEND and unary.max_batch_size == 0
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in unary.input}
    assert inputs == {**{f.name: (triton_dtype(NUMPY_DTYPES[f.dtype]), [1], not f.required)
                         for f in INPUTS}, "INIT_IMAGE": (mc.TYPE_UINT8, [-1, -1, 3], True)}
    outputs = {o.name: (mc.DataType.Name(o.data_type), list(o.dims)) for o in unary.output}
    # The contract's dims: [NUM_IMAGES, H, W, 3] and [NUM_IMAGES, C, h, w], any served size.
    assert outputs == {"IMAGE": ("TYPE_UINT8", [-1, -1, -1, 3]),
                       "LATENTS": ("TYPE_FP32", [-1, -1, -1, -1])}
    assert config.backend == PIPELINE_BACKEND and config.model_transaction_policy.decoupled
    params = repo_mod.pipeline_params(config)
    written = {k: v.string_value for k, v in config.parameters.items()}
    # Everything written is read back (config -> parameters -> config), nothing else is written.
    assert {k: v for k, v in written.items() if k not in TRITON_PARAMETERS} == params.to_parameters()
    assert set(written) - set(params.to_parameters()) == {"FORCE_CPU_ONLY_INPUT_TENSORS"}
    assert params == PipelineParams(
        component_models=("unet_part_0", "unet_part_1"), latent_shape=(4, 16, 16),
        image_shape=(16, 16, 3), vae_scaling_factor=params.vae_scaling_factor,
        resolutions=((16, 16),),  # the one size, (width, height)
        defaults=Request(negative_prompt="blurry", steps=12, scheduler="euler"),
        component_timeout_s=30.0,  # fp32 on the CPU: the contract's default dtypes and device
        max_batch_requests=4, max_queue_size=16,  # 8 rows: 4 requests x CFG (plain S=2: two lanes)
        max_batch_sizes={m: 8 for m in ("unet_part_0", "unet_part_1", "text_encoder",
                                        "vae_encoder", "vae_decoder")},
        img2img=True)  # the VAE encoder is served: INIT_IMAGE is an input
    version = repo / STREAM_MODEL_NAME / "1"
    part = Partition.load(version / params.partition_file)
    assert (part.num_components, part.stride) == (2, 2)
    assert (version / params.scheduler_config_file).is_file()
    assert {p.name for p in (version / params.tokenizer_dir).iterdir()} >= {"vocab.json", "merges.txt"}
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(version / params.tokenizer_dir)  # the BLS tokenises offline
    assert tok("a three").input_ids[0] == tok.bos_token_id


@pytest.fixture(scope="module")
def servers(tiny_repos, tmp_path_factory):
    """One real tritonserver per tiny repository, started on first use, with the network
    models loaded explicitly (the pipeline model is loaded by its own test)."""
    started: dict[str, TritonServer] = {}

    def get(key: str) -> TritonServer:
        if key not in started:
            repo = tiny_repos[key]
            networks = [m for m in sorted(repo_mod.read_configs(repo)) if m not in PIPELINE]
            started[key] = serve(repo, tmp_path_factory.mktemp(f"log-{key}"), networks).start()
        return started[key]

    yield get
    for server in started.values():
        server.stop()


@needs_tiny
@pytest.mark.parametrize("key", list(TINY_REPOS))
def test_repository_loads_in_real_triton(tiny_repos, servers, key):
    client = httpclient.InferenceServerClient(servers(key).http_url)
    networks = [m for m in sorted(repo_mod.read_configs(tiny_repos[key])) if m not in PIPELINE]
    assert {m: client.is_model_ready(m) for m in networks} == {m: True for m in networks}


@needs_tiny
def test_served_component_matches_torch(tiny_repos, servers):
    client = httpclient.InferenceServerClient(servers("N2-S1").http_url)
    check_served_component(client, tiny_repos["N2-S1"])


@needs_tiny
@pytest.mark.skipif(not HAVE_PIPELINE_BACKEND, reason="backends/asyncdiff_pipeline is not written yet")
@pytest.mark.parametrize("key", list(TINY_REPOS))
def test_pipeline_model_loads(servers, key):
    client = httpclient.InferenceServerClient(servers(key).http_url)
    for model in PIPELINE:  # the engine first: the unary model forwards to it
        client.load_model(model)
        assert client.is_model_ready(model)


@needs_tiny
@pytest.mark.skipif(not HAVE_PIPELINE_BACKEND, reason="backends/asyncdiff_pipeline is not written yet")
@pytest.mark.parametrize("key", list(TINY_REPOS))
def test_pipeline_generates_from_exported_repository(servers, key):
    client = httpclient.InferenceServerClient(servers(key).http_url, network_timeout=300)
    for model in PIPELINE:
        if not client.is_model_ready(model):
            client.load_model(model)
    prompt = httpclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a three"], dtype=object))
    steps = httpclient.InferInput("STEPS", [1], "INT32")
    # 4 steps: with S=2 the last round's main call and stride copy share timestep index 3, so
    # the same timestep tensor goes to unet_part_1 twice in one wave (they may be batched).
    steps.set_data_from_numpy(np.array([4], dtype=np.int32))
    result = client.infer(MODEL_NAME, [prompt, steps])
    assert result.as_numpy("IMAGE").shape == (1, 16, 16, 3)  # [NUM_IMAGES, H, W, 3]
    assert result.as_numpy("LATENTS").shape == (1, 4, 16, 16)


def check_served_component(client, repo) -> None:
    """unet_part_1 through Triton (onnxruntime in the stub) == the torch component."""
    part = Partition.load(repo / STREAM_MODEL_NAME / "1" / "partition.json")
    graph = build_stage_graph(load_unet(resolve("tiny")))
    component = build_components(graph, part)[1]
    sampler = InterfaceSampler(graph, part.latent_height, part.latent_width, seed=7)
    for batch in (2, 1):
        assert_served_equals_torch(client, "unet_part_1", component,
                                   sampler.inputs(component.input_names, batch))


def assert_served_equals_torch(client, model: str, component, tensors) -> None:
    inputs = []
    for name, t in zip(component.input_names, tensors):
        array = t.numpy()
        if array.ndim == 1:
            array = array.reshape(-1, 1)  # timestep: config dims [1], reshaped to [] for the model
        inputs.append(httpclient.InferInput(name, list(array.shape), "FP32"))
        inputs[-1].set_data_from_numpy(np.ascontiguousarray(array))
    result = client.infer(model, inputs)
    with torch.no_grad():
        expected = component(*tensors)
    for name, ref in zip(component.output_names, expected):
        err = float(np.abs(result.as_numpy(name) - ref.numpy()).max())
        assert err <= FP32_TOL, (model, name, tuple(ref.shape), err)


def test_torch_backend_repository_serves_component(tmp_path):
    """--backend torch (save_component/load_component in the stub), UNet-only built-in model."""
    from asyncdiff.partition import partition_unet

    repo = tmp_path / "repo"
    assert export(repo, "--model", "sd15", "--components", "2", "--backend", "torch") == 0
    configs = repo_mod.read_configs(repo)
    assert set(configs) == {"unet_part_0", "unet_part_1"}  # no pipeline parts without a pipeline
    assert configs["unet_part_0"].parameters["runtime"].string_value == "torch"
    unet = load_unet(resolve("sd15"))  # the same seeded random weights as the export
    graph = build_stage_graph(unet)
    part = partition_unet(unet, 2, model="sd15", batch=2)
    saved = json.loads((repo / "unet_part_0" / "1" / "component.json").read_text())["spec"]
    assert saved["stages"] == part.components[0].stages
    component = build_components(graph, part)[0]
    tensors = InterfaceSampler(graph, 16, 16, seed=3).inputs(component.input_names, 2)
    with serve(repo, tmp_path, ["unet_part_0"]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("unet_part_0")
        assert_served_equals_torch(client, "unet_part_0", component, tensors)


@pytest.mark.skipif(trt_mod.available(), reason="TensorRT is importable: the build test runs instead")
def test_tensorrt_backend_without_tensorrt_writes_configs_and_commands(tmp_path, capsys):
    out = tmp_path / "repo"
    argv = ["--model", UNET_ONLY, "--components", "2", "--stride", "2", "--backend", "tensorrt",
            "--no-validate"]
    assert export(out, *argv) == 0
    printed = capsys.readouterr().out
    assert "must be built on a GPU host" in printed and "trtexec" in printed
    configs = repo_mod.read_configs(out)
    for k, gpus in ((0, [0]), (1, [1, 2])):  # plain S=2: the last component also on GPU 2
        config = configs[f"unet_part_{k}"]
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        group = config.instance_group[0]
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == gpus
        assert (out / f"unet_part_{k}" / "1" / "model.onnx").is_file()
    script = (out / "build_engines.sh").read_text().splitlines()
    commands = [line for line in script if line.startswith("trtexec")]
    assert len(commands) == 2
    assert "--onnx=unet_part_0/1/model.onnx" in commands[0]
    assert "--saveEngine=unet_part_0/1/model.plan" in commands[0]
    assert "--minShapes=sample:1x4x16x16,timestep:1," in commands[0]
    assert not any("--fp16" in c for c in commands)  # an fp32 export: no FP16 builder flag
    assert "--maxShapes=sample:8x4x16x16" in commands[0]
    # Asked to build engines where TensorRT is missing: everything written, exit non-zero.
    assert export(out, *argv, "--overwrite", "--build-engines") == cli.EXIT_NO_TENSORRT


@pytest.mark.skipif(not trt_mod.available(), reason="TensorRT is not importable (CPU-only machine); "
                    "engines are built on a GPU host, see docs/export.md")
def test_tensorrt_engine_build(tmp_path):  # pragma: no cover - needs a GPU host
    out = tmp_path / "repo"
    assert export(out, "--model", "sd15", "--components", "2", "--backend", "tensorrt",
                  "--build-engines") == 0
    for k in range(2):
        assert (out / f"unet_part_{k}" / "1" / "model.plan").stat().st_size > 0


def test_models_placed_as_the_placement_says():
    place = Placement(2, 2, gpus=(4, 5, 6))
    assert [repo_mod.model_placement(m, place) for m in ("unet_part_0", "unet_part_1",
                                                         "text_encoder", "vae_decoder")] == [
        ((4,), 1), ((5, 6), 2), ((4,), 1), ((4,), 1)]  # text encoder / VAE beside the pipeline
    assert repo_mod.model_placement("unet_part_1", Placement(2, 2)) == ((), 2)  # 2 CPU instances
    spec = [IOSpec("sample", np.dtype(np.float32), (4, 8, 8))]
    trt = repo_mod.network_config("unet_part_1", spec, spec, "tensorrt", "onnxruntime", "model.onnx",
                                  8, (5, 6), 2)
    assert [(g.count, list(g.gpus)) for g in trt.instance_group] == [(1, [5, 6])]
    cpu = repo_mod.network_config("unet_part_1", spec, spec, "onnxruntime", "onnxruntime",
                                  "model.onnx", 8, (), 2)
    assert [(g.kind, g.count) for g in cpu.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]


@pytest.mark.parametrize("argv, message", [
    (["--components", "2", "--stride", "2", "--gpus", "0,1"],
     "N=2 S=2 needs 3 devices (plain stride 2 adds one device"),
    (["--components", "3", "--cuts", "mid"], "--components 3 disagrees with --cuts mid"),
    (["--components", "2", "--steps", "0"], "pipeline default: STEPS must be in [1, 1000], got 0"),
    (["--components", "2", "--scheduler", "pndm"], "pipeline default: SCHEDULER must be one of"),
    (["--components", "2", "--component-timeout-s", "0"], "--component-timeout-s must be > 0"),
])
def test_bad_options_fail_before_any_export(tmp_path, capsys, argv, message):
    out = tmp_path / "repo"
    assert export(out, "--model", "tiny", *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_no_progress_silences_the_loaders_bars_too(tmp_path, monkeypatch):
    """The "Loading weights" bars come from transformers' and diffusers' loaders, which draw
    them unless their switch is off: --no-progress turns both off before anything loads."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # on, and restored afterwards
        monkeypatch.setattr(lib, "_tqdm_active", True)
    assert export(tmp_path / "repo", "--model", "tiny", "--components", "2", "--steps", "0") == 2
    assert not diffusers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()


def test_served_dtypes_are_what_the_bls_sends_and_receives():
    def art(name, ins, outs):
        spec = lambda n, d: IOSpec(n, np.dtype(d), (1,))  # noqa: E731
        return Artifact(name, None, "onnxruntime", True, [spec(*i) for i in ins],
                        [spec(*o) for o in outs], 0.0)

    half = "float16"
    artifacts = [
        art("unet_part_0", [("sample", half), ("timestep", "float32"), ("encoder_hidden_states", half)],
            [("down1_0", half)]),
        art("unet_part_1", [("down1_0", half), ("timestep", "float32")], [("noise_pred", half)]),
        art("text_encoder", [("input_ids", "int64")], [("last_hidden_state", half)]),
        art("vae_decoder", [("latents", "float32")], [("image", "float32")]),
    ]
    part = Partition.__new__(Partition)
    part.components = [type("C", (), {"name": a.name})() for a in artifacts[:2]]
    assert cli.served_dtypes(part, artifacts) == {
        "sample": half, "timestep": "float32", "encoder_hidden_states": half, "noise_pred": half,
        "input_ids": "int64", "last_hidden_state": half, "latents": "float32", "image": "float32"}


@needs_tiny
def test_cuts_reproduce_a_given_split(tmp_path):
    out = tmp_path / "repo"
    assert export(out, "--model", str(MODEL_DIR / "unet"), "--cuts", "mid,up1_0",
                  "--backend", "torch", "--no-validate") == 0  # N = cuts + 1
    assert set(repo_mod.read_configs(out)) == {"unet_part_0", "unet_part_1", "unet_part_2"}
    first = [json.loads((out / f"unet_part_{k}" / "1" / "component.json").read_text())["spec"]
             ["stages"][0] for k in range(3)]
    assert first == ["conv_in", "mid", "up1_0"]


# Every N and both strides on the tiny model, and one SD 1.5-shaped split (the components of
# every other split are checked against torch by test_onnx.py; each load costs a server start).
@pytest.mark.parametrize("model, n, s", [("tiny", 1, 1), ("tiny", 2, 2), ("tiny", 3, 1),
                                         ("tiny", 4, 2), ("sd15", 3, 2)])
def test_every_component_count_and_stride_loads(model, n, s, tmp_path):
    """Repositories for N = 1..4 and S = 1, 2 load in a real tritonserver with every model READY
    (parity is checked by test_onnx.py, so these exports skip it)."""
    if model == "tiny" and not HAVE_TINY:
        pytest.skip("asyncdiff/tiny/model is not there yet")
    out = tmp_path / "repo"
    assert export(out, "--model", model, "--components", str(n), "--stride", str(s),
                  "--no-validate") == 0
    models = sorted(repo_mod.read_configs(out))
    assert {f"unet_part_{k}" for k in range(n)} <= set(models)
    with TritonServer(out, log_file=tmp_path / "server.log") as server:
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert {m: client.is_model_ready(m) for m in models} == {m: True for m in models}


def test_failed_export_removes_what_it_wrote(tmp_path, monkeypatch):
    """A failure after the models are written leaves no partial repository behind, and
    keeps what else was in the folder."""
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def disk_full(*args, **kwargs):
        assert (out / "unet_part_0" / "config.pbtxt").is_file()  # the models are there by now
        raise OSError("No space left on device")

    monkeypatch.setattr(cli.deployment, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(out, "--model", "tiny", "--components", "2", "--no-validate")
    assert repo_mod.our_models(out) == [] and [p.name for p in out.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    assert export(out, "--model", "tiny", "--components", "2", "--no-validate") == 0  # no --overwrite
