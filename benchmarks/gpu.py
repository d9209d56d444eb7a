"""AsyncDiff on one NVIDIA GPU: per-component latency, fp16 parity, transfer cost, projected speedup.

    python -m benchmarks.gpu [--out benchmarks/out/gpu_<gpu-name>.json] [--steps 50]
                             [--warmup 1] [--quick] [--device cuda|cpu] [--budget-s 250]
                             [--models sd21-full,sdxl-full]

``make gpu-check`` runs it (``benchmarks/gpu_check.sh``: carried wheels first). One GPU is
enough: components are timed one at a time on it, and the multi-GPU latency is projected.

Per model (defaults on cuda: ``sd21-full`` at 768x768 and ``sdxl-full`` at 1024x1024, random
weights, fp16, CFG batch 2):

* the full diffusers UNet, eager and as a CUDA graph;
* every stage's eager time (``asyncdiff.profile.profile_stages``, CUDA events), the "time" cost
  of the partitioner; the FLOP profile on a weightless copy;
* for N2S1, N3S1, N4S1, N2S2, N3S2 the partitions balanced on measured time and on FLOPs, and
  every distinct component's eager and CUDA-graph replay time (a failed capture is recorded
  with its reason; the eager time stands in);
* fp16 vs fp32 parity: each component of the FLOP partitions in fp16 and in fp32, same weights,
  same fp32 inputs; max abs error and ||fp16 - fp32|| / ||fp32|| per output, and the whole
  stage graph end to end;
* every tensor that crosses a cut, copied device to device (cuda:0 -> cuda:1 with two GPUs,
  else a same-device copy: a lower bound) and staged through pinned host memory.

Projected speedups come from the one cost model, ``asyncdiff.cost.project(plan, placement,
component costs, transfer cost, denoiser cost)``: component costs are the measured component
times (eager or graph), the transfer cost is the largest per-consumer inbound transfer of a
round (none / d2d / host-staged), the denoiser cost the measured full UNet. ``ideal`` is the
same model with balanced components and free transfers. The paper's Table 1 SD 2.1 speedups
(RTX A5000, NVLink) are printed beside sd21-full.

A time guard (``--budget-s``, default 250 s, split evenly between models as they come) skips
what remains (stage times, components, transfers, CUDA graphs) near the limit; skipped items are
listed with their reason, and the JSON is rewritten after every model, so a run that is killed
keeps what it measured.

Smoke mode without a GPU (what CI runs)::

    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu_smoke.json

fp32 timing of the narrowed ``sd21`` and ``sdxl`` configs at latent 16 (parity still compares
fp16 with fp32); CUDA graphs and pinned-host transfers are skipped with a reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asyncdiff.partition import Partition, build_partition
from asyncdiff.placement import Placement
from asyncdiff.profile import StageProfile, cast_inputs, profile_stages, stage_inputs
from benchmarks import output_path
from benchmarks.gpu_measure import (
    Clock, Settings, graph_components, graph_note, graph_or_skip, measure_transfers, parity,
    time_components, timed,
)
from benchmarks.gpu_report import describe_partition, ideal, print_components, print_summary

SCHEMA = "asyncdiff-gpu-benchmark/2"
CONFIGS = ((2, 1), (3, 1), (4, 1), (2, 2), (3, 2))  # (N components, stride S)
METRICS = ("time", "flops")
GPU_MODELS = ("sd21-full", "sdxl-full")
SMOKE_MODELS = ("sd21", "sdxl")
# Paper Table 1, SD 2.1, 50 DDIM steps, RTX A5000 + NVLink (spec §5).
PAPER_TABLE1 = {"sd21-full": {"N2S1": 1.8, "N3S1": 2.3, "N4S1": 2.6, "N2S2": 3.0, "N3S2": 4.0}}
PARITY_DTYPE = torch.float16


def label(n: int, s: int) -> str:
    return f"N{n}S{s}"


def settings_from(a: argparse.Namespace) -> Settings:
    from asyncdiff.configs import UNET_CONFIGS
    from asyncdiff.schedule import validate

    validate(a.steps, 2, 1, a.warmup)  # ValueError names the bad field
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False (use --device cpu --quick)")
    models = a.models.split(",") if a.models else list(GPU_MODELS if cuda else SMOKE_MODELS)
    unknown = [m for m in models if m not in UNET_CONFIGS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; allowed: {', '.join(UNET_CONFIGS)}")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("fp16" if cuda else "fp32")]
    iters, warm = ((5, 2) if a.quick else (20, 3)) if cuda else ((3, 1) if a.quick else (10, 2))
    return Settings(a.device, dtype, models, a.latent, a.batch, a.steps, a.warmup,
                    a.iters or iters, a.warm_iters or warm, a.quick, a.budget_s)


# -- environment, model ------------------------------------------------------------------------


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(s: Settings) -> dict:
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError("diffusers is not importable; on a GPU host without it run "
                           "`make gpu-check` with the wheels in .whl/ (docs/benchmarks-gpu.md)") from e

    env = {
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
    }
    if not s.cuda:
        return {**env, "gpu_name": None, "gpu_count": 0, "driver": None}
    props = torch.cuda.get_device_properties(0)
    return {
        **env, "gpu_name": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
        "capability": list(torch.cuda.get_device_capability(0)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count, "driver": driver_version(),
    }


def unet_call(unet, inputs: dict):
    extra = {}
    if "text_embeds" in inputs:
        extra = {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}
    sample, timestep, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    return lambda: unet(sample, timestep, encoder_hidden_states=text, return_dict=False, **extra)


def flops_profile(config: dict, batch: int, latent: int) -> StageProfile:
    """The FLOP profile ``partition_unet(metric="flops")`` computes, on a weightless copy."""
    from diffusers import UNet2DConditionModel

    from asyncdiff.stages import build_stage_graph

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(config)
    return profile_stages(build_stage_graph(meta), batch, latent, latent, "flops")


def make_partition(profile: StageProfile, graph, n: int, stride: int, model: str) -> Partition:
    needs = {st.name: (st.needs_temb, st.needs_text) for st in graph.stages}
    return build_partition(profile, graph.skips(), needs, n, model=model, stride=stride,
                           text_time=graph.text_time)


def distinct_components(parts: dict, graph, tag: str = "") -> dict:
    """One module per distinct stage run (S=2 and some time/FLOP partitions share them), with
    the label of its first use (after ``tag``), keyed by the stage tuple."""
    from asyncdiff.components import build_components

    out: dict[tuple, tuple] = {}
    for (cfg, metric), part in parts.items():
        for comp in build_components(graph, part):
            out.setdefault(tuple(part.components[comp.index].stages), (f"{tag}{cfg}/{metric}/{comp.index}", comp))
    return out


def interface_tensors(parts: dict) -> list[str]:
    """Every tensor that crosses a cut in some partition, plus the latent (the noise
    prediction's way back to the first component), in first-seen order."""
    names = ["sample"]
    for part in parts.values():
        for comp in part.components:
            names += [t.name for t in comp.inputs if t.producer is not None and t.name not in names]
    return names


# -- one model ---------------------------------------------------------------------------------


def measure_parity(unet32, graph32, inputs32: dict, flops_parts: dict, low) -> dict:
    """fp16 vs fp32 on the FLOP partitions' components (``low``: the fp16 UNet, or None)."""
    from asyncdiff.stages import build_stage_graph

    low = low if low is not None else copy.deepcopy(unet32).to(PARITY_DTYPE)
    graph_low = build_stage_graph(low)
    c32, c_low = distinct_components(flops_parts, graph32), distinct_components(flops_parts, graph_low)
    pairs = {key: (what, comp, c_low[key][1]) for key, (what, comp) in c32.items()}
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # A true fp32 reference: cuDNN convolutions would otherwise run in TF32 on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            values32 = graph32.run(dict(inputs32))
            end_to_end = graph_low.run(cast_inputs(graph_low, inputs32))[graph_low.names[-1]]
        return {**parity(pairs, values32, cast_inputs(graph_low, values32), end_to_end,
                         graph32.names[-1], PARITY_DTYPE), "fp32_reference": "TF32 off"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def run_model(name: str, s: Settings, clock: Clock, report: dict) -> None:
    from asyncdiff.configs import UNET_CONFIGS, load_unet
    from asyncdiff.stages import build_stage_graph

    skipped = report["skipped"]
    model = report["models"][name] = {}
    latent = s.latent or UNET_CONFIGS[name]["sample_size"]
    model.update(latent=latent, image_px=latent * 8)
    clock.log(f"{name}: loading ({str(s.dtype).removeprefix('torch.')}, latent {latent}, batch {s.batch})")
    unet32 = load_unet(name, device=s.device)
    graph32 = build_stage_graph(unet32)
    inputs32 = stage_inputs(graph32, s.batch, latent, latent)
    unet = unet32 if s.dtype == torch.float32 else copy.deepcopy(unet32).to(s.dtype)
    graph = graph32 if unet is unet32 else build_stage_graph(unet)
    inputs = cast_inputs(graph, inputs32)
    with torch.no_grad():
        values = graph.run(dict(inputs))
        model["output_finite"] = bool(torch.isfinite(values[graph.names[-1]]).all())
        model["unet"] = {"params": sum(p.numel() for p in unet.parameters()),
                         "eager": timed(unet_call(unet, inputs), s)}
    unet_s = model["unet"]["eager"]["median_ms"] / 1e3
    clock.log(f"{name}: full UNet eager {unet_s * 1e3:.2f} ms")

    profiles = {"flops": flops_profile(dict(unet.config), s.batch, latent)}
    parts = {(label(n, st), "flops"): make_partition(profiles["flops"], graph, n, st, name) for n, st in CONFIGS}
    try:
        model["parity"] = measure_parity(unet32, graph32, inputs32, parts,
                                         unet if s.dtype == PARITY_DTYPE else None)
    except Exception as e:  # noqa: BLE001 - e.g. a CPU without fp16 kernels: record, go on
        model["parity"] = {"error": f"{type(e).__name__}: {e}"}
    clock.log(f"{name}: fp16 vs fp32 parity {model['parity'].get('max_component_rel_l2', model['parity'].get('error'))}")
    if unet is not unet32:
        del unet32, graph32
    if s.cuda:
        torch.cuda.empty_cache()

    if clock.allows(len(graph.stages) * (s.iters + s.warm_iters) * unet_s / 10 + 2 * unet_s):
        profiles["time"] = profile_stages(graph, metric="time", repeats=s.iters, warmup=s.warm_iters,
                                          inputs=inputs)
        parts.update({(label(n, st), "time"): make_partition(profiles["time"], graph, n, st, name)
                      for n, st in CONFIGS})
        clock.log(f"{name}: stage time profile done")
    else:
        skipped.append({"what": f"{name}: stage time profile and 'time' partitions", "reason": "time guard"})
    model["stage_profile"] = {
        "names": graph.names, "flops": profiles["flops"].costs,
        "time_ms": [c * 1e3 for c in profiles["time"].costs] if "time" in profiles else None,
    }
    parts = {key: parts[key] for key in sorted(parts, key=lambda k: (_cfg_order(k[0]), METRICS.index(k[1])))}
    comps = distinct_components(parts, graph, f"{name} ")
    timings = time_components(comps, values, s, clock, skipped, unet_s)
    model["transfers"] = measure_transfers(interface_tensors(parts), values, s, clock, skipped, name)
    if s.cuda:
        with torch.no_grad():
            model["unet"]["graph"] = graph_or_skip(unet_call(unet, inputs), s, clock, skipped, f"{name} UNet")
        clock.log(f"{name}: full UNet{graph_note(model['unet']['graph'])}")
        graph_components(comps, timings, values, s, clock, skipped)
    else:
        skipped.append({"what": f"{name}: CUDA graphs", "reason": "no CUDA device"})

    model["configs"] = {}
    for n, st in CONFIGS:
        cfg = label(n, st)
        place = Placement(n, st)
        entry = {"n": n, "stride": st, "gpus": place.world_size, "placement": place.to_json(),
                 "ideal_balanced": ideal(n, st, s.steps, s.warmup),
                 "paper_speedup": PAPER_TABLE1.get(name, {}).get(cfg), "partitions": {}}
        for m in METRICS:
            if (cfg, m) in parts:
                entry["partitions"][m] = describe_partition(
                    parts[(cfg, m)], profiles, timings, model["transfers"], s.steps, s.warmup, model["unet"])
        model["configs"][cfg] = entry
    del unet, graph, values, comps
    if s.cuda:
        torch.cuda.empty_cache()


def _cfg_order(cfg: str) -> int:
    return [label(n, st) for n, st in CONFIGS].index(cfg)


# -- main --------------------------------------------------------------------------------------


def default_out(gpu_name: str | None) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu_name or "cpu-smoke").lower()).strip("-")
    return output_path(f"gpu_{slug}.json")


