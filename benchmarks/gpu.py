"""AsyncDiff on one NVIDIA GPU: per-component latency, interface transfer cost, projected speedup.

    python -m benchmarks.gpu [--out benchmarks/results/gpu_<gpu-name>.json] [--steps 50]
                             [--warmup 1] [--quick] [--device cuda|cpu] [--budget-s 270]

Run from the repository root.  One GPU is enough: components are timed one at a
time on it, and the multi-GPU latency is projected from those timings.

What it measures (defaults: SD 2.1 UNet architecture ``sd21-full`` with random
weights, fp16, 768x768 images = latent 96x96, CFG batch 2):

* the full diffusers UNet, eager and as a CUDA graph;
* every stage of the stage graph (``asyncdiff.stages``), eager; these times are
  the "time" cost metric for the partitioner;
* for N2S1, N3S1, N4S1, N2S2, N3S2 two partitions -- balanced on the measured
  stage times and on FLOPs -- and for each component (``asyncdiff.components``)
  its eager time (CUDA events, warm-up calls, median of k) and its CUDA-graph
  replay time (``torch.cuda.CUDAGraph`` capture with static inputs; a failed
  capture is recorded with its reason and the eager time stands in);
  both the time share and the FLOP share of every component are reported;
* every tensor that crosses a cut, copied (a) device to device -- cuda:0 ->
  cuda:1 when two GPUs are visible, otherwise a same-device copy recorded as a
  lower bound -- and (b) staged through pinned host memory (GPU -> pinned host
  -> GPU), median of repeats, with bytes and GB/s (bytes moved / time).

Projection for config NxSy (T steps, warm-up w, both from the command line)::

    sequential = T * t_unet
    async      = w * t_unet + R * (max_k t_k + c)
    speedup    = sequential / async

``R`` is ``make_plan(T, N, S, w).parallel_rounds`` (T-w rounds for S=1,
ceil((T-w)/2) for S=2: each stride-2 round yields two steps and the extra GPU
runs the second copy of the last component at the same time), ``t_k`` is
component k's time and ``c`` is the communication on the critical path: the
largest per-consumer inbound transfer, i.e. over components k the sum of the
transfer times of the tensors k receives from other components (hidden state
and skips; for the component holding ``conv_in`` also the fresh latent, which
stands for the noise prediction's trip from the last GPU back to the first).
Tensors are copied one after another, so the sum is conservative; text
embeddings and timesteps are sent once per image and ignored.  Variants: eager
or CUDA-graph times (the baseline UNet time follows), and c = 0 / D2D /
host-staged.  The paper's Table 1 SD 2.1 speedups (RTX A5000, NVLink) are
printed beside the projections.

The "time" partitions are built with ``asyncdiff.partition.build_partition``
from stage times measured here with CUDA events, because
``partition_unet(metric="time")`` runs its example inputs in fp32 and times
with ``time.perf_counter`` without synchronising; the "flops" partitions are
exactly what ``partition_unet(metric="flops")`` returns (the FLOP profile is
computed once and reused).

A global time guard (``--budget-s``, default 270 s) skips the remaining
optional measurements (CUDA graphs, transfers, stage times) when the run gets
near the limit; skipped items are listed with their reason and the JSON is
always written.  It records the GPU name, driver/CUDA/cuDNN/torch/diffusers
versions, the command and all numbers.

Smoke mode for machines without a GPU (what the tests run)::

    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu_smoke.json

fp32, the narrowed ``sd21`` config at latent 16, few repeats; CUDA graphs and
pinned-host transfers are skipped with a reason, and the "d2d" copy is a host
memcpy (lower bound only).

Running on a GPU host that has torch with CUDA but not diffusers: diffusers is
a pure-Python wheel.  Where pip can reach the index, from the repo root::

    mkdir -p .whl && python3 -m pip download --no-deps diffusers==0.42.1 -d .whl

carry the repository (with ``.whl/``) to the host, then from the repo root::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-0.42.1-*.whl
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu

diffusers' own requirements (huggingface_hub>=1.32, safetensors>=0.8,
regex, requests, filelock, numpy, Pillow) must already be on the host.
Imports of this repository resolve from the repo root (``python -m`` puts the
working directory on ``sys.path``; running the file by path adds it too).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asyncdiff.partition import Partition, build_partition
from asyncdiff.profile import StageProfile
from asyncdiff.schedule import make_plan

SCHEMA = "asyncdiff-gpu-benchmark/1"
CONFIGS = ((2, 1), (3, 1), (4, 1), (2, 2), (3, 2))  # (N components, stride S)
METRICS = ("time", "flops")
# Paper Table 1, SD 2.1, 50 DDIM steps, RTX A5000 + NVLink (spec §5).
PAPER_TABLE1_SD21 = {"N2S1": 1.8, "N3S1": 2.3, "N4S1": 2.6, "N2S2": 3.0, "N3S2": 4.0}
RESERVE_S = 15.0  # kept back by the guard for projections and writing the JSON
VARIANTS = ("eager", "graph")
COMMS = ("none", "d2d", "host")


def label(n: int, s: int) -> str:
    return f"N{n}S{s}"


# -- settings, clock ---------------------------------------------------------------------------


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    model: str
    latent: int
    batch: int
    steps: int
    warmup: int
    iters: int  # timed calls per measurement (median taken)
    warm_iters: int  # untimed calls before them
    quick: bool
    budget_s: float

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def to_json(self) -> dict:
        d = dict(vars(self))
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["image_px"] = self.latent * 8
        return d


class Clock:
    """Elapsed time for progress lines and the global budget guard."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s + RESERVE_S < self.budget_s

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def settings_from(a: argparse.Namespace) -> Settings:
    from asyncdiff.schedule import validate

    validate(a.steps, 2, 1, a.warmup)  # ValueError names the bad field
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False (use --device cpu --quick)")
    model = a.model or ("sd21-full" if cuda else "sd21")
    from asyncdiff.configs import UNET_CONFIGS

    latent = a.latent or UNET_CONFIGS[model]["sample_size"]
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("fp16" if cuda else "fp32")]
    iters, warm = (5, 2) if a.quick else (30, 5)
    if not cuda:
        iters, warm = (3, 1) if a.quick else (10, 2)
    return Settings(a.device, dtype, model, latent, a.batch, a.steps, a.warmup,
                    a.iters or iters, a.warm_iters or warm, a.quick, a.budget_s)


