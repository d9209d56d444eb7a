"""img2img and per-request sizes in the core (asyncdiff.img2img, Generation, AsyncDiffPipeline):
at N=1 the latents equal diffusers' own StableDiffusionImg2ImgPipeline /
StableDiffusionXLImg2ImgPipeline (and StableDiffusionPipeline at another size) with the same
seeds; NUM_IMAGES rows equal each image alone; N=2 stays close; bad requests are refused with
the input's name; the exported vae_encoder equals the torch one."""

import dataclasses

import numpy as np
import pytest
import torch

from asyncdiff.contract import VAE_ENCODER, Request
from asyncdiff.generation import make_scheduler
from asyncdiff.img2img import encode_moments, preprocess, steps_to_run
from asyncdiff.pipeline import AsyncDiffPipeline

PROMPT = "a handwritten digit 3"


@pytest.fixture(scope="module")
def sd():
    from diffusers import DiffusionPipeline

    from asyncdiff.tiny import MODEL_DIR

    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(sd):
    return AsyncDiffPipeline(sd, components=1)


def grey_image(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 [size, size, 3] grey image (the tiny model's VAE takes one channel)."""
    grey = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def rgb_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_diffusers_image(image: np.ndarray, channels: int) -> torch.Tensor:
    """The same image as diffusers takes it: float [1, C, H, W] in [0, 1]."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    return x[:, :1] if channels == 1 else x


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_img2img(pipe_cls, base, req: Request, image: np.ndarray, seeds=None):
    pipe = pipe_cls.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(req.scheduler, base.scheduler.config)
    seeds = seeds or [req.seed]
    with torch.no_grad():
        # None for an empty negative prompt: SDXL's force_zeros_for_empty_prompt applies then
        negative = [req.negative_prompt] * len(seeds) if req.negative_prompt else None
        return pipe([req.prompt] * len(seeds), negative_prompt=negative,
                    image=as_diffusers_image(image, base.vae.config.in_channels),
                    strength=req.strength, num_inference_steps=req.steps,
                    guidance_scale=req.guidance_scale, output_type="latent",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmsolver++"])
def test_sd_img2img_equals_diffusers(sd, tiny, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    req = Request(PROMPT, "blurry", seed=7, steps=10, guidance_scale=3.0, strength=0.6,
                  scheduler=scheduler)
    image = grey_image(16)
    gen = tiny.generation(req, init_image=image)
    assert gen.img2img and gen.steps == 6 and len(gen.timesteps) == 6
    ours = tiny.runner.generate(gen)
    ref = diffusers_img2img(StableDiffusionImg2ImgPipeline, sd, req, image)
    assert ours.shape == ref.shape == (1, 4, 16, 16)
    print(f"SD img2img {scheduler}: max abs {(ours - ref).abs().max().item():.2e}, "
          f"rel {rel(ours, ref):.2e}")
    assert rel(ours, ref) <= 1e-4


def test_sdxl_img2img_equals_diffusers(tiny_sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    req = Request("a red cube on a table", seed=4, steps=6, guidance_scale=5.0, strength=0.5,
                  scheduler="euler")
    image = rgb_image(32, 32)
    ours = AsyncDiffPipeline(tiny_sdxl, components=1).generate_latents(req, init_image=image)
    ref = diffusers_img2img(StableDiffusionXLImg2ImgPipeline, tiny_sdxl, req, image)
    assert ours.shape == ref.shape == (1, 4, 16, 16)
    print(f"SDXL img2img: max abs {(ours - ref).abs().max().item():.2e}, rel {rel(ours, ref):.2e}")
    assert rel(ours, ref) <= 1e-4


def test_num_images_rows_equal_each_image_alone(sd, tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    req = Request(PROMPT, seed=11, steps=8, strength=0.75, num_images=2)
    image = grey_image(16, seed=1)
    both = tiny.generate_latents(req, init_image=image)
    alone = [tiny.generate_latents(dataclasses.replace(req, seed=s, num_images=1), init_image=image)
             for s in (11, 12)]
    assert both.shape == (2, 4, 16, 16)
    assert rel(both[:1], alone[0]) <= 1e-5 and rel(both[1:], alone[1]) <= 1e-5
    assert rel(alone[0], alone[1]) > 1e-2  # the seeds differ
    ref = diffusers_img2img(StableDiffusionImg2ImgPipeline, sd, req, image, seeds=[11, 12])
    assert rel(both, ref) <= 1e-4, rel(both, ref)


def test_two_components_stay_close(sd, tiny):
    req = Request(PROMPT, seed=3, steps=10, strength=0.6, warmup=2)
    image = grey_image(16, seed=2)
    one = tiny.generate_latents(req, init_image=image)
    two = AsyncDiffPipeline(sd, components=2).generate_latents(req, init_image=image)
    other = tiny.generate_latents(dataclasses.replace(req, seed=4), init_image=image)
    print(f"N=2 vs N=1 img2img: rel {rel(two, one):.2e} (another seed: {rel(other, one):.2e})")
    assert 0 < rel(two, one) < rel(other, one) / 2


def test_request_size_equals_diffusers_text_to_image(sd, tiny):
    req = Request(PROMPT, seed=5, steps=4, height=24, width=32)
    ours = tiny.generate_latents(req)
    with torch.no_grad():
        ref = sd(req.prompt, height=24, width=32, num_inference_steps=4, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == ref.shape == (1, 4, 24, 32)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)


def test_outer_ring_at_another_size_stays_close(tiny_sdxl):
    """The ring's front calls feed zeros to its back stages: they scale with the latent size."""
    req = Request("a red cube", seed=1, steps=3, guidance_scale=5.0, scheduler="euler",
                  warmup=2, height=48, width=64)
    one_pipe = AsyncDiffPipeline(tiny_sdxl, components=1)
    one = one_pipe.generate_latents(req)
    ring = AsyncDiffPipeline(tiny_sdxl, components=2, layout="outer-ring").generate_latents(req)
    other = one_pipe.generate_latents(dataclasses.replace(req, seed=2))
    assert ring.shape == one.shape == (1, 4, 24, 32)
    print(f"outer ring N=2 vs N=1 at 64x48: rel {rel(ring, one):.2e} (another seed: "
          f"{rel(other, one):.2e})")
    assert 0 < rel(ring, one) < rel(other, one) / 2


@pytest.mark.parametrize("steps, strength, warmup, match", [
    (4, 0.1, 1, r"STRENGTH 0.1 x STEPS 4 leaves no step"),
    (10, 0.2, 2, r"WARMUP must be in \[1, 1\] when STRENGTH 0.2 x STEPS 10 leaves 2 steps"),
])
def test_too_few_steps_name_the_input(tiny, steps, strength, warmup, match):
    with pytest.raises(ValueError, match=match):
        steps_to_run(steps, strength, warmup)
    req = Request(PROMPT, steps=steps, strength=strength, warmup=warmup)
    with pytest.raises(ValueError, match=match):
        tiny.generation(req, init_image=grey_image(16))


def test_bad_images_and_mixed_batches_are_refused(tiny):
    with pytest.raises(ValueError, match=r"INIT_IMAGE must be \[HEIGHT, WIDTH, 3\] = \[16, 16, 3\]"):
        tiny.generation(Request(PROMPT), init_image=grey_image(24))
    with pytest.raises(ValueError, match="INIT_IMAGE must be uint8"):
        preprocess(grey_image(16).astype(np.float32), 16, 16)
    with pytest.raises(ValueError, match="STRENGTH must be the same for every request"):
        tiny.generation([Request(PROMPT, strength=0.5), Request(PROMPT, strength=0.7)],
                        init_image=grey_image(16))
    with pytest.raises(ValueError, match="HEIGHT and WIDTH must be the same"):
        tiny.generation([Request(PROMPT), Request(PROMPT, height=24)])


def test_preprocess_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    image = rgb_image(16, 24)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(image.astype(np.float32)[None] / 255.0)
    ours = preprocess(image, 16, 24)
    assert ours.shape == (1, 3, 16, 24) and torch.equal(ours, ref)
    assert torch.equal(preprocess(image[None], 16, 24), ours)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_exported_vae_encoder_equals_torch(tmp_path, sd, tiny_sdxl, which):
    from export.onnx_export import FP32_TOL, export_network, session, vae_encoder_network

    vae, size = (sd.vae, 16) if which == "sd" else (tiny_sdxl.vae, 32)
    art = export_network(vae_encoder_network(vae, size, size), tmp_path / "enc.onnx", 1)
    latent = size // (2 ** (len(vae.config.block_out_channels) - 1))
    assert art.name == VAE_ENCODER.model and [i.name for i in art.inputs] == [VAE_ENCODER.input]
    assert art.outputs[0].name == VAE_ENCODER.output
    assert art.outputs[0].shape == (8, latent, latent)
    assert art.max_abs_err <= FP32_TOL
    image = preprocess(np.stack([grey_image(size, 3), grey_image(size, 4)]), size, size)
    onnx = session(str(art.path)).run([VAE_ENCODER.output], {VAE_ENCODER.input: image.numpy()})[0]
    with torch.no_grad():
        ref = encode_moments(vae, image)
    err = np.abs(onnx - ref.numpy()).max()
    print(f"vae_encoder {which}: onnx vs torch max abs {err:.2e}")
    assert err <= FP32_TOL


def test_full_export_serves_the_vae_encoder(tiny_repo, sd):
    """Every full-pipeline export has the vae_encoder beside the decoder and says img2img."""
    from export import repository as repo_mod
    from export.onnx_export import FP32_TOL, session

    configs = repo_mod.read_configs(tiny_repo)
    enc = configs[VAE_ENCODER.model]
    # tiny_repo serves 16x16 and 24x16 (WIDTHxHEIGHT): the width is the dynamic dim
    assert [(t.name, list(t.dims)) for t in enc.input] == [(VAE_ENCODER.input, [3, 16, -1])]
    assert [(t.name, list(t.dims)) for t in enc.output] == [(VAE_ENCODER.output, [8, 16, -1])]
    params = repo_mod.pipeline_params(configs["asyncdiff_stream"])
    assert params.img2img and params.vae_encoder == VAE_ENCODER
    assert "INIT_IMAGE" in {t.name for t in configs["asyncdiff_stream"].input}
    image = preprocess(grey_image(16, 5), 16, 16)
    onnx = session(str(tiny_repo / VAE_ENCODER.model / "1" / "model.onnx")).run(
        [VAE_ENCODER.output], {VAE_ENCODER.input: image.numpy()})[0]
    with torch.no_grad():
        assert np.abs(onnx - encode_moments(sd.vae, image).numpy()).max() <= FP32_TOL
