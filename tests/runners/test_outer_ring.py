"""The outer-ring layout executed: its plan, LocalRunner, and the distributed runner."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.components import build_components
from asyncdiff.contract import Request
from asyncdiff.generation import Generation
from asyncdiff.partition import partition_unet
from asyncdiff.runners import LocalRunner
from asyncdiff.runners.distributed import RunConfig, reference_latents, spawn
from asyncdiff.runners.job import make_conditioning, scheduler_config
from asyncdiff.schedule import Call, make_plan

STEPS = 6


def test_ring_warmup_runs_the_front_first_and_the_ring_last():
    plan = make_plan(4, 3, warmup=2, ring=True)
    assert plan.steps[0].calls == (Call(2, 0, 0, "front"), Call(0, 0, 0), Call(1, 0, 0),
                                   Call(2, 0, 0, "back"))
    # compute rounds: component 0 reads the ring's outputs of the previous step
    assert plan.steps[2].calls == (Call(0, 2, 1), Call(1, 2, 1), Call(2, 2, 1))
    s2 = make_plan(5, 2, stride=2, warmup=1, ring=True)
    assert s2.steps[1].calls == (Call(0, 2, 0), Call(1, 2, 0), Call(1, 1, 0))
    with pytest.raises(ValueError, match="the outer ring needs components >= 2"):
        make_plan(4, 1, ring=True)


@pytest.fixture(scope="module")
def sdxl(small_unets):
    return small_unets["sdxl"]


def generate(unet, n, layout, warmup, stride=1, steps=STEPS):
    cfg = RunConfig(model="sdxl", components=n, stride=stride, warmup=warmup, steps=steps)
    part = partition_unet(unet, n, model="sdxl", layout=layout, stride=stride)
    gen = Generation(part, [Request("x", seed=1, steps=steps, warmup=min(warmup, steps))],
                     make_conditioning(cfg, part), scheduler_config("sdxl"))
    return LocalRunner(build_components(unet, part)).generate(gen), part


@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_warmup_equals_the_whole_unet(sdxl, n):
    """Front, middle components, then the whole ring: the sequential UNet, step by step."""
    seq, _ = generate(sdxl, 1, "sequential", STEPS)
    ring, part = generate(sdxl, n, "outer_ring", STEPS)
    assert part.components[-1].stages[0] == "conv_in" and part.components[-1].stages[-1] == "conv_out"
    assert (ring - seq).abs().max().item() <= 1e-5


def test_async_ring_stays_close(sdxl):
    seq, _ = generate(sdxl, 1, "sequential", 1)
    other = generate(sdxl, 1, "sequential", 1)[0]
    for stride in (1, 2):
        ring, _ = generate(sdxl, 3, "outer_ring", 1, stride)
        err = (ring - seq).abs().max().item()
        assert 1e-3 < err < 0.1 * seq.abs().max().item(), (stride, err)
    assert torch.equal(other, seq)


def test_front_call_equals_the_front_of_the_whole_call(sdxl):
    part = partition_unet(sdxl, 3, model="sdxl", layout="outer_ring")
    ring = build_components(sdxl, part)[-1]
    cfg = RunConfig(model="sdxl", components=3)
    gen = Generation(part, [Request("x", steps=3)], make_conditioning(cfg, part),
                     scheduler_config("sdxl"))
    front = next(iter(gen.waves(0)))[0]
    assert front.section == "front" and front.output_names == part.components[-1].output_names
    with torch.no_grad():
        only_front = ring.run(front.inputs, "front")
        whole = ring.run(front.inputs)  # on the zero placeholders, as a Triton model runs it
    assert set(only_front) == set(front.output_names) - {"noise_pred"}
    for name in only_front:
        assert torch.equal(only_front[name], whole[name])


RING = {"N3S1-ring": RunConfig(model="sdxl", components=3, steps=STEPS, layout="outer_ring"),
        "N2S2-ring": RunConfig(model="sdxl", components=2, stride=2, steps=STEPS,
                               layout="outer_ring")}


def test_distributed_ring_is_bit_identical_to_local_runner():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = spawn(list(RING.values()), world=3, method="fork", timeout_s=300)
        for res, cfg in zip(results, RING.values()):
            assert res["world_size"] == 3
            assert torch.equal(res["latents"], reference_latents(cfg)), cfg
    finally:
        torch.set_num_threads(threads)


def test_partition_cli_reports_the_ring_against_the_sequential_cut(capsys):
    from asyncdiff.partition import main

    main(["--model", "sdxl-full", "--components", "4", "--layout", "outer-ring"])
    out = capsys.readouterr().out
    assert "layout=outer_ring" in out
    # SDXL's deep transformer stages: the ring balances N=4 where the sequential cut cannot
    assert ("outer ring vs sequential cut: largest component 26.5% vs 31.6% "
            "(shares 25.8/23.2/24.4/26.5 vs 31.6/23.2/22.6/22.5") in out
    assert "projected 3.50x vs 3.03x for T=50 w=1" in out


def test_cost_model_charges_the_ring_front_in_warmup():
    from asyncdiff.cost import project
    from asyncdiff.placement import Placement

    costs = [0.3, 0.3, 0.4]
    ring = project(make_plan(10, 3, warmup=2, ring=True), Placement(3), costs)
    seq = project(make_plan(10, 3, warmup=2), Placement(3), costs)
    assert ring.asynchronous == pytest.approx(seq.asynchronous + 2 * 0.4)