# -- timing ------------------------------------------------------------------------------------


def summarize(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "n": len(ms)}


def timed(fn, s: Settings) -> dict:
    """Median of ``s.iters`` calls after ``s.warm_iters``; CUDA events time the GPU work only."""
    for _ in range(s.warm_iters):
        fn()
    if not s.cuda:
        ms = []
        for _ in range(s.iters):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        return summarize(ms)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(s.iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in events])


def graph_timed(fn, s: Settings) -> dict:
    """Capture ``fn`` (static inputs: the tensors it closes over) in a CUDA graph, time replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return timed(graph.replay, s)
    finally:
        del graph
        torch.cuda.synchronize()


def try_graph(fn, s: Settings) -> dict:
    """CUDA-graph timing, or ``{"error": reason}`` when capture or replay fails."""
    try:
        return graph_timed(fn, s)
    except Exception as e:  # noqa: BLE001 - any capture failure is a result to record
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            reason += f" (CUDA unusable afterwards: {type(e2).__name__})"
        return {"error": reason}


# -- environment, model ------------------------------------------------------------------------


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
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
        raise RuntimeError("diffusers is not importable; on a GPU host without it carry the wheel "
                           "and set PYTHONPATH (see the docstring of benchmarks/gpu.py)") from e

    env = {
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
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


def load_model(s: Settings):
    """The UNet in ``s.dtype`` on ``s.device``, its stage graph and the pipeline inputs."""
    from asyncdiff.configs import example_inputs, load_unet
    from asyncdiff.stages import build_stage_graph, check_sample_size, expand_timestep

    unet = load_unet(s.model, device=s.device).to(s.dtype)
    config = dict(unet.config)
    check_sample_size(config, s.latent, s.latent)
    sample, timestep, text, extra = example_inputs(config, s.batch, s.latent, s.latent, s.device)
    inputs = {"sample": sample.to(s.dtype), "timestep": expand_timestep(timestep, sample),
              "encoder_hidden_states": text.to(s.dtype)}
    if extra:  # SDXL-like: time ids stay float32 (they go through a sinusoidal projection)
        inputs.update(text_embeds=extra["text_embeds"].to(s.dtype), time_ids=extra["time_ids"])
    return unet, build_stage_graph(unet), inputs


@torch.no_grad()
def stage_values(graph, inputs: dict) -> tuple[dict, torch.Tensor]:
    """One pass through the stage graph: every stage's output (the components' real inputs)."""
    temb = graph.time_embedding(inputs["timestep"], inputs["sample"].dtype,
                                inputs.get("text_embeds"), inputs.get("time_ids"))
    values = dict(inputs)
    h = inputs["sample"]
    for st in graph.stages:
        skip = values[st.skip] if st.skip else None
        h = values[st.name] = st(h, skip, temb, inputs["encoder_hidden_states"])
    return values, temb


def unet_call(unet, inputs: dict):
    extra = {}
    if "text_embeds" in inputs:
        extra = {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}
    sample, timestep, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    return lambda: unet(sample, timestep, encoder_hidden_states=text, return_dict=False, **extra)


# -- stage profiles, partitions ----------------------------------------------------------------


def flops_profile(config: dict, s: Settings) -> StageProfile:
    """The FLOP profile ``partition_unet(metric="flops")`` computes, on a weightless copy."""
    from diffusers import UNet2DConditionModel

    from asyncdiff.profile import profile_stages
    from asyncdiff.stages import build_stage_graph

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(config)
    return profile_stages(build_stage_graph(meta), s.batch, s.latent, s.latent, "flops")


@torch.no_grad()
def time_profile(graph, values: dict, temb, s: Settings) -> StageProfile:
    """Per-stage eager time on this device (seconds), measured on the real stage inputs."""
    costs, prev = [], "sample"
    for st in graph.stages:
        args = (values[prev], values[st.skip] if st.skip else None, temb, values["encoder_hidden_states"])
        costs.append(timed(lambda: st(*args), s)["median_ms"] / 1e3)  # noqa: B023 - called at once
        prev = st.name
    shapes = {st.name: list(values[st.name].shape) for st in graph.stages}
    input_names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    input_shapes = {k: list(values[k].shape) for k in input_names if k in values}
    return StageProfile(graph.names, costs, shapes, input_shapes, "time")


def make_partition(profile: StageProfile, graph, n: int, stride: int, model: str) -> Partition:
    needs = {st.name: (st.needs_temb, st.needs_text) for st in graph.stages}
    return build_partition(profile, graph.skips(), needs, n, model=model, stride=stride,
                           text_time=graph.text_time)


def shares(part: Partition, profile: StageProfile | None) -> list[float] | None:
    """Each component's share of ``profile``'s total cost (another metric than the partition's)."""
    if profile is None:
        return None
    cost = dict(zip(profile.names, profile.costs))
    total = sum(profile.costs)
    return [sum(cost[st] for st in c.stages) / total for c in part.components]


# -- component timing --------------------------------------------------------------------------


def distinct_components(parts: dict, graph) -> dict:
    """One module per distinct stage run (S=2 and some time/FLOP partitions share them), with
    the label of its first use."""
    from asyncdiff.components import build_components

    out: dict[tuple, tuple] = {}
    for (cfg, metric), part in parts.items():
        for comp in build_components(graph, part):
            key = tuple(part.components[comp.index].stages)
            out.setdefault(key, (f"{cfg}/{metric}/{comp.index}", comp))
    return out


def component_fn(component, values: dict):
    args = [values[name] for name in component.input_names]
    return lambda: component(*args)


@torch.no_grad()
def time_components(comps: dict, values: dict, s: Settings, clock: Clock, skipped: list,
                    unet_s: float) -> dict:
    """Eager time of every distinct component, keyed by its stage tuple."""
    results: dict[tuple, dict] = {}
    budget = (s.iters + s.warm_iters) * unet_s  # a component never takes longer than the UNet
    for key, (what, comp) in comps.items():
        if not clock.allows(budget):
            skipped.append({"what": f"component {what}", "reason": "time guard"})
            continue
        results[key] = {"eager": timed(component_fn(comp, values), s)}
        ms = results[key]["eager"]["median_ms"]
        clock.log(f"component {what} ({key[0]}..{key[-1]}): eager {ms:.3f} ms")
    return results


@torch.no_grad()
def graph_components(comps: dict, results: dict, values: dict, s: Settings, clock: Clock,
                     skipped: list) -> None:
    """Add CUDA-graph replay times; after a capture that leaves CUDA unusable, skip the rest."""
    broken = None
    for key, (what, comp) in comps.items():
        if key not in results:
            continue
        if broken:
            results[key]["graph"] = {"error": f"skipped: {broken}"}
            continue
        graph = results[key]["graph"] = _graph_or_skip(component_fn(comp, values), s, clock, skipped, what)
        if "CUDA unusable" in graph.get("error", ""):
            broken = f"CUDA unusable after the capture of {what}"
            skipped.append({"what": "remaining CUDA graphs", "reason": broken})
        clock.log(f"component {what}{_graph_note(graph)}")


def _graph_or_skip(fn, s, clock, skipped, what) -> dict:
    if not clock.allows(5.0):
        skipped.append({"what": f"CUDA graph {what}", "reason": "time guard"})
        return {"error": "skipped: time guard"}
    return try_graph(fn, s)


def _graph_note(graph: dict | None) -> str:
    if graph is None:
        return ""
    if "median_ms" in graph:
        return f", graph {graph['median_ms']:.3f} ms"
    return f", graph failed ({graph['error']})"


# -- transfers ---------------------------------------------------------------------------------


def interface_tensors(parts: dict) -> list[str]:
    """Every tensor that crosses a cut in some partition, plus the latent (the noise
    prediction's way back to the first component), in first-seen order."""
    names = ["sample"]
    for part in parts.values():
        for comp in part.components:
            names += [t.name for t in comp.inputs if t.producer is not None and t.name not in names]
    return names


def d2d_mode(s: Settings) -> tuple[str, str | None]:
    if not s.cuda:
        return "host memcpy (smoke, lower bound)", "no GPU: d2d not measured"
    if torch.cuda.device_count() > 1:
        peer = torch.cuda.can_device_access_peer(0, 1)
        return f"cuda:0 -> cuda:1 (peer access {'on' if peer else 'off'})", None
    return "same-device copy (lower bound)", "single GPU: d2d not measured"


def measure_transfers(names: list[str], values: dict, s: Settings, clock: Clock, skipped: list) -> dict:
    mode, note = d2d_mode(s)
    out = {"d2d_mode": mode, "d2d_note": note, "host_mode": None, "tensors": {}}
    if s.cuda:
        out["host_mode"] = "cuda:0 -> pinned host -> cuda:0 (non_blocking copies, one stream)"
    else:
        skipped.append({"what": "host-staged transfers", "reason": "no CUDA device: no pinned-host staging"})
    for name in names:
        if not clock.allows(2.0):
            skipped.append({"what": f"transfer {name}", "reason": "time guard"})
            continue
        out["tensors"][name] = transfer(values[name], s)
    clock.log(f"transfers: {len(out['tensors'])} tensors, d2d = {mode}")
    return out


def transfer(t: torch.Tensor, s: Settings) -> dict:
    nbytes = t.numel() * t.element_size()
    rec = {"shape": list(t.shape), "bytes": nbytes}
    target = "cuda:1" if s.cuda and torch.cuda.device_count() > 1 else t.device
    dst = torch.empty_like(t, device=target)
    rec["d2d"] = _with_rate(timed(lambda: dst.copy_(t), s), nbytes)
    if s.cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        back = torch.empty_like(t)

        def staged():
            host.copy_(t, non_blocking=True)
            back.copy_(host, non_blocking=True)

        rec["host"] = _with_rate(timed(staged, s), nbytes)
    return rec


def _with_rate(stats: dict, nbytes: int) -> dict:
    ms = stats["median_ms"]
    return {**stats, "gb_per_s": nbytes / (ms * 1e-3) / 1e9 if ms > 0 else None}


# -- projection --------------------------------------------------------------------------------


def speedup(steps: int, warmup: int, rounds: int, unet_ms: float, comp_ms: float, comm_ms: float) -> float:
    """T * t_unet / (w * t_unet + R * (max component + critical communication))."""
    return steps * unet_ms / (warmup * unet_ms + rounds * (comp_ms + comm_ms))


def inbound(part: Partition, k: int) -> list[str]:
    comp = part.components[k]
    return [t.name for t in comp.inputs if t.producer is not None or t.name == "sample"]


def critical_comm(part: Partition, transfers: dict, kind: str) -> tuple[float | None, int | None]:
    """(largest per-consumer inbound transfer time in ms, that consumer), None if unmeasured."""
    tensors = transfers["tensors"]
    best, who = 0.0, None
    for k in range(part.num_components):
        names = inbound(part, k)
        if any(kind not in tensors.get(n, {}) for n in names):
            return None, None
        ms = sum(tensors[n][kind]["median_ms"] for n in names)
        if who is None or ms > best:
            best, who = ms, k
    return best, who


def component_time(timing: dict, variant: str) -> float:
    """Eager median, or the graph replay median (eager when the capture failed or was skipped)."""
    graph = timing.get("graph", {})
    if variant == "graph" and "median_ms" in graph:
        return graph["median_ms"]
    return timing["eager"]["median_ms"]


def describe_partition(part, profiles, timings, transfers, s: Settings, unet: dict) -> dict:
    """Per-component numbers, critical communication and projected speedups of one partition."""
    tensors = transfers["tensors"]
    t_share, f_share = shares(part, profiles.get("time")), shares(part, profiles.get("flops"))
    comps = []
    for c in part.components:
        timing = timings.get(tuple(c.stages))
        names = inbound(part, c.index)
        comps.append({
            "index": c.index, "stages": c.stages, "time_share": t_share and t_share[c.index],
            "flops_share": f_share and f_share[c.index],
            "eager_ms": timing and timing["eager"]["median_ms"],
            "graph_ms": timing and timing.get("graph", {}).get("median_ms"),
            "graph_error": timing and timing.get("graph", {}).get("error"),
            "inputs": [{"name": t.name, "role": t.role, "producer": t.producer} for t in c.inputs],
            "inbound": names,
            "inbound_bytes": sum(tensors[n]["bytes"] for n in names if n in tensors),
        })
    out = {"components": comps, "comm": {}, "max_ms": {}, "speedup": {}, "latency_s": {}}
    for kind in ("d2d", "host"):
        ms, who = critical_comm(part, transfers, kind)
        out["comm"][kind] = {"ms": ms, "consumer": who}
    if any(c["eager_ms"] is None for c in comps):
        out["projection_error"] = "some component was not timed (time guard)"
        return out
    rounds = make_plan(s.steps, part.num_components, part.stride, s.warmup).parallel_rounds
    out["rounds"] = rounds
    for variant in VARIANTS:
        t_unet = unet.get(variant, {}).get("median_ms")
        if t_unet is None:  # no full-UNet graph time: no graph baseline to compare against
            continue
        comp_max = max(component_time(timings[tuple(c.stages)], variant) for c in part.components)
        out["max_ms"][variant] = comp_max
        for comm in COMMS:
            ms = 0.0 if comm == "none" else out["comm"][comm]["ms"]
            key = f"{variant}_{comm}"
            if ms is None:
                out["speedup"][key] = out["latency_s"][key] = None
                continue
            out["speedup"][key] = speedup(s.steps, s.warmup, rounds, t_unet, comp_max, ms)
            out["latency_s"][key] = (s.warmup * t_unet + rounds * (comp_max + ms)) / 1e3
    out["sequential_s"] = {v: s.steps * unet[v]["median_ms"] / 1e3
                           for v in VARIANTS if "median_ms" in unet.get(v, {})}
    return out


# -- report ------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", width=6) -> str:
    return f"{x:{width}{spec}}" if isinstance(x, (int, float)) and x is not None else f"{'-':>{width}}"


def print_tables(report: dict) -> None:
    print("\nComponents (shares of measured stage time / of FLOPs; times are medians)")
    print(f"{'config':6s} {'part':5s} {'k':>2s} {'stages':22s} {'t-shr':>6s} {'f-shr':>6s} "
          f"{'eager':>8s} {'graph':>8s} {'in MB':>7s}")
    for cfg, entry in report["configs"].items():
        for metric, part in entry["partitions"].items():
            for c in part["components"]:
                span = f"{c['stages'][0]}..{c['stages'][-1]}"
                print(f"{cfg:6s} {metric:5s} {c['index']:2d} {span:22s} "
                      f"{_pct(c['time_share'])} {_pct(c['flops_share'])} {_fmt(c['eager_ms'], '.3f', 8)} "
                      f"{_fmt(c['graph_ms'], '.3f', 8)} {c['inbound_bytes'] / 1e6:7.2f}")
    s = report["settings"]
    print(f"\nProjected speedup, T={s['steps']} w={s['warmup']} (speedup = T*t_unet / "
          f"(w*t_unet + R*(max comp + comm)); comm: none / d2d / host-staged)")
    print(f"{'config':6s} {'GPUs':>4s} {'R':>3s} {'part':5s} {'max eager':>9s} {'d2d ms':>7s} "
          f"{'host ms':>7s} {'eager: none   d2d  host':>24s} {'graph: none   d2d  host':>24s} {'paper':>6s}")
    for cfg, entry in report["configs"].items():
        for metric, part in entry["partitions"].items():
            sp = part.get("speedup", {})
            cells = [_fmt(sp.get(f"{v}_{c}")) for v in VARIANTS for c in COMMS]
            print(f"{cfg:6s} {entry['gpus']:4d} {_fmt(part.get('rounds'), 'd', 3)} {metric:5s} "
                  f"{_fmt(part['max_ms'].get('eager'), '.3f', 9)} "
                  f"{_fmt(part['comm']['d2d']['ms'], '.3f', 7)} "
                  f"{_fmt(part['comm']['host']['ms'], '.3f', 7)}       {' '.join(cells[:3])}       "
                  f"{' '.join(cells[3:])} {_fmt(entry['paper_table1_speedup'], '.1f')}")
    note = report.get("transfers", {}).get("d2d_note")
    if note:
        print(f"note: {note}; the d2d column is a {report['transfers']['d2d_mode']}")
    for item in report["skipped"]:
        print(f"skipped: {item['what']}: {item['reason']}")


def _pct(x) -> str:
    return f"{100 * x:5.1f}%" if x is not None else f"{'-':>6s}"


def default_out(gpu_name: str | None) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu_name or "cpu-smoke").lower()).strip("-")
    return Path("benchmarks/results") / f"gpu_{slug}.json"


