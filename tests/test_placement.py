"""asyncdiff.placement: device counts, the one message, instances and the rank of every call."""

from __future__ import annotations

import json

import pytest

from asyncdiff.placement import Placement, main, main_readers
from asyncdiff.schedule import make_plan


@pytest.mark.parametrize("n, s, batched, world", [
    (1, 1, False, 1), (2, 1, False, 2), (4, 1, False, 4),
    (2, 2, False, 3), (4, 2, False, 5), (2, 2, True, 2), (4, 2, True, 4),
    (1, 2, False, 1),  # one component: its stride copy has nothing to overlap with
])
def test_world_size(n, s, batched, world):
    assert Placement(n, s, batched).world_size == world


def test_one_message_for_an_impossible_device_count():
    expected = ("N=2 S=2 needs 3 devices (plain stride 2 adds one device for the last component's "
                "second call; use batched stride to stay on N)")
    with pytest.raises(ValueError) as listed:
        Placement(2, 2, gpus=(0, 1))
    assert str(listed.value) == f"{expected}; 2 GPUs are listed"
    with pytest.raises(ValueError) as available:
        Placement(2, 2).check_world(2, "GPUs")
    assert str(available.value) == f"{expected}; 2 GPUs are available"
    with pytest.raises(ValueError, match="N=3 S=1 needs 3 devices; 4 GPUs are listed"):
        Placement(3, 1, gpus=(0, 1, 2, 3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(components=0), "components must be >= 1"),
    (dict(components=2, stride=3), "stride must be 1 or 2"),
    (dict(components=2, batched_stride=True), "batched_stride only applies to stride 2"),
    (dict(components=2, gpus=(0, -1)), "gpus must be CUDA device ids >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Placement(**kwargs)


def test_one_gpu_may_hold_every_component():
    shared = Placement(2, gpus=(0, 0))
    assert [shared.instance_gpus(k) for k in range(2)] == [(0,), (0,)]
    assert shared.device(1) == "cuda:0"


def test_instances_and_pipeline_devices():
    plain = Placement(3, 2, gpus=(4, 5, 6, 7))
    assert [plain.instance_gpus(k) for k in range(3)] == [(4,), (5,), (6, 7)]
    assert [plain.instance_count(k) for k in range(3)] == [1, 1, 2]
    assert (plain.pipeline_gpu, plain.device(plain.pipeline_rank), plain.device(3)) == (
        4, "cuda:4", "cuda:7")
    batched = Placement(2, 2, True, (0, 1))
    assert [batched.instance_gpus(k) for k in range(2)] == [(0,), (1,)]
    cpu = Placement(2, 2)  # CPU: no GPU ids, but still two instances of the last component
    assert (cpu.instance_gpus(1), cpu.instance_count(1), cpu.pipeline_gpu, cpu.device(0)) == (
        (), 2, None, "cpu")
    with pytest.raises(ValueError, match="component must be in \\[0, 1\\], got 2"):
        cpu.instance_count(2)


@pytest.mark.parametrize("batched", [False, True])
def test_rank_of_every_call_on_a_stride_2_plan(batched):
    plan = make_plan(9, 2, 2, 1)
    place = Placement(2, 2, batched)
    ranks = [[place.rank_of(step, pos) for pos in range(len(step.calls))] for step in plan.steps
             if step.calls]
    last = 1 if batched else 2  # the stride copy: beside the last component, or on device N
    assert ranks[0] == [0, 1]  # warm-up: in sequence, each component on its own device
    assert ranks[1:] == [[0, 1, last]] * 4
    assert all(step.calls[-1].component == 1 for step in plan.steps if step.stride_copy)


def test_rank_of_stride_1_is_the_component():
    plan = make_plan(6, 3, 1, 2)
    place = Placement(3, 1)
    assert all(place.rank_of(step, pos) == call.component
               for step in plan.steps for pos, call in enumerate(step.calls))


@pytest.mark.parametrize("gpus, stride, n, batched, want", [
    ((0, 1), 2, None, None, (2, True)),  # S=2 on N GPUs: batched stride
    ((0, 1, 2), 2, 2, None, (2, False)),  # N+1 GPUs: plain stride
    ((0, 1, 2), 1, None, None, (3, False)),
])
def test_fit_to_the_gpus_at_hand(gpus, stride, n, batched, want):
    place = Placement.fit(gpus, stride, n, batched)
    assert (place.components, place.batched_stride) == want and place.gpus == gpus


def test_cli(capsys):
    assert main(["--gpus", "0,1", "--stride", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "components": 2, "stride": 2, "batched_stride": True, "world_size": 2, "gpus": [0, 1],
        "ranks": [[0], [1]]}
    assert main(["--gpus", "2,3,5", "--stride", "2", "--components", "2", "--export-args"]) == 0
    assert capsys.readouterr().out.strip() == "--components 2 --stride 2 --gpus 2,3,5"
    assert main(["--gpus", "0,1", "--stride", "2", "--batched-stride", "no"]) == 2
    assert "N=2 S=2 needs 3 devices" in capsys.readouterr().err


def _components(reads: list[dict[int, int]]):
    """ComponentSpecs whose component j reads ``reads[j][k]`` elements produced by component k."""
    from asyncdiff.partition import ComponentSpec, TensorSpec

    return [ComponentSpec(j, [f"s{j}"], 1.0, [TensorSpec(f"t{k}_{j}", [n], "skip", producer=k)
                                             for k, n in reads[j].items()], [])
            for j in range(len(reads))]


# sd21-full at 768², N=3 (sequential): component 0's skips to component 2 outweigh its hidden
# state to component 1 (17.7M vs 12.5M elements), so its outputs should land beside component 2.
SD21_N3 = [{}, {0: 12533760}, {0: 17694720, 1: 2949120}]


def test_main_reader_is_the_component_reading_most():
    assert main_readers(_components(SD21_N3)) == [2, 2, None]
    assert main_readers(_components([{}, {0: 5}, {0: 5}])) == [1, 2, None]  # a tie: the nearer
    assert main_readers(_components([{}])) == [None]


def test_outputs_land_where_they_are_consumed():
    place = Placement(3, 1, gpus=(4, 5, 6))
    # default reader k+1; the last component's noise prediction goes to the pipeline (GPU 4)
    assert [place.output_gpu(k) for k in range(3)] == [5, 6, 4]
    assert place.output_gpu() == 4  # text encoder, VAE: the pipeline consumes them
    assert place.output_gpus(_components(SD21_N3)) == (6, 6, 4)
    assert place.consumer_rank(0, reader=2) == 2
    with pytest.raises(ValueError, match="reader of component 1 must be in \\[2, 2\\], got 1"):
        place.consumer_rank(1, reader=1)
    with pytest.raises(ValueError, match="component must be in \\[0, 2\\], got 3"):
        place.output_gpu(3)


@pytest.mark.parametrize("batched, gpus, want", [
    (False, (0, 1, 2), (1, 0)),  # plain S=2: component 0 feeds the last component's first instance
    (True, (3, 2), (2, 3)),
])
def test_stride_2_outputs(batched, gpus, want):
    place = Placement(2, 2, batched, gpus)
    assert place.output_gpus(_components([{}, {0: 1}])) == want


def test_cpu_outputs_stay_where_the_runtime_put_them():
    cpu = Placement(3, 2)
    assert (*cpu.output_gpus(_components(SD21_N3)), cpu.output_gpu()) == (None,) * 4
    assert cpu.consumer_rank(1) == 2 and cpu.consumer_rank(2) == 0
