"""benchmarks.gpu: the CPU smoke mode runs the whole code path; with CUDA, the real path runs quickly."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

LABELS = ["N2S1", "N3S1", "N4S1", "N2S2", "N3S2"]


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "gpu.json"
    assert gpu.main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return run_json(tmp_path_factory.mktemp("gpu-smoke"), "--device", "cpu", "--quick")


def partitions(report):
    for cfg, entry in report["configs"].items():
        for metric, part in entry["partitions"].items():
            yield cfg, metric, part


def test_smoke_structure(smoke):
    assert smoke["schema"] == gpu.SCHEMA
    assert smoke["command"].startswith("python -m benchmarks.gpu --device cpu --quick --out ")
    assert smoke["settings"]["model"] == "sd21" and smoke["settings"]["dtype"] == "float32"
    assert smoke["settings"]["latent"] == 16 and smoke["settings"]["batch"] == 2
    assert {"torch", "diffusers", "gpu_name", "driver", "cuda_runtime"} <= set(smoke["env"])
    assert smoke["elapsed_s"] < 30
    assert "error" not in smoke
    assert list(smoke["configs"]) == LABELS
    assert smoke["unet"]["eager"]["median_ms"] > 0
    names = smoke["stage_profile"]["names"]
    assert names[0] == "conv_in" and names[-1] == "conv_out"
    assert len(smoke["stage_profile"]["time_ms"]) == len(smoke["stage_profile"]["flops"]) == len(names)


def test_smoke_components_and_shares(smoke):
    for cfg, metric, part in partitions(smoke):
        entry = smoke["configs"][cfg]
        assert len(part["components"]) == entry["n"], (cfg, metric)
        assert [st for c in part["components"] for st in c["stages"]] == smoke["stage_profile"]["names"]
        for share in ("time_share", "flops_share"):
            assert sum(c[share] for c in part["components"]) == pytest.approx(1.0)
        assert all(c["eager_ms"] > 0 and c["graph_ms"] is None for c in part["components"])
        assert part["rounds"] == (49 if entry["stride"] == 1 else 25)
        assert entry["gpus"] == entry["n"] + entry["stride"] - 1


def test_smoke_projections_positive(smoke):
    for cfg, metric, part in partitions(smoke):
        sp = part["speedup"]
        assert sp["eager_none"] > 0 and sp["eager_d2d"] > 0, (cfg, metric)
        assert sp["eager_none"] >= sp["eager_d2d"]
        assert "graph_none" not in sp and sp["eager_host"] is None  # not measured on a CPU
        assert smoke["configs"][cfg]["paper_table1_speedup"] == gpu.PAPER_TABLE1_SD21[cfg]


def test_smoke_skips_are_recorded(smoke):
    reasons = {item["what"]: item["reason"] for item in smoke["skipped"]}
    assert "no CUDA device" in reasons["CUDA graphs"]
    assert "no CUDA device" in reasons["host-staged transfers"]
    assert smoke["transfers"]["d2d_note"] == "no GPU: d2d not measured"


def test_smoke_transfers_and_critical_comm(smoke):
    tensors = smoke["transfers"]["tensors"]
    assert "sample" in tensors
    for rec in tensors.values():
        assert rec["bytes"] == 4 * math.prod(rec["shape"]) and rec["d2d"]["gb_per_s"] > 0
    for _, _, part in partitions(smoke):
        per_consumer = [sum(tensors[n]["d2d"]["median_ms"] for n in c["inbound"]) for c in part["components"]]
        assert part["comm"]["d2d"]["ms"] == pytest.approx(max(per_consumer))
        assert part["comm"]["host"]["ms"] is None


def test_flops_partition_is_partition_unets(smoke):
    from asyncdiff.configs import load_unet
    from asyncdiff.partition import partition_unet

    want = partition_unet(load_unet("sd21"), 3, model="sd21", batch=2, height=16, width=16, metric="flops")
    got = smoke["configs"]["N3S1"]["partitions"]["flops"]["components"]
    assert [c["stages"] for c in got] == [c.stages for c in want.components]


def test_speedup_formula():
    # T=50, w=1, S=1: 49 rounds of (max component 5 ms + 1 ms communication).
    assert gpu.speedup(50, 1, 49, 10.0, 5.0, 1.0) == pytest.approx(500 / (10 + 49 * 6))
    assert gpu.speedup(50, 50, 0, 10.0, 5.0, 1.0) == pytest.approx(1.0)


def test_time_guard_still_writes_json(tmp_path):
    report = run_json(tmp_path, "--device", "cpu", "--quick", "--budget-s", "1")
    reasons = {item["reason"] for item in report["skipped"]}
    assert reasons >= {"time guard"}
    assert report["stage_profile"]["time_ms"] is None
    for _, _, part in partitions(report):
        assert "projection_error" in part


def test_bad_arguments_exit_2(tmp_path):
    assert gpu.main(["--device", "cpu", "--warmup", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_default_out_names_the_gpu():
    want = Path("benchmarks/results/gpu_nvidia-h100-80gb-hbm3.json")
    assert gpu.default_out("NVIDIA H100 80GB HBM3") == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure path")
def test_graph_failure_is_recorded_not_raised():
    s = gpu.settings_from(gpu.parse_args(["--device", "cpu", "--quick"]))
    assert "error" in gpu.try_graph(lambda: None, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_path_on_gpu(tmp_path):
    report = run_json(tmp_path, "--quick")
    assert "error" not in report
    assert report["env"]["gpu_name"] == torch.cuda.get_device_name(0)
    assert report["settings"]["model"] == "sd21-full" and report["settings"]["dtype"] == "float16"
    assert report["elapsed_s"] < 300
    unet_graph = report["unet"]["graph"]
    assert "median_ms" in unet_graph or unet_graph["error"]
    for rec in report["transfers"]["tensors"].values():
        assert rec["d2d"]["gb_per_s"] > 0 and rec["host"]["gb_per_s"] > 0
    for cfg, metric, part in partitions(report):
        for c in part["components"]:
            assert c["eager_ms"] > 0 and (c["graph_ms"] or c["graph_error"]), (cfg, metric, c["index"])
        for key in ("eager_none", "eager_d2d", "eager_host"):
            assert part["speedup"][key] > 0, (cfg, metric, key)
