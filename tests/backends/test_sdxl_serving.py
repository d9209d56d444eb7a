"""SDXL served end to end: a tiny random SDXL pipeline is saved, exported from its folder
(onnxruntime) and served by a real tritonserver; the ``asyncdiff`` model's latents equal
diffusers' ``StableDiffusionXLPipeline(..., output_type="latent")`` with the same seed and the
folder's default scheduler (Euler) and guidance (5.0), size conditioning included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from asyncdiff.conditioning import SizeConditioning
from asyncdiff.contract import (
    CROPS_COORDS_TOP_LEFT, INIT_IMAGE, INPUT_BY_NAME, MODEL_NAME, ORIGINAL_SIZE, STREAM_MODEL_NAME,
    Request,
)
from asyncdiff.partition import Partition
from asyncdiff.pipeline import AsyncDiffPipeline
from export import cli
from export.repository import our_models, pipeline_params, read_configs
from tests.test_pipeline_sdxl import diffusers_latents

STEPS = 5
PROMPT = "a red cube on a table"
SIZES = {f.name: f for f in (ORIGINAL_SIZE, CROPS_COORDS_TOP_LEFT, INIT_IMAGE)}  # not scalars


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    return tiny_sdxl


@pytest.fixture(scope="module")
def folder(tiny_sdxl_folder):
    return tiny_sdxl_folder


def export(folder, out, *args):
    assert cli.main(["--model", str(folder), "--out", str(out), "--no-progress", "--no-validate",
                     *args]) == 0
    return out


def serve(repo, log_dir):
    from serve.launcher import TritonServer

    return TritonServer(repo, log_file=log_dir / "server.log")


@pytest.fixture(scope="module")
def repo(folder, tmp_path_factory):
    return export(folder, tmp_path_factory.mktemp("sdxl-n1"), "--components", "1")


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with serve(repo, tmp_path_factory.mktemp("sdxl-server")) as server:
        yield server


def infer(server, prompt=PROMPT, **values):
    """LATENTS of one gRPC request to the unary model; values by input name (sizes as pairs)."""
    inputs = []
    for name, value in {"PROMPT": prompt, **values}.items():
        field = SIZES.get(name) or INPUT_BY_NAME[name]
        arr = np.asarray(value, field.numpy_dtype) if name in SIZES else field.encode(value)
        inp = grpcclient.InferInput(name, list(arr.shape), field.dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(MODEL_NAME, inputs,
                              outputs=[grpcclient.InferRequestedOutput("LATENTS")])
    return torch.from_numpy(np.array(result.as_numpy("LATENTS")))  # [1, C, h, w]


def rel(a, b) -> float:
    """Max abs difference relative to the reference's max abs (printed: pytest -s shows it)."""
    value = ((a - b).abs().max() / b.abs().max()).item()
    print(f"relative difference {value:.2e}")
    return value


def test_both_pipeline_models_take_the_size_inputs(repo):
    configs = read_configs(repo)
    for model in (MODEL_NAME, STREAM_MODEL_NAME):
        declared = {i.name: (list(i.dims), i.optional) for i in configs[model].input}
        assert declared["ORIGINAL_SIZE"] == declared["CROPS_COORDS_TOP_LEFT"] == ([2], True)
    assert {"text_encoder", "text_encoder_2"} <= set(configs)
    assert "text_encoder_2" in {p.name for p in our_models(repo)}  # a re-export clears it


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_served_latents_equal_diffusers(server, xl, negative):
    # The folder's defaults (Euler, guidance 5.0) are served: the request leaves them out.
    got = infer(server, NEGATIVE_PROMPT=negative, SEED=3, STEPS=STEPS)
    ref = diffusers_latents(xl, Request(PROMPT, negative, seed=3, steps=STEPS, guidance_scale=5.0))
    assert got.shape == ref.shape == (1, 4, 16, 16)
    assert rel(got, ref) <= 1e-4, rel(got, ref)


