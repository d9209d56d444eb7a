"""FLUX served end to end: the tiny random FLUX.1-dev-like pipeline (``tests/tiny_flux.py``,
guidance embedding) saved, exported whole from its folder (onnxruntime) and served by a real
tritonserver through the same BLS as SD, SDXL and SD3.

N=1 (``tiny_flux_repo``): LATENTS equal diffusers' ``FluxPipeline(..., output_type="latent")``
with the same seed and the served defaults (flowmatch-euler with the folder's dynamic shift,
guidance 3.5), IMAGE its decoded image; GUIDANCE_SCALE reaches the guidance embedding;
NUM_IMAGES 2 gives each seed's single image; what FLUX does not take is refused, named.
One server (N=1) to keep CI cheap: N>1 runs the same ``Generation`` as the in-process
pipeline, whose N=2 is tested in tests/test_pipeline_flux.py, and the BLS's N=2 path is
tested on SD / SD3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from asyncdiff.conditioning import FLUX
from asyncdiff.contract import FLOW_MATCH_EULER, MODEL_NAME, STREAM_MODEL_NAME, Request
from export.repository import pipeline_params, read_configs
from tests.backends.test_sd3_serving import infer, rel
from tests.test_pipeline_flux import diffusers_latents

STEPS = 4
PROMPT = "a red cube on a table"
GUIDANCE = 3.5  # FluxPipeline's default: the served default


@pytest.fixture(scope="module")
def server(tiny_flux_repo, tmp_path_factory):
    from serve.launcher import TritonServer

    log = tmp_path_factory.mktemp("flux-server") / "server.log"
    with TritonServer(tiny_flux_repo, log_file=log) as server:
        yield server


def test_repository_serves_the_flux_pipeline(tiny_flux_repo):
    configs = read_configs(tiny_flux_repo)
    assert set(configs) == {MODEL_NAME, STREAM_MODEL_NAME, "text_encoder", "text_encoder_2",
                            "vae_decoder", "unet_part_0"}
    params = pipeline_params(configs[STREAM_MODEL_NAME])
    assert (params.conditioning, params.t5, params.img2img) == (FLUX, False, False)
    assert (params.vae_scaling_factor, params.vae_shift_factor) == (0.3611, 0.1159)
    assert params.latent_shape == (16, 16, 16) and params.image_shape == (32, 32, 3)
    assert (params.defaults.scheduler, params.defaults.guidance_scale) == (FLOW_MATCH_EULER,
                                                                          GUIDANCE)
    assert (params.text_encoder.output, params.text_encoder_2.output) == (
        "text_embeds", "last_hidden_state")
    version = tiny_flux_repo / STREAM_MODEL_NAME / "1"
    scheduler = json.loads((version / params.scheduler_config_file).read_text())
    assert (scheduler["use_dynamic_shifting"], scheduler["max_shift"]) == (True, 1.15)
    assert (version / params.tokenizer_2_dir / "tokenizer.json").is_file()
    declared = {i.name for i in configs[MODEL_NAME].input}
    assert not declared & {"INIT_IMAGE", "ORIGINAL_SIZE", "CROPS_COORDS_TOP_LEFT"}


def test_served_latents_equal_diffusers(server, tiny_flux):
    """The served defaults (guidance 3.5, flowmatch-euler with mu from 64 image tokens)."""
    got = torch.from_numpy(infer(server, SEED=3, STEPS=STEPS))
    ref = diffusers_latents(tiny_flux, Request(PROMPT, seed=3, steps=STEPS,
                                               guidance_scale=GUIDANCE))
    assert got.shape == ref.shape == (1, 16, 16, 16)
    assert rel(got, ref) <= 1e-4, rel(got, ref)
    # GUIDANCE_SCALE goes to the guidance embedding: another scale, other latents (as diffusers)
    other = torch.from_numpy(infer(server, SEED=3, STEPS=STEPS, GUIDANCE_SCALE=6.0))
    ref6 = diffusers_latents(tiny_flux, Request(PROMPT, seed=3, steps=STEPS, guidance_scale=6.0))
    assert rel(other, ref6) <= 1e-4 and rel(other, got) > 1e-3, (rel(other, ref6),
                                                                  rel(other, got))


def test_served_image_equals_diffusers(server, tiny_flux):
    got = infer(server, "IMAGE", SEED=5, STEPS=2)
    with torch.no_grad():
        ref = tiny_flux(PROMPT, num_inference_steps=2, guidance_scale=GUIDANCE, height=32,
                        width=32, generator=torch.Generator().manual_seed(5),
                        output_type="np").images
    ref = np.round(ref * 255).astype(np.uint8)
    assert got.shape == ref.shape == (1, 32, 32, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_num_images_are_the_single_requests(server):
    """NUM_IMAGES 2: one row per image in every component call, seeds SEED and SEED+1."""
    pair = torch.from_numpy(infer(server, SEED=3, STEPS=STEPS, NUM_IMAGES=2))
    alone = [torch.from_numpy(infer(server, SEED=s, STEPS=STEPS)) for s in (3, 4)]
    assert pair.shape == (2, 16, 16, 16)
    for k, one in enumerate(alone):
        assert rel(pair[k:k + 1], one) <= 1e-5, (k, rel(pair[k:k + 1], one))


@pytest.mark.parametrize("values, message", [
    (dict(NEGATIVE_PROMPT="blurry"), "NEGATIVE_PROMPT must be empty: FLUX runs without"),
    (dict(SCHEDULER="ddim"), r"SCHEDULER 'ddim' does not fit .*\['flowmatch-euler'\]"),
])
def test_what_flux_does_not_take_is_an_invalid_argument(server, values, message):
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(server, STEPS=2, **values)
    assert "INVALID_ARG" in str(err.value.status())
