"""The in-process pipeline on tiny random FLUX.1 pipelines (``tests/tiny_flux.py``), dev-like
(guidance embedding) and schnell-like (none): the conditioning equals diffusers'
``encode_prompt``; at N=1 the latents equal diffusers' ``FluxPipeline(output_type="latent")``
(packed latents, FLUX's sigmas, the dynamic shift from the image size); N=2 and a batch run
and stay close; what FLUX does not take is refused, named."""

import pytest
import torch

from asyncdiff.contract import FLOW_MATCH_EULER, Request
from asyncdiff.flux import FLUX, IMG_IDS, TXT_IDS, AsyncDiffFluxPipeline, flux_ids
from asyncdiff.generation import check_scheduler_fits
from asyncdiff.pipeline import AsyncDiffPipeline
from tests.tiny_flux import build_tiny_flux

STEPS = 6
SIZE = 16  # latent side: 32 px (the tiny VAE scales by 2), 8 x 8 packed tokens


@pytest.fixture(scope="module")
def flux():
    """{guidance_embeds: diffusers pipeline}: dev-like and schnell-like."""
    return {True: build_tiny_flux(), False: build_tiny_flux(seed=1, guidance_embeds=False)}


@pytest.fixture(scope="module")
def n1(flux):
    return {g: AsyncDiffPipeline(pipe, components=1, latent_size=SIZE) for g, pipe in flux.items()}


def request(seed=4, **kw) -> Request:
    kw = {"steps": STEPS, "guidance_scale": 3.5, "scheduler": FLOW_MATCH_EULER, **kw}
    return Request("a red cube on a table", seed=seed, **kw)


def diffusers_latents(pipe, req: Request, height=32, width=32):
    """diffusers' packed final latents, unpacked to [1, 16, h, w]."""
    with torch.no_grad():
        packed = pipe(req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                      height=height, width=width, generator=torch.Generator().manual_seed(req.seed),
                      output_type="latent").images
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_conditioning_equals_diffusers_encode_prompt(flux, n1):
    pipe, ours = flux[True], n1[True]
    assert isinstance(ours, AsyncDiffFluxPipeline) and ours.kind == FLUX
    cond = ours.encode(request())
    with torch.no_grad():
        text, pooled, text_ids = pipe.encode_prompt("a red cube on a table", None)
    assert cond["encoder_hidden_states"].shape == (1, 512, 32)
    assert cond["pooled_projections"].shape == (1, 16)
    assert (cond["encoder_hidden_states"] - text).abs().max().item() <= 1e-6
    assert (cond["pooled_projections"] - pooled).abs().max().item() <= 1e-6
    ids = flux_ids(2, 6, 4)  # latents 6 x 4: 3 x 2 packed tokens
    image_ids = pipe._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32)
    assert torch.equal(ids[IMG_IDS][1], image_ids)
    assert torch.equal(ids[TXT_IDS][0], text_ids)


@pytest.mark.parametrize("guidance, height, width", [(True, 32, 32), (False, 48, 32)])
def test_sequential_equals_diffusers_flux(flux, n1, guidance, height, width):
    """dev: GUIDANCE_SCALE in the embedding; schnell at 48 x 32 px: another image size, so
    another number of tokens and dynamic shift."""
    req = request(height=height, width=width)
    ours = n1[guidance].generate_latents(req)
    ref = diffusers_latents(flux[guidance], req, height, width)
    assert ours.shape == ref.shape == (1, 16, height // 2, width // 2)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)  # measured 0.0 (same ops, same order)
    other = n1[guidance].generate_latents(request(height=height, width=width, guidance_scale=6.0))
    if guidance:  # the scale reaches the guidance embedding ...
        assert rel(other, ours) > 1e-3, rel(other, ours)
    else:  # ... and a model without one ignores it, as diffusers does
        assert torch.equal(other, ours)


def test_decoded_images_equal_diffusers(flux, n1):
    req = request(seed=3, steps=3)
    ours = n1[True].decode_images(n1[True].generate_latents(req))
    with torch.no_grad():
        ref = flux[True](req.prompt, num_inference_steps=3, guidance_scale=3.5, height=32,
                         width=32, generator=torch.Generator().manual_seed(3),
                         output_type="np").images
    ref = torch.from_numpy(ref * 255).round().to(torch.uint8).numpy()
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_two_components_and_a_batch_stay_close(flux, n1):
    reqs = [request(seed=4, warmup=2), request(seed=9, guidance_scale=5.0, warmup=2)]
    pipe = AsyncDiffPipeline(flux[True], components=2, latent_size=SIZE)
    assert [c.stages for c in pipe.partition.components] == [
        ["embed", "joint0", "joint1"], ["single0", "single1", "single2", "proj_out"]]
    alone = [pipe.generate_latents(r) for r in reqs]
    batch = pipe.generate_latents(reqs)
    assert batch.shape == (2, 16, SIZE, SIZE)
    for b, one in enumerate(alone):  # a request gets the same latents in a batch as alone
        assert rel(batch[b:b + 1], one) <= 1e-5, (b, rel(batch[b:b + 1], one))
    # NUM_IMAGES 2: seeds SEED and SEED+1, each as alone.
    pair = pipe.generate_latents(request(seed=4, warmup=2, num_images=2))
    assert rel(pair[:1], alone[0]) <= 1e-5
    # Stale activations (warm-up 2 of 6 steps) move the result, but not far (measured 0.055;
    # two seeds differ by 1.44).
    sequential = n1[True].generate_latents(reqs[0])
    assert 1e-4 < rel(alone[0], sequential) <= 0.1, rel(alone[0], sequential)


def test_what_flux_does_not_take_is_refused(n1):
    pipe = n1[True]
    with pytest.raises(ValueError, match=r"SCHEDULER 'ddim' does not fit .* \['flowmatch-euler'\]"):
        pipe.generation(request(scheduler="ddim"))
    with pytest.raises(ValueError, match="NEGATIVE_PROMPT must be empty"):
        pipe.generation(request(negative_prompt="blurry"))
    with pytest.raises(NotImplementedError, match="img2img"):
        pipe.generation(request(), init_image=torch.zeros(32, 32, 3, dtype=torch.uint8))
    config = dict(pipe.sd.scheduler.config)  # dynamic shifting: only with mu (FLUX passes it)
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
        check_scheduler_fits(FLOW_MATCH_EULER, config)
    check_scheduler_fits(FLOW_MATCH_EULER, config, dynamic_shift=True)