def test_served_img2img_equals_diffusers(server, xl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tests.test_img2img import diffusers_img2img, rgb_image

    image = rgb_image(32, 32)
    got = infer(server, SEED=4, STEPS=6, STRENGTH=0.5, INIT_IMAGE=image)
    req = Request(PROMPT, seed=4, steps=6, guidance_scale=5.0, strength=0.5, scheduler="euler")
    ref = diffusers_img2img(StableDiffusionXLImg2ImgPipeline, xl, req, image)
    assert got.shape == ref.shape == (1, 4, 16, 16)
    assert rel(got, ref) <= 1e-4, rel(got, ref)


def test_size_inputs_reach_the_denoiser(server, xl):
    got = infer(server, SEED=2, STEPS=3, ORIGINAL_SIZE=[1024, 768], CROPS_COORDS_TOP_LEFT=[64, 0])
    sizes = SizeConditioning((1024, 768), (32, 32), (64, 0))
    req = Request(PROMPT, seed=2, steps=3, guidance_scale=5.0)
    assert rel(got, diffusers_latents(xl, req, sizes)) <= 1e-4
    assert rel(got, diffusers_latents(xl, req)) > 1e-3  # the time ids changed the result


def test_concurrent_requests_are_batched_and_keep_their_conditioning(server, xl):
    """Three requests in flight at once: their calls merge (text states, pooled embeddings and
    time ids concatenated by rows), and each still equals diffusers."""
    sizes = SizeConditioning((512, 512), (32, 32), (16, 8))
    cases = [  # (prompt, negative, seed, size conditioning)
        (PROMPT, "", 5, None), ("a blue ball", "blurry", 6, None), (PROMPT, "", 7, sizes)]

    def served(case):
        prompt, negative, seed, size = case
        extra = {} if size is None else dict(ORIGINAL_SIZE=size.original_size,
                                              CROPS_COORDS_TOP_LEFT=size.crops_coords_top_left)
        return infer(server, prompt, NEGATIVE_PROMPT=negative, SEED=seed, STEPS=STEPS, **extra)

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = client.get_inference_statistics(model_name="unet_part_0").model_stats[0]
        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(served, cases))
        after = client.get_inference_statistics(model_name="unet_part_0").model_stats[0]
    rows = after.inference_count - before.inference_count
    execs = after.execution_count - before.execution_count
    assert rows == 2 * len(cases) * STEPS and rows / execs > 2.5, (rows, execs)
    for latents, (prompt, negative, seed, size) in zip(got, cases):
        req = Request(prompt, negative, seed=seed, steps=STEPS, guidance_scale=5.0)
        assert rel(latents, diffusers_latents(xl, req, size)) <= 1e-4


@pytest.mark.parametrize("values, message", [
    (dict(ORIGINAL_SIZE=[0, 32]), r"ORIGINAL_SIZE must be two integers in \[1, 16384\]"),
    (dict(CROPS_COORDS_TOP_LEFT=[1, 2, 3]), "CROPS_COORDS_TOP_LEFT"),
])
def test_bad_size_inputs_are_invalid_arguments(server, values, message):
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(server, STEPS=2, **values)
    assert "INVALID_ARG" in str(err.value.status())


# One split, the paper's SDXL one (each costs an export and a server start; sequential splits
# are served by every SD test).
@pytest.mark.parametrize("components, layout", [(3, "outer-ring")])
def test_served_split_equals_the_in_process_runner(folder, xl, tmp_path, components, layout):
    """The paper's SDXL split: the last component holds conv_in and the first stages too; in
    warm-up it runs its front before component 0 (on placeholders for its back)."""
    repo = export(folder, tmp_path / "split", "--components", str(components), "--layout", layout)
    params = pipeline_params(read_configs(repo)[STREAM_MODEL_NAME])
    part = Partition.load(repo / STREAM_MODEL_NAME / "1" / params.partition_file)
    assert part.layout == layout.replace("-", "_")
    req = Request(PROMPT, "blurry", seed=4, steps=STEPS, guidance_scale=5.0, warmup=2,
                  scheduler="euler")  # the served default, the folder's
    with serve(repo, tmp_path) as split:
        got = infer(split, NEGATIVE_PROMPT="blurry", SEED=4, STEPS=STEPS, WARMUP=2)
    ref = AsyncDiffPipeline(xl, components=components, layout=layout,
                            cuts=part.cuts).generate_latents(req)
    assert rel(got, ref) <= 1e-4, rel(got, ref)
