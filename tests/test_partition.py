import itertools
import json
import random
import subprocess
import sys

import pytest
import torch

from asyncdiff.partition import (
    Partition, assign_outer_ring, partition_unet, split_contiguous,
)


def brute_force(costs, n, last_weight=1.0):
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        b = (0, *cuts, len(costs))
        parts = [sum(costs[b[k]:b[k + 1]]) for k in range(n)]
        parts[-1] *= last_weight
        best = min(best, max(parts))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_dp_is_optimal(seed, weight):
    rng = random.Random(seed)
    costs = [rng.uniform(0, 10) for _ in range(9)]
    for n in range(1, 6):
        cuts = split_contiguous(costs, n, weight)
        parts = [sum(costs[cuts[k]:cuts[k + 1]]) for k in range(n)]
        parts[-1] *= weight
        assert all(cuts[k] < cuts[k + 1] for k in range(n))
        assert max(parts) == pytest.approx(brute_force(costs, n, weight))


def test_component_count_bounds():
    with pytest.raises(ValueError, match=r"components must be in \[1, 3\]"):
        split_contiguous([1, 2, 3], 4)


def test_outer_ring_last_component_holds_both_ends():
    parts = assign_outer_ring([1.0] * 12, 3)
    ring = parts[-1]
    assert 0 in ring and 11 in ring
    middle = sorted(i for p in parts[:-1] for i in p)
    assert middle == list(range(min(middle), max(middle) + 1))
    assert sorted(i for p in parts for i in p) == list(range(12))


@pytest.fixture(scope="module")
def sd15():
    from asyncdiff.configs import load_unet

    return load_unet("sd15")


def test_interface_lists_only_cross_cut_tensors(sd15):
    part = partition_unet(sd15, 3, model="sd15", batch=2)
    names = {c.index: set(c.stages) for c in part.components}
    for comp in part.components:
        for t in comp.inputs:
            if t.producer is not None:
                assert t.name not in names[comp.index] and t.name in names[t.producer]
                assert t.name in part.components[t.producer].output_names
        for t in comp.outputs:
            if t.name != "noise_pred":
                assert any(t.name in c.input_names for c in part.components if c.index != comp.index)
    assert part.components[0].input_names[0] == "sample"
    assert part.components[-1].output_names == ["noise_pred"]
    assert "encoder_hidden_states" in part.components[0].input_names


def test_batched_stride_shrinks_the_last_component(sd15):
    plain = partition_unet(sd15, 2, model="sd15", stride=2)
    batched = partition_unet(sd15, 2, model="sd15", stride=2, batched_stride=True)
    assert batched.components[-1].cost < plain.components[-1].cost


def test_sdxl_outer_ring_interface(small_unets):
    part = partition_unet(small_unets["sdxl"], 2, model="sdxl", layout="outer_ring")
    ring = part.components[-1]
    assert "conv_in" in ring.stages and "conv_out" in ring.stages
    assert {"sample", "text_embeds", "time_ids"} <= set(ring.input_names)
    assert part.components[0].input_names[0] in ring.output_names


def test_json_round_trip(sd15, tmp_path):
    part = partition_unet(sd15, 4, model="sd15", stride=2)
    part.save(tmp_path / "p.json")
    back = Partition.load(tmp_path / "p.json")
    assert back == part
    assert json.loads((tmp_path / "p.json").read_text())["components"][1]["inputs"][0]["producer"] == 0


def test_cli_prints_shares_and_shapes(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "asyncdiff.partition", "--model", "sd15", "--components", "2",
         "--height", "128", "--width", "128", "--json", str(tmp_path / "p.json")],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "[unet_part_1]" in out and "%" in out and "[2, 4, 16, 16]" in out
    assert Partition.load(tmp_path / "p.json").num_components == 2


def test_time_metric_follows_the_unet_dtype():
    from asyncdiff.configs import load_unet

    unet = load_unet("sd15").to(torch.float64)
    part = partition_unet(unet, 2, model="sd15", metric="time")
    assert part.cost_metric == "time" and all(c.cost > 0 for c in part.components)


