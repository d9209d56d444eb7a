"""SD3 served end to end: tiny random SD3 pipelines (``tests/tiny_sd3.py``) are saved, exported
from their folders (onnxruntime) and served by real tritonservers through the same BLS as SD and
SDXL. N=1 with T5: LATENTS equal diffusers' ``StableDiffusion3Pipeline(...,
output_type="latent")`` with the same seed and the folder's defaults (flowmatch-euler, guidance
7.0), IMAGE its decoded image. N=2 without T5 (zeros in the T5 slot): LATENTS equal the
in-process ``AsyncDiffSD3Pipeline`` with the same cut. One server per repository: both hold
models of the same names (asyncdiff, unet_part_0, ...)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from asyncdiff.conditioning import SD3
from asyncdiff.contract import (
    FLOW_MATCH_EULER, INPUT_BY_NAME, MODEL_NAME, STREAM_MODEL_NAME, Request,
)
from asyncdiff.partition import Partition
from asyncdiff.pipeline import AsyncDiffPipeline
from export import cli
from export.repository import pipeline_params, read_configs
from tests.test_pipeline_sd3 import diffusers_latents
from tests.tiny_sd3 import build_tiny_sd3

STEPS = 4
PROMPT = "a red cube on a table"
GUIDANCE = 7.0  # StableDiffusion3Pipeline's default: the served default
OVER_T5 = " ".join(["jukebox"] * 40)  # 42 CLIP tokens (limit 77), 321 T5 tokens (limit 256)


@pytest.fixture(scope="module")
def pipes():
    return {"t5": build_tiny_sd3(), "no_t5": build_tiny_sd3(with_t5=False)}


@pytest.fixture(scope="module")
def repos(pipes, tmp_path_factory):
    """N=1 from the folder with T5, N=2 from the folder without (export's own parity checks
    off: tests/export covers them)."""
    root = tmp_path_factory.mktemp("sd3-serving")
    out = {}
    for name, components in (("t5", "1"), ("no_t5", "2")):
        pipes[name].save_pretrained(root / name)
        out[name] = root / f"repo-{name}"
        assert cli.main(["--model", str(root / name), "--out", str(out[name]), "--components",
                         components, "--no-progress", "--no-validate"]) == 0
    return out


@pytest.fixture(scope="module")
def servers(repos, tmp_path_factory):
    from serve.launcher import TritonServer

    logs = tmp_path_factory.mktemp("sd3-server")
    with TritonServer(repos["t5"], log_file=logs / "n1.log") as n1, \
            TritonServer(repos["no_t5"], log_file=logs / "n2.log") as n2:
        yield {"t5": n1, "no_t5": n2}


def infer(server, output="LATENTS", prompt=PROMPT, **values):
    """One output of one gRPC request to the unary model; values by input name."""
    inputs = []
    for name, value in {"PROMPT": prompt, **values}.items():
        field = INPUT_BY_NAME[name]
        inp = grpcclient.InferInput(name, [1], field.dtype)
        inp.set_data_from_numpy(field.encode(value))
        inputs.append(inp)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(MODEL_NAME, inputs,
                              outputs=[grpcclient.InferRequestedOutput(output)])
    return np.array(result.as_numpy(output))


def rel(a, b) -> float:
    value = ((a - b).abs().max() / b.abs().max()).item()
    print(f"relative difference {value:.2e}")
    return value


def test_repository_serves_the_sd3_pipeline(repos):
    for name, t5 in (("t5", True), ("no_t5", False)):
        configs = read_configs(repos[name])
        encoders = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if t5 else [])
        assert set(configs) == {MODEL_NAME, STREAM_MODEL_NAME, *encoders, "vae_decoder",
                                *(f"unet_part_{k}" for k in range(1 if t5 else 2))}
        params = pipeline_params(configs[STREAM_MODEL_NAME])
        assert (params.conditioning, params.t5, params.img2img) == (SD3, t5, False)
        assert (params.vae_scaling_factor, params.vae_shift_factor) == (1.5305, 0.0609)
        assert params.latent_shape == (16, 16, 16) and params.image_shape == (32, 32, 3)
        assert (params.defaults.scheduler, params.defaults.guidance_scale) == (FLOW_MATCH_EULER,
                                                                              GUIDANCE)
        assert (params.text_encoder.output, params.text_encoder_pooled) == (
            "penultimate_hidden_state", "text_embeds")
        version = repos[name] / STREAM_MODEL_NAME / "1"
        scheduler = json.loads((version / params.scheduler_config_file).read_text())
        assert (scheduler["_class_name"], scheduler["shift"]) == (
            "FlowMatchEulerDiscreteScheduler", 3.0)
        assert (version / params.tokenizer_3_dir / "tokenizer.json").is_file() == t5
        # Neither img2img nor SDXL's size inputs: Triton refuses them as unexpected.
        declared = {i.name for i in configs[MODEL_NAME].input}
        assert not declared & {"INIT_IMAGE", "ORIGINAL_SIZE", "CROPS_COORDS_TOP_LEFT"}
    t5_config = read_configs(repos["t5"])["text_encoder_3"]
    assert [(t.name, list(t.dims)) for t in t5_config.output] == [("last_hidden_state", [256, 32])]


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_served_latents_equal_diffusers(servers, pipes, negative):
    got = torch.from_numpy(infer(servers["t5"], NEGATIVE_PROMPT=negative, SEED=3, STEPS=STEPS))
    ref = diffusers_latents(pipes["t5"], Request(PROMPT, negative, seed=3, steps=STEPS,
                                                 guidance_scale=GUIDANCE))
    assert got.shape == ref.shape == (1, 16, 16, 16)
    assert rel(got, ref) <= 1e-4, rel(got, ref)


def test_served_image_equals_diffusers(servers, pipes):
    got = infer(servers["t5"], "IMAGE", SEED=5, STEPS=2)
    with torch.no_grad():
        ref = pipes["t5"](PROMPT, num_inference_steps=2, guidance_scale=GUIDANCE,
                          generator=torch.Generator().manual_seed(5), output_type="np").images
    ref = np.round(ref * 255).astype(np.uint8)
    assert got.shape == ref.shape == (1, 32, 32, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_served_two_components_without_t5_equal_in_process(servers, pipes, repos):
    params = pipeline_params(read_configs(repos["no_t5"])[STREAM_MODEL_NAME])
    part = Partition.load(repos["no_t5"] / STREAM_MODEL_NAME / "1" / params.partition_file)
    got = torch.from_numpy(infer(servers["no_t5"], NEGATIVE_PROMPT="blurry", SEED=4, STEPS=STEPS))
    req = Request(PROMPT, "blurry", seed=4, steps=STEPS, guidance_scale=GUIDANCE,
                  scheduler=FLOW_MATCH_EULER)
    ref = AsyncDiffPipeline(pipes["no_t5"], cuts=part.cuts).generate_latents(req)
    assert part.num_components == 2 and got.shape == ref.shape == (1, 16, 16, 16)
    assert rel(got, ref) <= 1e-4, rel(got, ref)


@pytest.mark.parametrize("values, message", [
    (dict(SCHEDULER="ddim"), r"SCHEDULER 'ddim' does not fit .*\['flowmatch-euler'\]"),
    (dict(PROMPT=OVER_T5), "PROMPT is 321 tokens including start/end; the limit is 256"),
])
def test_bad_requests_are_invalid_arguments(servers, values, message):
    """A scheduler other than flowmatch-euler, and a prompt over T5's 256 tokens (within
    CLIP's 77): refused, not truncated as diffusers does."""
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(servers["t5"], STEPS=2, **values)
    assert "INVALID_ARG" in str(err.value.status())


