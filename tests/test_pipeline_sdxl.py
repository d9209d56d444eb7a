"""The in-process pipeline on a tiny random SDXL pipeline: N=1 equals diffusers'
``StableDiffusionXLPipeline(..., output_type="latent")``; N=2 runs the same conditioning."""

import pytest
import torch

from asyncdiff.conditioning import SDXL, SizeConditioning
from asyncdiff.contract import Request
from asyncdiff.pipeline import AsyncDiffPipeline
from tests.tiny_sdxl import build_tiny_sdxl

STEPS = 6


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl()


def diffusers_latents(xl, req: Request, sizes: SizeConditioning | None = None):
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(req.seed))
    kwargs = {} if sizes is None else dict(original_size=sizes.original_size,
                                           crops_coords_top_left=sizes.crops_coords_top_left,
                                           target_size=sizes.target_size)
    with torch.no_grad():
        return xl(req.prompt, negative_prompt=req.negative_prompt or None,
                  num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                  latents=noise, output_type="latent",  # diffusers scales by init_noise_sigma
                  **kwargs).images


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sequential_equals_diffusers_sdxl(xl, negative):
    req = Request("a red cube on a table", negative, seed=4, steps=STEPS, guidance_scale=5.0,
                  scheduler="euler")
    pipe = AsyncDiffPipeline(xl, components=1)
    assert pipe.kind == SDXL
    ours = pipe.generate_latents(req)
    ref = diffusers_latents(xl, req)
    assert ours.shape == ref.shape == (1, 4, 16, 16)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)


def test_size_conditioning_reaches_the_denoiser(xl):
    req = Request("a red cube", seed=2, steps=3, guidance_scale=5.0, scheduler="euler")
    sizes = SizeConditioning((1024, 1024), (32, 32), (64, 0))
    pipe = AsyncDiffPipeline(xl, components=1)
    ours = pipe.generate_latents(req, sizes=sizes)
    assert rel(ours, diffusers_latents(xl, req, sizes)) <= 1e-4
    assert rel(ours, pipe.generate_latents(req)) > 1e-3  # the time ids change the result


def test_two_components_stay_close_to_sequential(xl):
    req = Request("a red cube on a table", seed=4, steps=STEPS, guidance_scale=5.0,
                  scheduler="euler", warmup=2)
    seq = AsyncDiffPipeline(xl, components=1).generate_latents(req)
    two = AsyncDiffPipeline(xl, components=2).generate_latents(req)
    other_seed = AsyncDiffPipeline(xl, components=1).generate_latents(
        Request(req.prompt, seed=5, steps=STEPS, guidance_scale=5.0, scheduler="euler"))
    assert 0 < rel(two, seq) < rel(other_seed, seq) / 2, (rel(two, seq), rel(other_seed, seq))
