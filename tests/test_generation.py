"""Generation: B requests in lockstep equal the same requests run one by one (tiny model, fp32)."""

import dataclasses

import pytest
import torch

from asyncdiff.contract import Request
from asyncdiff.generation import Generation, cfg_batch
from asyncdiff.pipeline import AsyncDiffPipeline

REQUESTS = [
    Request("a handwritten digit 3", seed=5, steps=6, guidance_scale=3.0),
    Request("the number seven", negative_prompt="blurry", seed=11, steps=6, guidance_scale=5.5),
    Request("digit 0", seed=2**40 + 1, steps=6, guidance_scale=0.0),
]


@pytest.fixture(scope="module")
def sd():
    from asyncdiff.tiny import load_pipeline

    torch.manual_seed(0)
    return load_pipeline()


def per_request(runner, batch):
    """A wave executor that runs each request's [uncond_b; cond_b] rows as its own call.

    It isolates the Generation's bookkeeping (seeds, CFG layout, per-request guidance,
    scheduler, cache) from batched-kernel reassociation: every call then sees exactly the
    batch-2 input the request sees alone.
    """
    def execute(wave):
        outs = []
        for call in wave:
            rows = [[b, batch + b] for b in range(batch)]
            parts = [runner.run_wave([dataclasses.replace(
                call, inputs={n: v[r] for n, v in call.inputs.items()})])[0] for r in rows]
            outs.append({n: cfg_batch([p[n] for p in parts]) for n in parts[0]})
        return outs
    return execute


@pytest.mark.parametrize("n, s, scheduler", [(2, 1, "ddim"), (2, 2, "ddim"), (2, 2, "euler")])
def test_batch_equals_requests_one_by_one(sd, n, s, scheduler):
    pipe = AsyncDiffPipeline(sd, components=n, stride=s)
    reqs = [Request(**{**r.__dict__, "scheduler": scheduler}) for r in REQUESTS]
    alone = torch.cat([pipe.generate_latents(r) for r in reqs])
    gen = pipe.generation(reqs)
    batch = gen.run(per_request(pipe.runner, len(reqs)))
    assert batch.shape == (3, 4, 16, 16)
    assert (batch - alone).abs().max().item() <= 1e-6
    # the requests really differ: distinct seeds and guidance give distinct latents
    assert (alone[0] - alone[1]).abs().max().item() > 0.1
    # One batched call per component: CPU kernels reassociate across batch sizes (~1e-5 here).
    assert (pipe.generate_latents(reqs) - alone).abs().max().item() <= 1e-4


def test_batched_stride_merges_the_stride_pair(sd):
    """Batched stride: the last component's two calls become one call; the result stays close."""
    pipe = AsyncDiffPipeline(sd, components=2, stride=2, batched_stride=True)
    gen = pipe.generation(REQUESTS[0])
    waves = []

    def execute(wave):
        waves.append([(c.positions, c.split) for c in wave])
        return pipe.runner.run_wave(wave)

    merged = gen.run(execute)
    # step 1 is the first compute round: component 0, then component 1's main call and copy as one
    assert waves[2] == [((0,), None), ((1, 2), 2)]
    pipe.batched_stride = False  # same partition, the pair as two calls
    plain = pipe.generate_latents(REQUESTS[0])
    assert (merged - plain).abs().max().item() <= 1e-5


def test_timestep_and_sample_are_built_once(sd):
    pipe = AsyncDiffPipeline(sd, components=2)
    converted = []

    def to_executor(name, tensor):
        converted.append(name)
        return tensor

    text = pipe.encode_text("digit 1", "")
    gen = Generation(pipe.partition, [Request("digit 1", steps=4)], {"encoder_hidden_states": text},
                     sd.scheduler.config, to_executor=to_executor)
    gen.run(pipe.runner.run_wave)
    # 4 steps x 2 calls: text once, one timestep per index, one sample per step
    assert sorted(converted) == ["encoder_hidden_states"] + ["sample"] * 4 + ["timestep"] * 4


@pytest.mark.parametrize("field, name", [("steps", "STEPS"), ("warmup", "WARMUP"),
                                         ("scheduler", "SCHEDULER")])
def test_shared_fields_must_agree(sd, field, name):
    pipe = AsyncDiffPipeline(sd, components=2)
    other = {"steps": 7, "warmup": 2, "scheduler": "euler"}[field]
    reqs = [REQUESTS[0], Request(**{**REQUESTS[0].__dict__, field: other})]
    with pytest.raises(ValueError, match=f"{name} must be the same for every request"):
        pipe.generation(reqs)


def test_conditioning_batch_must_match(sd):
    pipe = AsyncDiffPipeline(sd, components=2)
    text = pipe.encode_text("digit 1", "")
    with pytest.raises(ValueError, match="2 requests need 4"):
        Generation(pipe.partition, REQUESTS[:2], {"encoder_hidden_states": text}, sd.scheduler.config)


def test_cfg_batch_layout():
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]])  # [uncond; cond] each
    assert cfg_batch([a, b]).flatten().tolist() == [1.0, 3.0, 2.0, 4.0]