def test_unet_deployments_refuse_flowmatch_euler(tiny_server):
    with pytest.raises(InferenceServerException,
                       match=r"SCHEDULER 'flowmatch-euler' does not fit .*noise") as err:
        infer(tiny_server, STEPS=2, SCHEDULER=FLOW_MATCH_EULER)
    assert "INVALID_ARG" in str(err.value.status())


def test_img2img_is_refused_by_name_before_sending(servers, tmp_path, capsys):
    """SD3 serves no INIT_IMAGE: the client and the OpenAI edits route say so, instead of
    Triton's "unexpected inference input 'INIT_IMAGE'"."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from client.__main__ import main as client_main
    from serve.openai import Settings, create_app

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    url = servers["t5"].grpc_url
    assert client_main(["x", "--init-image", str(init), "--url", url, "--out", str(tmp_path / "o.png")]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: INIT_IMAGE: this deployment (sd3) serves no img2img, its model takes no init "
        "image; SD 1.x/2.x and SDXL exports serve it, SD3 and FLUX are text-to-image only")
    with TestClient(create_app(Settings(triton_url=url))) as http:
        answer = http.post("/v1/images/edits", data={"prompt": "x"},
                           files={"image": ("init.png", init.read_bytes(), "image/png")})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("image", "unsupported_value")
    assert "edits (img2img) are not served by this deployment (sd3)" in error["message"]
