import pytest
import torch

from asyncdiff.configs import load_unet
from asyncdiff.profile import profile_stages, stage_inputs, time_calls
from asyncdiff.stages import build_stage_graph


def test_run_hook_sees_every_stage_once_in_order(small_unets):
    graph = build_stage_graph(small_unets["sdxl"])
    inputs = stage_inputs(graph, 2, 16, 16)
    seen = []

    def hook(stage, args):
        hidden, skip, _, _ = args
        assert hidden is env[stage.prev] and (skip is None) == (stage.skip is None)
        seen.append(stage.name)
        return stage(*args)

    env = dict(inputs)
    with torch.no_grad():
        graph.run(env, on_stage=hook)
        plain = graph.run(dict(inputs))
    assert seen == graph.names
    assert all(torch.equal(env[n], plain[n]) for n in graph.names)


def test_running_a_suffix_continues_from_the_stored_activations(small_unets):
    graph = build_stage_graph(small_unets["sd15"])
    with torch.no_grad():
        full = graph.run(stage_inputs(graph, 2, 16, 16))
        cut = graph.index("mid")
        env = {k: v for k, v in full.items() if k not in graph.names[cut:]}
        graph.run(env, stages=graph.names[cut:])
    assert torch.equal(env["conv_out"], full["conv_out"])


def test_given_inputs_profile_like_generated_ones():
    graph = build_stage_graph(load_unet("sd15", device="meta"))
    made = profile_stages(graph, 2, 16, 16, "flops")
    given = profile_stages(graph, metric="flops", inputs=stage_inputs(graph, 2, 16, 16))
    assert made.costs == given.costs and made.shapes == given.shapes
    assert made.input_shapes["timestep"] == [2] and all(c > 0 for c in made.costs)


def test_half_graph_gets_half_inputs_but_fp32_timestep():
    graph = build_stage_graph(load_unet("sdxl", device="meta").half())
    inputs = stage_inputs(graph, 2, 16, 16)
    assert inputs["sample"].dtype == inputs["text_embeds"].dtype == torch.float16
    assert inputs["timestep"].dtype == torch.float32
    # float32 inputs handed in are cast too, and a scalar timestep becomes per-sample.
    fp32 = {**{k: v.float() for k, v in inputs.items()}, "timestep": torch.tensor(500.0)}
    prof = profile_stages(graph, metric="flops", inputs=fp32)
    assert prof.input_shapes["timestep"] == [2] and len(prof.costs) == len(graph.names)


def test_time_profile_measures_every_stage(small_unets):
    graph = build_stage_graph(small_unets["sd21"])
    prof = profile_stages(graph, 1, 16, 16, "time", repeats=1, warmup=0)
    assert prof.metric == "time" and len(prof.costs) == len(graph.names)
    assert all(0 < c < 10 for c in prof.costs)


def test_profile_needs_a_size_or_inputs(small_unets):
    graph = build_stage_graph(small_unets["sd15"])
    with pytest.raises(ValueError, match="inputs=... or batch, height and width"):
        profile_stages(graph, metric="flops")


def test_time_calls_counts_repeats_after_warmup():
    calls = []
    times = time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        time_calls(lambda: None, repeats=0)