def test_cuts_reproduce_the_asyncdiff_sd21_three_way_split(small_unets):
    # asyncdiff/pipe_config.py, SD 2.1, N=3: conv_in, D0-D3 | mid, U0, U1, U2 | U3, out.
    part = partition_unet(small_unets["sd21"], None, model="sd21", cuts=["mid", "up3_0"])
    names = part.stage_names
    mid, up3 = names.index("mid"), names.index("up3_0")
    assert [c.stages for c in part.components] == [names[:mid], names[mid:up3], names[up3:]]
    assert all(s.startswith(("conv_in", "down")) for s in part.components[0].stages)
    assert part.components[1].stages[-1] == "up2_us"
    assert part.cuts == ["mid", "up3_0"]


def test_cuts_reproduce_the_asyncdiff_sdxl_outer_ring(small_unets):
    # SDXL, N=2: D2, mid, U0.{r0,a0,r1,a1} | conv_in, D0, D1, U0.{r2,a2}, U0.ups, U1, U2, out.
    part = partition_unet(small_unets["sdxl"], 2, model="sdxl", layout="outer_ring",
                          cuts=["down2_0", "up0_2"])
    assert part.components[0].stages == ["down2_0", "down2_1", "mid", "up0_0", "up0_1"]
    ring = part.components[1].stages
    assert ring[:6] == ["conv_in", "down0_0", "down0_1", "down0_ds", "down1_0", "down1_1"]
    assert ring[7:9] == ["up0_2", "up0_us"] and ring[-1] == "conv_out"
    assert part.cuts == ["down2_0", "up0_2"]


@pytest.mark.parametrize("name, layout", [("sd15", "sequential"), ("sdxl", "outer_ring")])
def test_balanced_partition_round_trips_through_its_cuts(small_unets, name, layout):
    kw = dict(model=name, stride=2, batched_stride=True, layout=layout)
    balanced = partition_unet(small_unets[name], 3, **kw)
    assert len(balanced.cuts) == (2 if layout == "sequential" else 3)
    assert partition_unet(small_unets[name], 3, cuts=balanced.cuts, **kw) == balanced


@pytest.mark.parametrize("cuts, n, message", [
    (["mid", "up9_0"], None, r"'up9_0' is not a stage; stages: conv_in, down0_0, "),
    (["conv_in"], None, r"'conv_in' is the first stage; .* must be one of down0_0, "),
    (["up3_0", "mid"], None, r"strictly increasing in stage order: 'mid' comes at or before "
                             r"'up3_0' \(order: conv_in, "),
    (["mid", "mid"], None, r"strictly increasing"),
    (["mid"], 3, r"components=3 disagrees with cuts mid: 1 cuts make 2 components"),
])
def test_bad_cuts_name_the_stage_and_the_valid_ones(sd15, cuts, n, message):
    with pytest.raises(ValueError, match=message):
        partition_unet(sd15, n, model="sd15", cuts=cuts)


def test_outer_ring_cuts_need_both_ends(small_unets):
    with pytest.raises(ValueError, match="outer_ring needs at least 2 cuts"):
        partition_unet(small_unets["sdxl"], None, model="sdxl", layout="outer_ring", cuts=["mid"])


def test_cli_cuts_and_projected_speedup(tmp_path, capsys):
    from asyncdiff.cost import balanced, project
    from asyncdiff.partition import main
    from asyncdiff.placement import Placement
    from asyncdiff.schedule import make_plan

    main(["--model", "sd15", "--cuts", "mid,up3_0", "--steps", "20", "--warmup", "3",
          "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    part = Partition.load(tmp_path / "p.json")
    assert part.cuts == ["mid", "up3_0"] and part.num_components == 3
    want = project(make_plan(20, 3, 1, 3), Placement(3), [c.cost for c in part.components])
    assert f"projected speedup {want.speedup:.2f}x for T=20 w=3" in out
    assert "free communication" in out
    # An unequal cut projects below the balanced ideal of the same plan.
    ideal = project(make_plan(20, 3, 1, 3), Placement(3), balanced(3)).speedup
    assert want.speedup < ideal


def test_cli_needs_components_or_cuts(capsys):
    from asyncdiff.partition import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "sd15"])
    assert exit_.value.code == 2 and "give --components or --cuts" in capsys.readouterr().err


def test_cli_help_describes_in_whole_sentences(capsys):
    from asyncdiff.partition import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "into N components, with each component's interface." in help_text


def test_balancer_needs_a_component_count(sd15):
    with pytest.raises(ValueError, match="give the number of components or cuts"):
        partition_unet(sd15, None, model="sd15")
