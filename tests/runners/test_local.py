import pytest
import torch

from asyncdiff.components import build_components
from asyncdiff.configs import example_inputs
from asyncdiff.contract import Request
from asyncdiff.generation import Generation
from asyncdiff.partition import partition_unet
from asyncdiff.runners import ActivationCache, LocalRunner
from asyncdiff.schedule import make_plan

STEPS = 6
TIMESTEPS = torch.linspace(950, 50, STEPS).long()


@pytest.fixture(scope="module")
def setup(small_unets):
    unet = small_unets["sd15"]
    sample, _, text, _ = example_inputs(dict(unet.config), 2, 16, 16)
    return unet, sample, {"encoder_hidden_states": text}


def sample_loop(runner, part, warmup, x, cond, batched_stride=False):
    """A routing-only Generation with a toy deterministic update standing in for the scheduler."""
    gen = Generation(part, [Request(steps=STEPS, warmup=warmup)], cond, timesteps=TIMESTEPS,
                     batched_stride=batched_stride)
    for i in range(gen.steps):
        for wave in gen.cache.waves(i):
            calls = gen.calls(i, wave, sample=x)
            gen.record(calls, runner.run_wave(calls))
        x = x - 0.1 * gen.cache.noise_pred(i)
    return x


def sequential(unet, x, cond):
    with torch.no_grad():
        for i in range(STEPS):
            x = x - 0.1 * unet(x, TIMESTEPS[i], cond["encoder_hidden_states"]).sample
    return x


@pytest.mark.parametrize("n, stride", [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_full_warmup_equals_sequential(setup, n, stride):
    unet, x, cond = setup
    part = partition_unet(unet, n, model="sd15", stride=stride)
    runner = LocalRunner(build_components(unet, part))
    out = sample_loop(runner, part, STEPS, x, cond)
    assert (out - sequential(unet, x, cond)).abs().max().item() <= 1e-5


def test_async_s1_matches_an_independent_emulation(setup):
    """Component 1 at step i consumes component 0's outputs of step i-1 (skips included)."""
    unet, x0, cond = setup
    part = partition_unet(unet, 2, model="sd15")
    c0, c1 = build_components(unet, part)
    runner_out = sample_loop(LocalRunner([c0, c1]), part, 1, x0, cond)

    def t(i):
        return TIMESTEPS[i].float().expand(2)

    text = cond["encoder_hidden_states"]
    with torch.no_grad():
        x = x0
        prev = c0.run({"sample": x, "timestep": t(0), "encoder_hidden_states": text})
        eps = c1.run({**prev, "timestep": t(0), "encoder_hidden_states": text})["noise_pred"]
        x = x - 0.1 * eps
        for i in range(1, STEPS):
            fresh = c0.run({"sample": x, "timestep": t(i), "encoder_hidden_states": text})
            eps = c1.run({**prev, "timestep": t(i), "encoder_hidden_states": text})["noise_pred"]
            prev = fresh
            x = x - 0.1 * eps
    assert torch.equal(runner_out, x)


def test_async_differs_from_sequential_but_stays_close(setup):
    unet, x, cond = setup
    part = partition_unet(unet, 2, model="sd15")
    out = sample_loop(LocalRunner(build_components(unet, part)), part, 1, x, cond)
    diff = (out - sequential(unet, x, cond)).abs().max().item()
    assert 0 < diff < x.abs().max().item()


def test_batched_stride_equals_separate_calls(setup):
    unet, x, cond = setup
    part = partition_unet(unet, 2, model="sd15", stride=2, batched_stride=True)
    comps = build_components(unet, part)
    a = sample_loop(LocalRunner(comps), part, 1, x, cond)
    b = sample_loop(LocalRunner(comps), part, 1, x, cond, batched_stride=True)
    assert (a - b).abs().max().item() <= 1e-5


def test_plan_and_partition_must_agree(setup):
    unet, _, _ = setup
    part = partition_unet(unet, 2, model="sd15")
    with pytest.raises(ValueError, match="plan has 3 components"):
        ActivationCache(part, make_plan(4, 3))


def test_outer_ring_needs_a_ring_plan(small_unets):
    # The outer ring runs (tests/runners/test_outer_ring.py), but only with its own warm-up.
    part = partition_unet(small_unets["sdxl"], 2, model="sdxl", layout="outer_ring")
    with pytest.raises(ValueError, match="a sequential plan cannot run a 'outer_ring' partition"):
        ActivationCache(part, make_plan(4, 2))
    ActivationCache(part, make_plan(4, 2, ring=True))
