"""benchmarks.gpu: the CPU smoke mode runs the whole code path; with CUDA, the real path runs quickly."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from asyncdiff.cost import balanced, project
from asyncdiff.placement import Placement
from asyncdiff.schedule import make_plan
from benchmarks import gpu, gpu_measure, gpu_report

LABELS = ["N2S1", "N3S1", "N4S1", "N2S2", "N3S2"]
REPO = Path(__file__).resolve().parents[2]


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "gpu.json"
    assert gpu.main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return run_json(tmp_path_factory.mktemp("gpu-smoke"), "--device", "cpu", "--quick")


def partitions(report):
    for name, model in report["models"].items():
        for cfg, entry in model["configs"].items():
            for metric, part in entry["partitions"].items():
                yield name, cfg, metric, part


def test_smoke_structure(smoke):
    assert smoke["schema"] == gpu.SCHEMA
    assert smoke["command"].startswith("python -m benchmarks.gpu --device cpu --quick --out ")
    assert smoke["settings"]["models"] == ["sd21", "sdxl"] and smoke["settings"]["dtype"] == "float32"
    assert smoke["settings"]["batch"] == 2
    assert {"torch", "diffusers", "gpu_name", "driver", "cuda_runtime"} <= set(smoke["env"])
    assert smoke["elapsed_s"] < 120
    assert "error" not in smoke
    for name, model in smoke["models"].items():
        assert model["latent"] == 16 and model["image_px"] == 128
        assert list(model["configs"]) == LABELS
        assert model["unet"]["eager"]["median_ms"] > 0 and model["output_finite"]
        names = model["stage_profile"]["names"]
        assert names[0] == "conv_in" and names[-1] == "conv_out"
        assert len(model["stage_profile"]["time_ms"]) == len(model["stage_profile"]["flops"]) == len(names)


def test_smoke_components_and_shares(smoke):
    for name, cfg, metric, part in partitions(smoke):
        entry = smoke["models"][name]["configs"][cfg]
        assert len(part["components"]) == entry["n"], (name, cfg, metric)
        assert [st for c in part["components"] for st in c["stages"]] == smoke["models"][name]["stage_profile"]["names"]
        for share in ("time_share", "flops_share"):
            assert sum(c[share] for c in part["components"]) == pytest.approx(1.0)
        assert all(c["eager_ms"] > 0 and c["graph_ms"] is None for c in part["components"])
        assert part["rounds"] == (49 if entry["stride"] == 1 else 25)
        assert entry["gpus"] == entry["n"] + entry["stride"] - 1 == entry["placement"]["world_size"]


def test_smoke_projections_are_the_cost_model(smoke):
    for name, cfg, metric, part in partitions(smoke):
        entry = smoke["models"][name]["configs"][cfg]
        sp = part["speedup"]
        assert sp["eager_none"] > 0 and sp["eager_d2d"] > 0, (name, cfg, metric)
        assert sp["eager_none"] >= sp["eager_d2d"]
        assert "graph_none" not in sp and sp["eager_host"] is None  # not measured on a CPU
        costs = [c["eager_ms"] for c in part["components"]]
        plan = make_plan(50, entry["n"], entry["stride"], 1)
        unet_ms = smoke["models"][name]["unet"]["eager"]["median_ms"]
        want = project(plan, Placement(entry["n"], entry["stride"]), costs, part["comm"]["d2d"]["ms"], unet_ms)
        assert sp["eager_d2d"] == pytest.approx(want.speedup)
        assert part["latency_s"]["eager_d2d"] == pytest.approx(want.asynchronous / 1e3)
        perfect = project(plan, Placement(entry["n"], entry["stride"]), balanced(entry["n"]))
        assert entry["ideal_balanced"] == pytest.approx(perfect.speedup)
        assert entry["paper_speedup"] is None  # the paper's numbers are for sd21-full


def test_smoke_parity_fp16_vs_fp32(smoke):
    for name, model in smoke["models"].items():
        par = model["parity"]
        assert par["dtype"] == "float16 vs float32", par.get("error")
        assert 0 < par["unet"]["rel_l2"] < 0.05 and par["unet"]["finite"]
        flops_stages = {tuple(c["stages"]) for _, _, metric, part in partitions({"models": {name: model}})
                        if metric == "flops" for c in part["components"]}
        assert len(par["components"]) == len(flops_stages)
        for what, outputs in par["components"].items():
            for out, e in outputs.items():
                assert 0 <= e["max_abs"] and 0 <= e["rel_l2"] < 0.05, (name, what, out)
        assert par["max_component_rel_l2"] == max(e["rel_l2"] for o in par["components"].values()
                                                  for e in o.values())


def test_smoke_skips_are_recorded(smoke):
    reasons = {item["what"]: item["reason"] for item in smoke["skipped"]}
    for name in smoke["models"]:
        assert "no CUDA device" in reasons[f"{name}: CUDA graphs"]
        assert "no CUDA device" in reasons[f"{name}: host-staged transfers"]
        assert smoke["models"][name]["transfers"]["d2d_note"] == "no GPU: d2d not measured"


def test_smoke_transfers_and_critical_comm(smoke):
    for name, _, _, part in partitions(smoke):
        tensors = smoke["models"][name]["transfers"]["tensors"]
        assert "sample" in tensors
        for rec in tensors.values():
            assert rec["bytes"] == 4 * math.prod(rec["shape"]) and rec["d2d"]["gb_per_s"] > 0
        per_consumer = [sum(tensors[n]["d2d"]["median_ms"] for n in c["inbound"]) for c in part["components"]]
        assert part["comm"]["d2d"]["ms"] == pytest.approx(max(per_consumer))
        assert part["comm"]["host"]["ms"] is None


def test_flops_partition_is_partition_unets(smoke):
    from asyncdiff.configs import load_unet
    from asyncdiff.partition import partition_unet

    want = partition_unet(load_unet("sd21"), 3, model="sd21", batch=2, height=16, width=16, metric="flops")
    got = smoke["models"]["sd21"]["configs"]["N3S1"]["partitions"]["flops"]["components"]
    assert [c["stages"] for c in got] == [c.stages for c in want.components]


def test_summary_is_printed_last(smoke, capsys):
    gpu_report.print_summary(smoke)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Summary (cpu smoke; T=50 w=1")
    assert sum(line.startswith(("sd21 latent 16", "sdxl latent 16")) for line in lines) == 2
    assert lines[-1].startswith("skipped: ")


def test_time_guard_still_writes_json(tmp_path):
    report = run_json(tmp_path, "--device", "cpu", "--quick", "--budget-s", "1", "--models", "sd21")
    reasons = {item["reason"] for item in report["skipped"]}
    assert reasons >= {"time guard"}
    assert report["models"]["sd21"]["stage_profile"]["time_ms"] is None
    for *_, part in partitions(report):
        assert "projection_error" in part


def test_clock_shares_the_budget_between_models():
    clock = gpu_measure.Clock(100 + gpu_measure.RESERVE_S)
    clock.share(2)
    assert clock.deadline == pytest.approx(50, abs=0.5)
    assert clock.allows(10) and not clock.allows(60)


def test_bad_arguments_exit_2(tmp_path):
    assert gpu.main(["--device", "cpu", "--warmup", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert gpu.main(["--device", "cpu", "--models", "sd3", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_default_out_names_the_gpu():
    from benchmarks import OUT_DIR

    assert gpu.default_out("NVIDIA H100 80GB HBM3") == OUT_DIR / "gpu_nvidia-h100-80gb-hbm3.json"


def test_make_gpu_check_cpu_smoke(tmp_path):
    """The make target as the device runs it (no carried wheels here: the venv has diffusers)."""
    out = tmp_path / "check.json"
    env = {"PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "GPU_CHECK_SITE": str(tmp_path / "site"), "PYTHON": str(REPO / ".venv" / "bin" / "python")}
    args = f"--device cpu --quick --models sd21 --latent 8 --out {out}"
    run = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS={args}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].startswith("skipped: sd21: ")
    assert "sd21" in json.loads(out.read_text())["models"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure path")
def test_graph_failure_is_recorded_not_raised():
    s = gpu.settings_from(gpu.parse_args(["--device", "cpu", "--quick"]))
    assert "error" in gpu_measure.try_graph(lambda: None, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_path_on_gpu(tmp_path):
    report = run_json(tmp_path, "--quick", "--models", "sd21-full")
    assert "error" not in report
    assert report["env"]["gpu_name"] == torch.cuda.get_device_name(0)
    assert report["settings"]["dtype"] == "float16"
    assert report["elapsed_s"] < 300
    model = report["models"]["sd21-full"]
    assert "median_ms" in model["unet"]["graph"] or model["unet"]["graph"]["error"]
    for rec in model["transfers"]["tensors"].values():
        assert rec["d2d"]["gb_per_s"] > 0 and rec["host"]["gb_per_s"] > 0
    for name, cfg, metric, part in partitions(report):
        for c in part["components"]:
            assert c["eager_ms"] > 0 and (c["graph_ms"] or c["graph_error"]), (cfg, metric, c["index"])
        for key in ("eager_none", "eager_d2d", "eager_host"):
            assert part["speedup"][key] > 0, (cfg, metric, key)