def write_json(report: dict, out: Path) -> None:
    """Write through a temporary file, so a kill mid-write leaves the previous version."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/out/gpu_<gpu-name>.json)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps T for the projection")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps w for the projection")
    p.add_argument("--quick", action="store_true", help="few repeats (tests, smoke runs)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu = smoke mode")
    p.add_argument("--models", help="comma-separated UNet configs (default sd21-full,sdxl-full on "
                                    "cuda, sd21,sdxl on cpu)")
    p.add_argument("--latent", type=int, help="latent side for every model (default: each config's)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one prompt with CFG)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--iters", type=int, help="timed calls per measurement (median)")
    p.add_argument("--warm-iters", type=int, help="untimed calls before them")
    p.add_argument("--budget-s", type=float, default=250.0, help="time guard for the whole run, seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    clock = Clock(a.budget_s)
    try:
        s = settings_from(a)
    except (ValueError, KeyError) as e:
        print(f"python -m benchmarks.gpu: error: {e}", file=sys.stderr)
        return 2
    report = {"schema": SCHEMA, "command": "python -m benchmarks.gpu " + shlex.join(argv),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": s.to_json(),
              "cost_model": "asyncdiff.cost.project(plan, Placement(N, S), measured component ms, "
                            "largest per-consumer inbound transfer ms, full UNet ms)",
              "models": {}, "skipped": []}
    status, out = 0, a.out
    try:
        report["env"] = environment(s)
        out = out or default_out(report["env"]["gpu_name"] or ("unknown-gpu" if s.cuda else None))
        clock.log(f"device {report['env']['gpu_name'] or 'cpu'}, models {', '.join(s.models)}")
        for i, name in enumerate(s.models):
            clock.share(len(s.models) - i)
            try:
                run_model(name, s, clock, report)
            finally:
                report["elapsed_s"] = clock.elapsed()
                write_json(report, out)
    except BaseException as e:  # noqa: BLE001 - keep what was measured, then fail
        report["error"] = traceback.format_exc()
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
    report["elapsed_s"] = clock.elapsed()
    out = out or default_out("unknown-gpu" if s.cuda else None)
    write_json(report, out)
    for name, model in report["models"].items():
        print_components(name, model)
    if status:
        print(report["error"], file=sys.stderr)
    clock.log(f"wrote {out}")
    print_summary(report)
    return status


if __name__ == "__main__":
    sys.exit(main())
