"""The in-process pipeline on a tiny random SD3 pipeline (``tests/tiny_sd3.py``): the
conditioning equals diffusers' ``encode_prompt``; at N=1 the latents equal diffusers'
``StableDiffusion3Pipeline(..., output_type="latent")``; N=2 and a batch run and stay close."""

import pytest
import torch

from asyncdiff.conditioning import SD3, conditioning_kind
from asyncdiff.contract import FLOW_MATCH_EULER, Request
from asyncdiff.generation import check_scheduler_fits, make_scheduler
from asyncdiff.pipeline import AsyncDiffPipeline
from asyncdiff.sd3 import AsyncDiffSD3Pipeline
from tests.tiny_sd3 import build_tiny_sd3, save_tiny_sd3

STEPS = 6


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3()


@pytest.fixture(scope="module")
def sd3_no_t5():
    return build_tiny_sd3(with_t5=False)


@pytest.fixture(scope="module")
def n1(sd3, sd3_no_t5):
    """N=1 pipelines (the FLOP profile behind a partition takes about a second)."""
    return {True: AsyncDiffPipeline(sd3, components=1),
            False: AsyncDiffPipeline(sd3_no_t5, components=1)}


def request(negative="", seed=4, **kw) -> Request:
    kw = {"steps": STEPS, "guidance_scale": 5.0, "scheduler": FLOW_MATCH_EULER, **kw}
    return Request("a red cube on a table", negative, seed=seed, **kw)


def diffusers_latents(pipe, req: Request, **kw):
    with torch.no_grad():
        return pipe(req.prompt, negative_prompt=req.negative_prompt or None,
                    num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                    generator=torch.Generator().manual_seed(req.seed), output_type="latent",
                    **kw).images


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("t5", [True, False])
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_conditioning_equals_diffusers_encode_prompt(sd3, sd3_no_t5, n1, t5, negative):
    pipe = sd3 if t5 else sd3_no_t5
    ours = n1[t5].encode(request(negative))
    with torch.no_grad():
        text, neg_text, pooled, neg_pooled = pipe.encode_prompt(
            "a red cube on a table", None, None, negative_prompt=negative or None,
            do_classifier_free_guidance=True)
    assert ours["encoder_hidden_states"].shape == (2, 77 + 256, 32)  # CLIP 8 + 16 padded to 32
    assert ours["pooled_projections"].shape == (2, 16)
    # Batch 2 here, batch 1 twice in diffusers: the projection may round differently.
    for name, ref in (("encoder_hidden_states", torch.cat([neg_text, text])),
                      ("pooled_projections", torch.cat([neg_pooled, pooled]))):
        assert (ours[name] - ref).abs().max().item() <= 1e-6, name
    if not t5:  # diffusers' zeros in the T5 slot
        assert ours["encoder_hidden_states"][:, 77:].abs().max().item() == 0.0


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_sequential_equals_diffusers_sd3(sd3, n1, negative):
    pipe = n1[True]
    assert isinstance(pipe, AsyncDiffSD3Pipeline) and pipe.kind == SD3
    assert conditioning_kind(pipe.partition) == SD3
    req = request(negative)
    ours = pipe.generate_latents(req)
    ref = diffusers_latents(sd3, req)
    assert ours.shape == ref.shape == (1, 16, 16, 16)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)


def test_sequential_equals_diffusers_without_t5(sd3_no_t5, n1):
    req = request(seed=7)
    ours = n1[False].generate_latents(req)
    assert rel(ours, diffusers_latents(sd3_no_t5, req)) <= 1e-4


def test_two_components_and_a_batch_stay_close(sd3):
    reqs = [request(seed=4, warmup=2), request("blurry", seed=9, guidance_scale=3.0, warmup=2)]
    ref = diffusers_latents(sd3, reqs[0])
    pipe = AsyncDiffPipeline(sd3, components=2)
    assert [c.stages for c in pipe.partition.components] == [
        ["embed", "joint0"], ["joint1", "joint2", "proj_out"]]
    alone = [pipe.generate_latents(r) for r in reqs]
    batch = pipe.generate_latents(reqs)
    assert batch.shape == (2, 16, 16, 16)
    for b, one in enumerate(alone):  # a request gets the same latents in a batch as alone
        assert rel(batch[b:b + 1], one) <= 1e-5, (b, rel(batch[b:b + 1], one))
    # Stale activations (warm-up 2 of 6 steps) move the result, but not far (measured 0.036).
    assert 1e-4 < rel(alone[0], ref) <= 0.1, rel(alone[0], ref)


def test_decoded_images_equal_diffusers(sd3, n1):
    req = request(seed=3, steps=3)
    pipe = n1[True]
    ours = pipe.decode_images(pipe.generate_latents(req))
    with torch.no_grad():
        ref = sd3(req.prompt, num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np").images
    ref = torch.from_numpy(ref * 255).round().to(torch.uint8).numpy()
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_schedulers_must_fit_the_model(n1):
    pipe = n1[True]
    with pytest.raises(ValueError, match=r"SCHEDULER 'ddim' does not fit .* \['flowmatch-euler'\]"):
        pipe.generation(request(scheduler="ddim"))
    ddim = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    with pytest.raises(ValueError, match="SCHEDULER 'flowmatch-euler' does not fit"):
        check_scheduler_fits(FLOW_MATCH_EULER, ddim)
    # The BLS builds every scheduler on its model at load (step limits): none may raise.
    for name, config in ((FLOW_MATCH_EULER, ddim), ("ddim", dict(pipe.sd.scheduler.config))):
        make_scheduler(name, config).set_timesteps(998)
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
        check_scheduler_fits(FLOW_MATCH_EULER,
                             {**pipe.sd.scheduler.config, "use_dynamic_shifting": True})
    with pytest.raises(NotImplementedError, match="img2img"):
        pipe.generation(request(), init_image=torch.zeros(32, 32, 3, dtype=torch.uint8))


def test_a_saved_folder_loads_as_sd3(n1, tmp_path):
    save_tiny_sd3(tmp_path / "sd3")
    pipe = AsyncDiffPipeline.from_pretrained(tmp_path / "sd3", components=1)
    assert isinstance(pipe, AsyncDiffSD3Pipeline)
    req = request(steps=2)
    assert rel(pipe.generate_latents(req), n1[True].generate_latents(req)) == 0.0
