"""Smoke test of benchmarks.speed: the in-process code path on the narrowed sd15 config.

No timing assertions: only that every variant ran, the report is complete and
the final line has its exact form.  The Triton part is left to the serving tests
(a server start alone would take most of this test's budget on 2 cores).
"""

import json
import math
import re

import pytest

from asyncdiff.schedule import make_plan
from benchmarks import speed

LINE = re.compile(r"^speedup_n2s1_local=(\S+) speedup_n2s1_triton=(\S+) ideal=(\S+)$")


class _Part:
    def __init__(self, shares, batched=False):
        self.shares, self.batched_stride = shares, batched

    def cost_share(self, k):
        return self.shares[k]


def test_ideal_formulas():
    s1 = speed.ideal_speedups(_Part([0.5, 0.5]), make_plan(20, 2, 1, 1))
    assert s1["perfect"] == pytest.approx(20 / (1 + 19 / 2))
    assert s1["partition"] == pytest.approx(s1["perfect"])
    uneven = speed.ideal_speedups(_Part([0.6, 0.4]), make_plan(20, 2, 1, 1))
    assert uneven["partition"] == pytest.approx(20 / (1 + 19 * 0.6))
    # Batched S=2 on 2 devices: 10 rounds of max(2/3, 2 * 1/3) of a UNet.
    s2 = speed.ideal_speedups(_Part([2 / 3, 1 / 3], batched=True), make_plan(21, 2, 2, 1))
    assert s2["rounds"] == 10 and s2["perfect"] == pytest.approx(21 / (1 + 10 * 2 / 3))
    assert s2["partition"] == pytest.approx(s2["perfect"])


def test_ideals_quoted_in_the_readme():
    """README: ideal 1.90x for N2S1 and 2.61x for batched N2S2 at T=20, w=1 (the cost model)."""
    n2s1 = speed.ideal_speedups(_Part([0.5, 0.5]), make_plan(20, 2, 1, 1))
    n2s2 = speed.ideal_speedups(_Part([0.6, 0.4], batched=True), make_plan(20, 2, 2, 1))
    assert round(n2s1["perfect"], 2) == 1.90 and round(n2s2["perfect"], 2) == 2.61
    assert n2s2["partition"] == pytest.approx(20 / (1 + 10 * 0.8))  # last device: 2 x 0.4


def test_rotations_put_each_variant_in_each_position():
    rots = speed.rotations(["a", "b", "c"], 3)
    assert rots == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_speed_smoke(tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["--model", "sd15", "--latent", "16", "--steps", "3", "--reps", "1",
            "--no-triton", "--json", str(out)]
    assert speed.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m, last
    local, triton, ideal = (float(x) for x in m.groups())
    assert local > 0 and ideal > 1 and math.isnan(triton)
    report = json.loads(out.read_text())
    assert report["final_line"] == last
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    variants = report["local"]["variants"]
    assert set(variants) == set(speed.VARIANTS)
    for v in variants.values():
        assert len(v["runs"]) == 1 and v["wall_s"] > 0
        assert all(r["compute_s"] > 0 for r in v["runs"][0]["ranks"])
    assert variants["n2s1"]["cross_bytes_per_round_fp32"] > 0
    assert variants["n2s1"]["bytes_sent_per_step"] > 0
    assert len(variants["n2s1"]["weight_bytes_per_rank"]) == 2


def test_sdxl_configurations_are_projected_from_measured_stage_times():
    from asyncdiff.cost import project
    from asyncdiff.placement import Placement

    res = speed.sdxl_projections(model="sdxl", latent=16, steps=50, repeats=1,
                                 configs=((2, 1, 1), (3, 2, 9)))
    assert res["unet_call_s"] > 0 and len(res["stage_s"]) == 22
    rows = {(c["name"], c["layout"]): c for c in res["configs"]}
    assert set(rows) == {(n, layout) for n in ("N2S1 w1", "N3S2 w9")
                         for layout in ("outer_ring", "sequential")}
    ring = rows[("N3S2 w9", "outer_ring")]
    assert ring["devices"] == 4 and len(ring["component_s"]) == 3
    # the ring's warm-up front is part of the ring: charging the whole ring costs more
    assert 0 < ring["front_s"][-1] < ring["component_s"][-1]
    assert ring["projected_measured"] > ring["projected_measured_whole_ring_warmup"] > 1
    seq = rows[("N2S1 w1", "sequential")]
    expected = project(make_plan(50, 2, 1, 1), Placement(2), seq["component_s"]).speedup
    assert seq["projected_measured"] == pytest.approx(expected)
    assert "| N3S2 w9 | 4 | outer-ring |" in speed.sdxl_table(res)


def test_speed_on_a_dit_runs_the_same_runner_and_checks_its_latents(tmp_path, capsys):
    """The narrowed SD3 built-in through the same in-process runner: a pipeline folder with a
    flow-matching scheduler, the Triton part skipped, every variant's latents equal to
    LocalRunner's on the same plan, and the sequential run equal to the whole transformer called
    step by step."""
    out = tmp_path / "speed_dit.json"
    argv = ["--model", "sd3", "--latent", "16", "--steps", "4", "--reps", "1", "--check",
            "--workdir", str(tmp_path / "work"), "--note", "test", "--json", str(out)]
    assert speed.main(argv) == 0
    assert LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(out.read_text())
    assert report["triton"] is None and report["triton_skipped"] and report["note"] == "test"
    variants = report["local"]["variants"]
    assert set(variants) == set(speed.VARIANTS)
    for v in variants.values():
        assert v["config"]["scheduler"] == "flowmatch-euler"
        assert v["config"]["model"] == str(tmp_path / "work" / "sd3")
        assert v["check"]["equal_to_local"] and v["check"]["max_abs_err_vs_local"] == 0.0
    assert variants["seq"]["check"]["max_abs_err_vs_plain_loop"] < 1e-6
    # batched stride: one doubled call instead of two, equal up to batched kernels' sums
    assert variants["n2s2b"]["check"]["max_abs_err_vs_unbatched_local"] < 1e-4
    # image and text tokens cross the cut: [2, 8, 8, 16] + [2, 333, 16] fp32
    assert variants["n2s1"]["cross_bytes_per_round_fp32"] == 4 * 2 * (8 * 8 * 16 + 333 * 16)
    pair = speed.side_by_side(report["local"], report["local"])
    row = pair["variants"]["n2s1"]
    assert row["dit"] == row["unet"] and row["dit"]["speedup"] == variants["n2s1"]["speedup"]
    walls = {k: v["runs"][0]["wall_s"] for k, v in variants.items()}  # one rep: best = median
    assert row["dit"]["speedup_best_reps"] == pytest.approx(walls["seq"] / walls["n2s1"])
    assert "| N2S2 batched |" in speed.side_by_side_table(pair)


def test_flux_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="FLUX's packed latents"):
        speed.local_model("flux", tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_dit_bench_config_is_sd3_shaped_and_cuts_evenly():
    """sd3-bench: 6 joint blocks, FLOP-balanced into 3|3 for N2S1 and 4|2 for batched N2S2."""
    from asyncdiff.configs import load_denoiser
    from asyncdiff.partition import partition_denoiser

    meta = load_denoiser("sd3-bench", device="meta")
    assert type(meta).__name__ == "SD3Transformer2DModel" and meta.config.num_layers == 6
    cuts = {b: partition_denoiser(meta, 2, model="sd3-bench", height=32, width=32, stride=1 + b,
                                  batched_stride=b).cuts for b in (False, True)}
    assert cuts == {False: ["joint3"], True: ["joint4"]}
