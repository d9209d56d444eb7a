"""benchmarks.step_overhead: the smoke run serves the tiny model at N=1 and N=2 and writes a
report whose numbers hang together; the GPU projections reproduce the committed ones."""

import json

import pytest

from benchmarks import step_overhead as so


def test_smoke_run_measures_both_deployments(tmp_path):
    out = tmp_path / "so.json"
    assert so.main(["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert [d["components"] for d in report["deployments"]] == [1, 2]
    for d in report["deployments"]:
        assert sorted(d["component_ms"]) == [f"unet_part_{k}" for k in range(d["components"])]
        assert d["served_ms_per_step"] > 0 and all(v > 0 for v in d["component_ms"].values())
        assert d["served_over_slowest"] == pytest.approx(
            d["served_ms_per_step"] / max(d["component_ms"].values()))
        assert d["cpu_ms_per_step"]["engine"] > 0  # the engine worked on every step
        assert set(d["triton_compute_ms"]) == set(d["component_ms"])
        assert len(d["request_ms"]["2"]) == len(d["request_ms"]["6"]) == 2
    assert "| 2 |" in report["markdown"]
    proj = report["gpu_projections"]
    assert proj["host_ms"] == pytest.approx(max(0.0, report["deployments"][0]["host_overhead_ms_per_step"]))


def test_gpu_projections_without_host_are_the_committed_ones():
    gpu = json.loads(so.GPU_JSON.read_text())
    proj = so.gpu_projections(so.GPU_JSON, 0.0)
    for name, model in proj["models"].items():
        for cfg, row in model["configs"].items():
            want = gpu["models"][name]["configs"][cfg]["partitions"]["time"]["speedup"]["graph_d2d"]
            assert row["no_host"] == pytest.approx(want)
            assert row["with_host_vs_served_n1"] == pytest.approx(want)
    paid = so.gpu_projections(so.GPU_JSON, 2.0)["models"]["sd21-full"]["configs"]["N4S1"]
    assert paid["with_host_vs_in_process"] < paid["no_host"]
