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
