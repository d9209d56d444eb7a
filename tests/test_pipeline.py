import math

import numpy as np
import pytest
import torch

from asyncdiff.contract import Request
from asyncdiff.generation import make_scheduler
from asyncdiff.pipeline import AsyncDiffPipeline, token_ids


@pytest.fixture(scope="module")
def sd():
    from asyncdiff.tiny import load_pipeline

    return load_pipeline()


def test_sequential_equals_diffusers(sd):
    """One component and the diffusers pipeline give the same latents for the same noise."""
    req = Request("a handwritten digit 3", steps=8, guidance_scale=3.0, seed=5)
    ours = AsyncDiffPipeline(sd, components=1).generate_latents(req)
    sd.scheduler = make_scheduler("ddim", sd.scheduler.config)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    ref = sd(req.prompt, num_inference_steps=8, guidance_scale=3.0, output_type="latent",
             latents=noise * sd.scheduler.init_noise_sigma).images
    assert (ours - ref).abs().max().item() <= 1e-5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return 10 * math.log10(1 / mse) if mse else float("inf")


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmsolver++"])
def test_async_stays_closer_to_sequential_than_another_seed(sd, scheduler):
    req = Request("the number seven", steps=10, seed=1, scheduler=scheduler)
    sequential = AsyncDiffPipeline(sd, components=1)
    seq = sequential(req)
    other_seed = psnr(seq, sequential(Request(req.prompt, steps=10, seed=2, scheduler=scheduler)))
    for n, s in [(2, 1), (2, 2)]:
        pipe = AsyncDiffPipeline(sd, components=n, stride=s)
        w1, w3 = psnr(seq, pipe(req)), psnr(seq, pipe(Request(**{**req.__dict__, "warmup": 3})))
        assert other_seed + 5 < w1 < w3 < float("inf"), (n, s, other_seed, w1, w3)


def test_same_seed_same_image(sd):
    pipe = AsyncDiffPipeline(sd, components=2)
    req = Request("digit 4", steps=5, seed=9)
    a, b = pipe(req), pipe(req)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, pipe(Request("digit 4", steps=5, seed=10)))


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(prompt=""), "PROMPT"),
        (dict(steps=0), "STEPS"),
        (dict(steps=1001), "STEPS"),
        (dict(warmup=0), "WARMUP"),
        (dict(steps=5, warmup=5), "WARMUP"),
        (dict(guidance_scale=float("nan")), "GUIDANCE_SCALE"),
        (dict(guidance_scale=-1.0), "GUIDANCE_SCALE"),
        (dict(seed=-1), "SEED"),
        (dict(scheduler="pndm"), "SCHEDULER"),
    ],
)
def test_pipeline_rejects_a_bad_request_naming_the_field(sd, fields, name):
    req = Request(**{"prompt": "7", **fields})
    with pytest.raises(ValueError, match=name):
        AsyncDiffPipeline(sd, components=1).generation(req)


def test_overlong_prompt_is_rejected(sd):
    with pytest.raises(ValueError, match="PROMPT is .* tokens"):
        token_ids(sd.tokenizer, "seven " * 100)
    assert token_ids(sd.tokenizer, "seven").shape == (1, 77)
    with pytest.raises(ValueError, match="NEGATIVE_PROMPT is .* tokens"):
        AsyncDiffPipeline(sd, components=1).encode_text("seven", "seven " * 100)


def test_token_ids_pad_like_the_tokenizer(sd):
    """One tokenizer run, padded by hand, gives the tokenizer's own max_length padding."""
    for prompt in ("", "the number seven", "seven " * 75):
        want = sd.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert token_ids(sd.tokenizer, prompt).tolist() == [want]


def test_explicit_cuts_reach_the_partition(sd):
    balanced = AsyncDiffPipeline(sd, components=2).partition
    other = next(n for n in balanced.stage_names[1:] if n not in balanced.cuts)
    pipe = AsyncDiffPipeline(sd, cuts=[other])
    assert pipe.partition.num_components == 2 and pipe.partition.cuts == [other]
    assert pipe.partition.components[1].stages[0] == other
    assert pipe(Request("digit 4", steps=3, seed=9)).shape == (16, 16, 3)