def test_split_executors_hand_over_through_the_cache(sd):
    """Two executors, each running one component (as two ranks would), exchanging activations
    and the noise prediction through the cache's public hand-over, equal one LocalRunner."""
    pipe = AsyncDiffPipeline(sd, components=2)
    req = REQUESTS[1]
    want = pipe.generate_latents(req)
    owner = pipe.generation(req)  # component 0, latents, scheduler
    helper = Generation(pipe.partition, [req], owner.conditioning, timesteps=owner.timesteps)
    for i in range(owner.steps):
        for wave in owner.cache.waves(i):
            sent = []
            for gen, k in ((owner, 0), (helper, 1)):
                mine = [(p, c) for p, c in wave if c.component == k]
                if mine:
                    calls = gen.calls(i, mine)
                    outs = pipe.runner.run_wave(calls)
                    gen.record(calls, outs)
                    sent += [(k, out) for out in outs]
            for k, out in sent:  # after the whole wave, as messages would arrive
                if k == 0:
                    for name, value in out.items():
                        helper.cache.receive(name, i, value)
                else:
                    owner.cache.receive_noise_pred(i, out["noise_pred"])
        helper.cache.drop_noise_preds()
        owner.advance(i)
    assert torch.equal(owner.latents, want)
    with pytest.raises(RuntimeError, match="only routes calls"):
        helper.advance(0)


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++"])
def test_fp16_components_leave_the_scheduler_in_fp32(sd, scheduler):
    """A noise prediction served fp16: guidance and the scheduler step still run in fp32.
    Euler would otherwise cast the latents to fp16 for good."""
    pipe = AsyncDiffPipeline(sd, components=2)
    req = Request("digit 4", seed=9, steps=6, scheduler=scheduler)
    fp32 = pipe.generate_latents(req)
    gen = pipe.generation(req)
    dtypes = []

    def fp16_outputs(wave):
        outs = [{n: v.half() if n == "noise_pred" else v for n, v in out.items()}
                for out in pipe.runner.run_wave(wave)]
        dtypes.append(gen.latents.dtype)
        return outs

    latents = gen.run(fp16_outputs)
    assert set(dtypes) == {torch.float32} and latents.dtype == torch.float32
    # only the fp16 rounding of the noise prediction differs (measured 4.3e-3 and 2.5e-3)
    assert 0 < (latents - fp32).abs().max().item() <= 2e-2


def test_non_finite_latents_stop_the_generation(sd):
    """An overflowing step is an error at that step, not a black image at the end."""
    pipe = AsyncDiffPipeline(sd, components=2)
    gen = pipe.generation(Request("digit 1", seed=1, steps=6))
    calls = []

    def overflow_at_step_2(wave):
        outs = pipe.runner.run_wave(wave)
        calls.append(wave[0].step)
        if wave[0].step == 2:
            outs = [{n: torch.full_like(v, float("inf")) if n == "noise_pred" else v
                     for n, v in out.items()} for out in outs]
        return outs

    with pytest.raises(FloatingPointError, match="not finite after step 2 of 6"):
        gen.run(overflow_at_step_2)
    assert max(calls) == 2  # nothing ran after the bad step


def test_packing_is_diffusers_flux_packing():
    from diffusers import FluxPipeline

    from asyncdiff.generation import pack_latents, unpack_latents

    x = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x, 2)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 2, 6, 4), x)
    # diffusers' unpack takes pixels and the VAE scale: 12 x 8 px at scale 2 is 6 x 4 latents
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 8, 2), x)


def test_rows_without_guidance_packed_latents_and_sigma_timesteps():
    """FLUX's Denoising on a weightless FLUX-dev-shaped partition: one row per request, the
    latents [B, C, h, w] entering packed, sigmas as timesteps, GUIDANCE_SCALE per row."""
    from asyncdiff.configs import DIT_CONFIGS, denoiser_class
    from asyncdiff.flux import FLUX_DENOISING, flux_ids
    from asyncdiff.partition import partition_denoiser

    with torch.device("meta"):
        model = denoiser_class(DIT_CONFIGS["flux"]).from_config(DIT_CONFIGS["flux"])
    part = partition_denoiser(model, 2, model="flux", batch=1, height=8, width=8)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
              "use_dynamic_shifting": True}
    reqs = [Request("a", seed=1, steps=4, guidance_scale=3.5, scheduler="flowmatch-euler"),
            Request("b", seed=2, steps=4, guidance_scale=5.0, scheduler="flowmatch-euler")]
    cond = {"encoder_hidden_states": torch.zeros(2, 512, 32),
            "pooled_projections": torch.zeros(2, 16), **flux_ids(2, 12, 8)}
    gen = Generation(part, reqs, cond, config, latent_size=(12, 8), denoising=FLUX_DENOISING)
    assert gen.rows == 2 and gen.latent_shape == (4, 12, 8) and gen.image_tokens == 24
    assert gen.latents.shape == (2, 4, 12, 8)
    first = next(gen.waves(0))[0].inputs  # component 0 at step 0
    assert first["sample"].shape == (2, 24, 16)
    assert first["guidance"].tolist() == [3.5, 5.0]
    assert first["timestep"].tolist() == pytest.approx([gen.timesteps[0].item() / 1000] * 2)
    assert gen.timesteps[0].item() == 1000.0  # sigmas from 1: linspace(1, 1/T, T), shifted
    with pytest.raises(ValueError, match=r"2 requests need 2 \(one row per request\)"):
        Generation(part, reqs, {**cond, "pooled_projections": torch.zeros(4, 16)}, config,
                   latent_size=(12, 8), denoising=FLUX_DENOISING)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_schedulers_are_fresh_copies_that_step_as_a_new_one(sd, scheduler):
    """make_scheduler copies one prototype per (name, config): a copy that has been stepped
    leaves the next copy fresh, and each steps exactly as a scheduler built from the config."""
    from asyncdiff.generation import _build_scheduler, make_scheduler

    config = dict(sd.scheduler.config)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(s):
        s.set_timesteps(4)
        x = sample
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x).prev_sample
        return x

    used = make_scheduler(scheduler, config)
    first = run(used)
    fresh = make_scheduler(scheduler, config)
    assert fresh is not used and fresh.num_inference_steps is None  # set_timesteps not called
    assert torch.equal(run(fresh), first)
    assert torch.equal(run(_build_scheduler(scheduler, config)), first)