# -- main --------------------------------------------------------------------------------------


def measure_profiles(graph, values, temb, unet, unet_s, s, clock, skipped) -> dict:
    """The FLOP profile always; the stage time profile unless the guard says no."""
    profiles = {"flops": flops_profile(dict(unet.config), s)}
    clock.log("FLOP profile done")
    if clock.allows(len(graph.stages) * (s.iters + s.warm_iters) * unet_s / 10):
        profiles["time"] = time_profile(graph, values, temb, s)
        clock.log("stage time profile done")
    else:
        skipped.append({"what": "stage time profile and 'time' partitions", "reason": "time guard"})
    return profiles


def measure_graphs(unet, inputs, comps, timings, values, s, clock, skipped) -> dict:
    """Full-UNet graph first (the graph projections' baseline), then every component."""
    with torch.no_grad():
        unet_graph = _graph_or_skip(unet_call(unet, inputs), s, clock, skipped, "full UNet")
    clock.log("full UNet" + _graph_note(unet_graph))
    graph_components(comps, timings, values, s, clock, skipped)
    return unet_graph


def run(s: Settings, report: dict, clock: Clock) -> None:
    skipped = report["skipped"]
    report["env"] = environment(s)
    clock.log(f"device {report['env']['gpu_name'] or 'cpu'}; loading {s.model} "
              f"({str(s.dtype).removeprefix('torch.')}, latent {s.latent}, batch {s.batch})")
    unet, graph, inputs = load_model(s)
    values, temb = stage_values(graph, inputs)
    report["output_finite"] = bool(torch.isfinite(values[graph.names[-1]]).all())
    with torch.no_grad():
        report["unet"] = {"params": sum(p.numel() for p in unet.parameters()),
                          "eager": timed(unet_call(unet, inputs), s)}
    unet_ms = report["unet"]["eager"]["median_ms"]
    clock.log(f"full UNet eager {unet_ms:.2f} ms")

    profiles = measure_profiles(graph, values, temb, unet, unet_ms / 1e3, s, clock, skipped)
    report["stage_profile"] = {
        "names": graph.names, "flops": profiles["flops"].costs,
        "time_ms": [c * 1e3 for c in profiles["time"].costs] if "time" in profiles else None,
    }
    parts = {(label(n, st), m): make_partition(profiles[m], graph, n, st, s.model)
             for n, st in CONFIGS for m in METRICS if m in profiles}
    comps = distinct_components(parts, graph)
    timings = time_components(comps, values, s, clock, skipped, unet_ms / 1e3)
    report["transfers"] = measure_transfers(interface_tensors(parts), values, s, clock, skipped)
    if s.cuda:
        report["unet"]["graph"] = measure_graphs(unet, inputs, comps, timings, values, s, clock, skipped)
    else:
        skipped.append({"what": "CUDA graphs", "reason": "no CUDA device"})

    for n, st in CONFIGS:
        cfg = label(n, st)
        entry = {"n": n, "stride": st, "gpus": n + st - 1, "paper_table1_speedup": PAPER_TABLE1_SD21[cfg],
                 "partitions": {}}
        for m in METRICS:
            if (cfg, m) in parts:
                entry["partitions"][m] = describe_partition(
                    parts[(cfg, m)], profiles, timings, report["transfers"], s, report["unet"])
        report["configs"][cfg] = entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_<gpu-name>.json)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps T for the projection")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps w for the projection")
    p.add_argument("--quick", action="store_true", help="few repeats (tests, smoke runs)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu = smoke mode")
    p.add_argument("--model", help="UNet config (default sd21-full on cuda, sd21 on cpu)")
    p.add_argument("--latent", type=int, help="latent side (default: the config's sample_size)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one prompt with CFG)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--iters", type=int, help="timed calls per measurement (median)")
    p.add_argument("--warm-iters", type=int, help="untimed calls before them")
    p.add_argument("--budget-s", type=float, default=270.0, help="global time guard in seconds")
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
              "formula": "speedup = T*t_unet / (w*t_unet + R*(max_k t_k + c)); R = parallel rounds, "
                         "c = largest per-consumer inbound transfer",
              "configs": {}, "skipped": []}
    status = 0
    try:
        run(s, report, clock)
    except Exception:  # noqa: BLE001 - keep what was measured, then fail
        report["error"] = traceback.format_exc()
        status = 1
    report["elapsed_s"] = clock.elapsed()
    out = a.out or default_out(report.get("env", {}).get("gpu_name") or ("unknown-gpu" if s.cuda else None))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if status == 0:
        print_tables(report)
    else:
        print(report["error"], file=sys.stderr)
    clock.log(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
