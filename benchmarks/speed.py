"""AsyncDiff speed on a CPU machine: sequential vs N2S1 vs batched N2S2, in-process and via Triton.

    python -m benchmarks.speed [--quick] [--json benchmarks/results/speed.json]

Each CPU core stands in for one device, with one torch/onnxruntime thread each.

* Both parts run the UNet of the benchmark pipeline (``benchmarks.bench_pipeline``: the
  SD 1.5 block structure at 0.3x width, random weights, latent 32, compute-bound).
* In-process: the torch.distributed runner.  Two rank processes build every variant
  once, then run them in rotating order (ABC, BCA, CAB, ...) so load from other jobs
  hits all alike.
* Triton: the benchmark pipeline exported for N=1, N=2 S=1 and N=2 S=2 batched
  (onnxruntime), one server each, requests rotated the same way; Triton's statistics
  API splits each request's time.

Ideal speedups come from the one cost model, ``asyncdiff.cost.project(plan,
Placement(N, S, batched stride), component costs)`` with free communication: a warm-up
step costs one UNet, a round the busiest device (with batched stride the last device runs
its component twice).  "perfect" uses ``balanced(N, batched)`` costs (1/N each; 2/(2N-1)
and half that for the last with batched S=2), "partition" the FLOP shares of the
partition actually run.

Per-step orchestration overhead (same definition for both executors):
  in-process: (wall - max over ranks of compute) / T
  Triton:     (e2e - text_encoder - vae_decoder - max over components of compute) / T
Both include waiting for the other device (warm-up, imbalance), not only messaging.

Ends with one line: ``speedup_n2s1_local=<x> speedup_n2s1_triton=<y> ideal=<z>``.

``--model`` picks the in-process denoiser: a UNet or DiT folder, a built-in UNet, or a built-in
DiT (``sd3-bench``: SD3's structure, ~0.3 s per call at latent 32).  A built-in DiT is written
once as a folder (random weights, SD3's flow-matching scheduler) and run by the same runner,
with the same conditioning roles (``asyncdiff.runners.job.make_conditioning``: text states,
pooled projections, ...).  The Triton part exports the UNet benchmark pipeline only, so it is
skipped for a DiT; ``--with-unet`` runs the UNet's in-process part too, in the same run, so the
DiT's speedups are reported beside the UNet's.  ``--check``: each variant's latents are
compared with the in-process LocalRunner on the same plan, and the sequential run with the
whole denoiser called step by step (no components), as diffusers' pipelines call it.

``--sdxl`` (separate, not part of the default run): the paper's SDXL configurations
(N 2-4, S 1-2, warm-up 1 for S=1 and 9 for S=2, T=50) on the built-in ``sdxl-full``
architecture (random weights).  Each stage of the UNet is timed once on this machine
(median of 3 calls, one thread, at ``--sdxl-latent``, default 16: a 128 px image, as a
full 1024 px call takes minutes per step here); each configuration is cut (outer ring and
sequential, balanced by the measured times) and its speedup projected by the cost model
from the measured component times, beside the projection from FLOP shares.  The
configurations need up to N+1 devices, more than this machine's 2 cores, so they are
projected, not run in parallel.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

VARIANTS = {  # name -> (components, stride, batched stride)
    "seq": (1, 1, False),
    "n2s1": (2, 1, False),
    "n2s2b": (2, 2, True),
}
LABELS = {"seq": "sequential (N=1)", "n2s1": "N2S1", "n2s2b": "N2S2 batched"}


@dataclass
class Settings:
    model: str | None = None  # None: the benchmark pipeline's UNet
    latent: int = 32
    steps: int = 20
    warmup: int = 1
    reps: int = 3
    triton: bool = True
    triton_n2s2: bool = True
    workdir: str | None = None  # keep/reuse the benchmark pipeline here (default: a temp dir)
    validate: bool = True  # parity-check the exports (quick skips it: the export tests do it)
    check: bool = False  # compare each variant's latents with LocalRunner and the plain loop
    with_unet: bool = False  # also run the benchmark UNet in-process (beside a DiT)


QUICK = dict(steps=7, validate=False)


# -- helpers -----------------------------------------------------------------------

def rotations(names: list[str], reps: int) -> list[list[str]]:
    """Rep r runs the variants rotated by r: each variant takes each position equally."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(reps)]


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, stamped with seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ideal_speedups(partition, plan) -> dict:
    """(perfect balance, this partition) speedups of ``plan`` vs one device, from the cost model:
    free communication, component costs = balanced shares, or the partition's FLOP shares."""
    from asyncdiff.cost import balanced, project
    from asyncdiff.placement import Placement

    n = plan.components
    placement = Placement(n, plan.stride, partition.batched_stride)
    shares = [partition.cost_share(k) for k in range(n)]
    perfect = project(plan, placement, balanced(n, partition.batched_stride))
    return {"perfect": perfect.speedup, "partition": project(plan, placement, shares).speedup,
            "warmup_steps": perfect.warmup_steps, "rounds": perfect.rounds, "shares": shares}


def machine_info() -> dict:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "loadavg_start": os.getloadavg()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# -- in-process: the torch.distributed runner ------------------------------------------

def run_configs(s: Settings) -> dict:
    from asyncdiff.runners.distributed import RunConfig

    scheduler = model_scheduler(s.model)
    return {name: RunConfig(model=s.model, components=n, stride=st, batched_stride=b,
                            warmup=s.warmup, steps=s.steps, latent=s.latent, scheduler=scheduler)
            for name, (n, st, b) in VARIANTS.items()}


def model_scheduler(model: str) -> str:
    """``flowmatch-euler`` for a model whose scheduler is flow matching (SD3), else DDIM."""
    from asyncdiff.contract import FLOW_MATCH_EULER
    from asyncdiff.generation import is_flow_matching
    from asyncdiff.runners.job import scheduler_config

    return FLOW_MATCH_EULER if is_flow_matching(scheduler_config(model)) else "ddim"


def is_dit(model: str) -> bool:
    from asyncdiff.configs import denoiser_kind, load_denoiser

    return denoiser_kind(load_denoiser(model, device="meta").config) != "unet"


# SD3's scheduler (FlowMatchEulerDiscreteScheduler as stable-diffusion-3-medium configures it).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def dit_folder(name: str, out: Path, seed: int = 0) -> Path:
    """A built-in DiT written as a pipeline folder (``transformer/``, ``scheduler/``) that every
    rank loads: seeded random weights and SD3's flow-matching scheduler.  Reused when already
    written for this config and seed."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from asyncdiff.configs import DIT_CONFIGS, denoiser_kind, load_denoiser

    if denoiser_kind(DIT_CONFIGS[name]) != "sd3":
        raise ValueError(f"--model {name}: the runner's seeded conditioning takes [B, C, h, w] "
                         "latents (asyncdiff.runners.job.make_conditioning); FLUX's packed "
                         "latents do not run in-process yet")
    out = Path(out)
    stamp = out / "bench_config.json"
    wanted = json.dumps({"transformer": DIT_CONFIGS[name], "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    load_denoiser(name, seed=seed).save_pretrained(out / "transformer")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(out / "scheduler")
    stamp.write_text(wanted)  # last: a half-written folder is rewritten
    return out


def local_model(model: str | None, workdir: Path) -> str:
    """What the runner loads: the benchmark pipeline by default, a built-in DiT as a folder."""
    from asyncdiff.configs import DIT_CONFIGS

    if model is None:
        from benchmarks import bench_pipeline as bp

        return str(bp.build(workdir / "pipeline"))
    if model in DIT_CONFIGS:
        return str(dit_folder(model, workdir / model))
    return model


def _state_bytes(runner) -> int:
    comps = [c for c in runner.local.components if c is not None]
    return sum(v.numel() * v.element_size() for c in comps for v in c.state_dict().values())


def _local_worker(rank: int, world: int, port: int, cfgs: dict, reps: int, out_q,
                  check: bool = False) -> None:
    import torch.distributed as dist

    from asyncdiff.runners import distributed as D

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    D.init_group(rank, world, port)
    torch.set_num_threads(1)  # one core = one device
    try:
        # Build every variant once: rebuilding sd15-full per run would cost more than the runs.
        runners = {k: D.DistributedRunner(c, rank) if rank < c.world_size else None
                   for k, c in cfgs.items()}
        out_q.put(("weights", rank, {k: _state_bytes(r) for k, r in runners.items() if r}))
        if rank == 0:
            log("local: variants built")
        for r, order in enumerate(rotations(list(cfgs), reps)):
            for k in order:
                res = D.run_generation(cfgs[k], runners[k])
                if rank == res["owner"]:
                    out_q.put(("run", r, k, res["ranks"]))
                    if check and r == 0:  # numpy: pickled whole, whenever this process ends
                        out_q.put(("latents", k, res["latents"].numpy()))
                    log(f"local: rep {r} {k} wall {max(x['wall_s'] for x in res['ranks']):.2f} s")
    finally:
        dist.destroy_process_group()


def run_local(s: Settings, timeout_s: float = 3600.0) -> dict:
    import torch.multiprocessing as mp

    from asyncdiff.configs import load_unet
    from asyncdiff.runners import distributed as D

    cfgs = run_configs(s)
    meta = load_unet(s.model, device="meta")  # FLOP partitions need only the config
    parts = {k: D.get_partition(c, meta) for k, c in cfgs.items()}  # inherited by the forks
    world = max(c.world_size for c in cfgs.values())
    log(f"local: partitions ready, starting {world} ranks")
    ctx = mp.get_context("fork")
    out_q, port = ctx.Queue(), D.free_port()
    procs = [ctx.Process(target=_local_worker, args=(r, world, port, cfgs, s.reps, out_q, s.check))
             for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    count = world + s.reps * len(cfgs) + (len(cfgs) if s.check else 0)
    msgs = D.collect(out_q, procs, count, timeout_s)
    return _local_report(s, cfgs, parts, msgs, time.perf_counter() - t0)


def _local_report(s: Settings, cfgs: dict, parts: dict, msgs: list, seconds: float) -> dict:
    from asyncdiff.schedule import make_plan

    weights = {}
    for _, rank, per in (m for m in msgs if m[0] == "weights"):
        for k, b in per.items():
            weights.setdefault(k, {})[rank] = b
    out = {"model": s.model, "latent": s.latent, "steps": s.steps, "warmup": s.warmup,
           "reps": s.reps, "seconds": seconds, "variants": {}}
    for k, cfg in cfgs.items():
        runs = [{"rep": m[1], "wall_s": max(x["wall_s"] for x in m[3]), "ranks": m[3]}
                for m in msgs if m[0] == "run" and m[2] == k]
        for run in runs:
            run["overhead_per_step_s"] = (run["wall_s"] - max(x["compute_s"] for x in run["ranks"])) / s.steps
            run["bytes_sent"] = sum(x["bytes_sent"] for x in run["ranks"])
        plan = make_plan(cfg.steps, cfg.components, cfg.stride, cfg.warmup)
        part = parts[k]
        out["variants"][k] = {
            "config": asdict(cfg), "runs": runs,
            "wall_s": median([r["wall_s"] for r in runs]),
            "overhead_per_step_s": median([r["overhead_per_step_s"] for r in runs]),
            "ideal": ideal_speedups(part, plan),
            "cross_bytes_per_round_fp32": part.cross_bytes(4),
            "bytes_sent_per_step": median([r["bytes_sent"] for r in runs]) / s.steps,
            "weight_bytes_per_rank": weights.get(k, {}),
        }
    _add_speedups(out["variants"], "wall_s")
    seq = out["variants"]["seq"]
    seq["call_s"] = seq["wall_s"] / s.steps  # N=1: one UNet call per step (+ scheduler)
    for _, k, latents in (m for m in msgs if m[0] == "latents"):
        out["variants"][k]["check"] = check_latents(cfgs[k], torch.from_numpy(latents))
    return out


def check_latents(cfg, latents: torch.Tensor) -> dict:
    """The distributed run against LocalRunner on the same plan (``runners.job.check``); the
    sequential one also against the plain denoiser loop."""
    from asyncdiff.runners.distributed import check

    out = check(cfg, latents)
    if cfg.components == 1:
        out["max_abs_err_vs_plain_loop"] = float((latents - plain_loop_latents(cfg)).abs().max())
    return out


@torch.no_grad()
def plain_loop_latents(cfg) -> torch.Tensor:
    """``cfg``'s generation as diffusers' pipelines run it: the whole denoiser each step (no
    stages, components or plan) on the same seeded latents, conditioning and scheduler."""
    from asyncdiff.configs import denoiser_kind, load_denoiser
    from asyncdiff.generation import guide, initial_latents, latent_input, make_scheduler
    from asyncdiff.runners.job import get_partition, make_conditioning, scheduler_config

    model = load_denoiser(cfg.model, seed=cfg.weights_seed)
    partition = get_partition(cfg, model)
    cond = make_conditioning(cfg, partition)
    scheduler = make_scheduler(cfg.scheduler, scheduler_config(cfg.model))
    scheduler.set_timesteps(cfg.steps)
    shape = (1, *latent_input(partition).shape[1:])
    x = initial_latents(cfg.seed, shape, getattr(scheduler, "init_noise_sigma", 1.0))
    kind = denoiser_kind(model.config)
    for t in scheduler.timesteps:
        inp = torch.cat([x] * 2)
        if hasattr(scheduler, "scale_model_input"):  # flow matching takes x as it is
            inp = scheduler.scale_model_input(inp, t)
        eps = _denoise(model, kind, inp, t.expand(inp.shape[0]), cond)
        x = scheduler.step(guide(eps, cfg.guidance_scale), t, x).prev_sample
    return x


def _denoise(model, kind: str, sample, t, cond: dict) -> torch.Tensor:
    text = cond["encoder_hidden_states"]
    if kind == "unet":
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        return model(sample, t, encoder_hidden_states=text, added_cond_kwargs=added or None).sample
    kw = {k: cond[k] for k in ("pooled_projections", "guidance") if k in cond}
    kw.update({k: cond[k][0] for k in ("img_ids", "txt_ids") if k in cond})  # FLUX: 2-D ids
    return model(sample, encoder_hidden_states=text, timestep=t, **kw).sample


def _add_speedups(variants: dict, key: str) -> None:
    base = variants["seq"][key]
    for v in variants.values():
        v["speedup"] = base / v[key] if v[key] else float("nan")


# -- end to end through Triton --------------------------------------------------------

def triton_deployments(s: Settings):
    from benchmarks.bench_pipeline import Deployment

    names = [k for k in VARIANTS if s.triton_n2s2 or k != "n2s2b"]
    return {k: Deployment(*VARIANTS[k]) for k in names}


def model_stats(url: str) -> dict:
    """Per model: request/execution counts and cumulative ns (Triton statistics API)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        raw = client.get_inference_statistics(as_json=True)
    out = {}
    for m in raw.get("model_stats", []):
        st = m.get("inference_stats", {})
        row = {"requests": int(st.get("success", {}).get("count", 0)),
               "executions": int(m.get("execution_count", 0))}
        for key in ("success", "queue"):  # per request: summed over the requests of a batch
            row[f"{key}_ns"] = int(st.get(key, {}).get("ns", 0))
        # Compute per execution: a dynamically batched pair is one execution, not two.
        row["compute_ns"] = sum(int(b.get(key, {}).get("ns", 0)) for b in m.get("batch_stats", [])
                                for key in ("compute_input", "compute_infer", "compute_output"))
        out[m["name"]] = row
    return out


def stats_delta(after: dict, before: dict) -> dict:
    return {m: {k: v - before.get(m, {}).get(k, 0) for k, v in row.items()}
            for m, row in after.items()}


def split_request(e2e_s: float, delta: dict, steps: int) -> dict:
    """Where one request's time went, from the statistics deltas around it."""
    parts = {m: r for m, r in delta.items() if m.startswith("unet_part_")}
    te = delta.get("text_encoder", {}).get("success_ns", 0) / 1e9
    vae = delta.get("vae_decoder", {}).get("success_ns", 0) / 1e9
    critical = max(r["compute_ns"] for r in parts.values()) / 1e9
    return {
        "e2e_s": e2e_s, "text_encoder_s": te, "vae_decoder_s": vae,
        "bls_s": delta.get("asyncdiff", {}).get("success_ns", 0) / 1e9,
        "critical_compute_s": critical,
        "overhead_per_step_s": (e2e_s - te - vae - critical) / steps,
        "components": {m: {"requests": r["requests"], "executions": r["executions"],
                           "compute_s": r["compute_ns"] / 1e9, "queue_s": r["queue_ns"] / 1e9,
                           "request_s": r["success_ns"] / 1e9} for m, r in sorted(parts.items())},
    }


def run_triton(s: Settings, workdir: Path) -> dict:
    from benchmarks import bench_pipeline as bp
    from client.infer import GenerationParams, generate

    t0 = time.perf_counter()
    pipeline = bp.build(workdir / "pipeline")
    deps = triton_deployments(s)
    exports, export_s = {}, {}
    for k, dep in deps.items():
        t = time.perf_counter()
        exports[k] = bp.export(pipeline, dep, workdir / dep.name, validate=s.validate)
        export_s[k] = time.perf_counter() - t
        log(f"triton: exported {dep.name} in {export_s[k]:.0f} s")
    params = GenerationParams("a handwritten digit 3", seed=0, steps=s.steps, warmup=s.warmup)
    runs = {k: [] for k in deps}
    with bp.serve_all({k: workdir / d.name for k, d in deps.items()}) as servers:
        serve_s = time.perf_counter() - t0 - sum(export_s.values())
        log(f"triton: {len(servers)} servers ready")
        for k, srv in servers.items():  # first request pays lazy session set-up
            generate(params, "grpc", srv.grpc_url)
        for r, order in enumerate(rotations(list(deps), s.reps)):
            for k in order:
                url = servers[k].grpc_url
                before = model_stats(url)
                t = time.perf_counter()
                generate(params, "grpc", url)
                e2e = time.perf_counter() - t
                runs[k].append(dict(rep=r, **split_request(e2e, stats_delta(model_stats(url), before),
                                                           s.steps)))
                log(f"triton: rep {r} {k} e2e {e2e:.2f} s")
    return _triton_report(s, deps, exports, export_s, serve_s, runs, workdir, time.perf_counter() - t0)


def _triton_report(s, deps, exports, export_s, serve_s, runs, workdir, seconds) -> dict:
    from asyncdiff.schedule import make_plan
    from benchmarks.bench_pipeline import BENCH_CHANNELS, onnx_bytes, unet_config

    out = {"pipeline": {"unet": unet_config(), "channels": list(BENCH_CHANNELS)},
           "steps": s.steps, "warmup": s.warmup, "reps": s.reps, "seconds": seconds,
           "export_s": export_s, "server_start_s": serve_s, "variants": {}}
    for k, dep in deps.items():
        part = exports[k]
        plan = make_plan(s.steps, dep.components, dep.stride, s.warmup)
        rs = runs[k]
        out["variants"][k] = {
            "deployment": asdict(dep), "runs": rs,
            "e2e_s": median([r["e2e_s"] for r in rs]),
            "unet_e2e_s": median([r["e2e_s"] - r["text_encoder_s"] - r["vae_decoder_s"] for r in rs]),
            "overhead_per_step_s": median([r["overhead_per_step_s"] for r in rs]),
            "ideal": ideal_speedups(part, plan),
            "cross_bytes_per_round_fp32": part.cross_bytes(4),
            "weight_bytes_per_component": {c.name: onnx_bytes(workdir / dep.name, c.name)
                                           for c in part.components},
        }
    _add_speedups(out["variants"], "e2e_s")
    seq = out["variants"]["seq"]["runs"]
    out["call_s"] = median([r["components"]["unet_part_0"]["compute_s"] / s.steps for r in seq])
    return out


# -- report -------------------------------------------------------------------------

TRITON_SKIPPED_FOR_DITS = ("the Triton part exports the UNet benchmark pipeline "
                           "(benchmarks.bench_pipeline); a DiT runs in-process only")


def side_by_side(dit: dict, unet: dict) -> dict:
    """Per variant: each model's median wall time and speedup, the speedup of the best
    repetitions (least disturbed by other jobs on a shared machine) and the ideals."""
    best = lambda rep, k: min(r["wall_s"] for r in rep["variants"][k]["runs"])  # noqa: E731
    rows = {}
    for k in VARIANTS:
        rows[k] = {name: {"wall_s": rep["variants"][k]["wall_s"], "speedup": rep["variants"][k]["speedup"],
                          "speedup_best_reps": best(rep, "seq") / best(rep, k),
                          "ideal_perfect": rep["variants"][k]["ideal"]["perfect"],
                          "ideal_partition": rep["variants"][k]["ideal"]["partition"]}
                   for name, rep in (("dit", dit), ("unet", unet))}
    calls = {name: rep["variants"]["seq"]["call_s"] for name, rep in (("dit", dit), ("unet", unet))}
    return {"dit_model": dit["model"], "unet_model": unet["model"], "call_s": calls, "variants": rows}


def side_by_side_table(res: dict) -> str:
    lines = ["| variant | DiT s | DiT speedup (best reps) | UNet s | UNet speedup (best reps) "
             "| ideal (perfect) | ideal (partition) DiT / UNet |", "|---|---|---|---|---|---|---|"]
    for k, row in res["variants"].items():
        d, u = row["dit"], row["unet"]
        lines.append(f"| {LABELS[k]} | {d['wall_s']:.2f} | {d['speedup']:.2f} "
                     f"({d['speedup_best_reps']:.2f}) | {u['wall_s']:.2f} | {u['speedup']:.2f} "
                     f"({u['speedup_best_reps']:.2f}) | {d['ideal_perfect']:.2f} | "
                     f"{d['ideal_partition']:.2f} / {u['ideal_partition']:.2f} |")
    c = res["call_s"]
    lines.append(f"one sequential step (a call + the scheduler): DiT {c['dit'] * 1e3:.0f} ms, "
                 f"UNet {c['unet'] * 1e3:.0f} ms")
    return "\n".join(lines)


def table(local: dict | None, triton: dict | None) -> str:
    lines = [f"{'variant':18s} {'local s':>8s} {'x':>5s} {'Triton s':>9s} {'x':>5s} "
             f"{'ideal':>5s} {'ideal(part)':>11s} {'ovh/step ms local|Triton':>25s} "
             f"{'MB/round':>8s}"]
    for k in VARIANTS:
        lv = (local or {}).get("variants", {}).get(k)
        tv = (triton or {}).get("variants", {}).get(k)
        ref = lv or tv
        if ref is None:
            continue
        f = lambda v, key, fmt: format(v[key], fmt) if v else "-"  # noqa: E731
        ovh = f"{f(lv, 'overhead_per_step_s', '.4f')}|{f(tv, 'overhead_per_step_s', '.4f')}"
        ovh = "|".join(x if x == "-" else f"{float(x) * 1e3:.1f}" for x in ovh.split("|"))
        lines.append(
            f"{LABELS[k]:18s} {f(lv, 'wall_s', '8.2f'):>8s} {f(lv, 'speedup', '5.2f'):>5s} "
            f"{f(tv, 'e2e_s', '9.2f'):>9s} {f(tv, 'speedup', '5.2f'):>5s} "
            f"{ref['ideal']['perfect']:5.2f} {ref['ideal']['partition']:11.2f} {ovh:>25s} "
            f"{ref['cross_bytes_per_round_fp32'] / 1e6:8.3f}")
    return "\n".join(lines)


def weights_table(local: dict | None, triton: dict | None) -> str:
    lines = []
    if local:
        full = local["variants"]["seq"]["weight_bytes_per_rank"].get(0, 0)
        for k, v in local["variants"].items():
            per = ", ".join(f"rank {r}: {b / 1e6:.0f} MB ({b / full:.0%})"
                            for r, b in sorted(v["weight_bytes_per_rank"].items()))
            lines.append(f"local  {LABELS[k]:16s} {per}")
    if triton:
        full = sum(triton["variants"]["seq"]["weight_bytes_per_component"].values())
        for k, v in triton["variants"].items():
            per = ", ".join(f"{m}: {b / 1e6:.1f} MB ({b / full:.0%})"
                            for m, b in v["weight_bytes_per_component"].items())
            lines.append(f"Triton {LABELS[k]:16s} {per}")
    return "\n".join(lines)


def final_line(local: dict | None, triton: dict | None) -> str:
    def get(rep, key):
        v = (rep or {}).get("variants", {}).get("n2s1")
        return v[key] if v else float("nan")

    ideal = get(local, "ideal") if local else get(triton, "ideal")
    z = ideal["perfect"] if isinstance(ideal, dict) else float("nan")
    return (f"speedup_n2s1_local={get(local, 'speedup'):.2f} "
            f"speedup_n2s1_triton={get(triton, 'speedup'):.2f} ideal={z:.2f}")


def plot(report: dict, path: Path) -> None:
    """Speedup bars (local, Triton) per variant, with both ideal speedups marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width, seen = 0.36, set()
    for j, (part, color) in enumerate((("local", "#4c72b0"), ("triton", "#dd8452"))):
        rep = report.get(part) or {}
        for i, k in enumerate(VARIANTS):
            v = rep.get("variants", {}).get(k)
            if not v:
                continue
            x = i + (j - 0.5) * width
            ax.bar(x, v["speedup"], width * 0.9, color=color,
                   label=("in-process (torch.distributed)" if part == "local" else "Triton end-to-end")
                   if i == 0 else None)
            ax.text(x, v["speedup"] + 0.03, f"{v['speedup']:.2f}", ha="center", fontsize=8)
            for key, style in (("perfect", "k_"), ("partition", "r_")):
                label = f"ideal ({'perfect balance' if key == 'perfect' else 'this partition'})"
                ax.plot(x, v["ideal"][key], style, markersize=22, mew=2,
                        label=None if label in seen else label)
                seen.add(label)
    ax.set_xticks(range(len(VARIANTS)), [LABELS[k] for k in VARIANTS])
    ax.set_ylabel("speedup vs sequential")
    m = report["machine"]
    local = report.get("local") or {}
    ax.set_title(f"AsyncDiff on {m['cores']} CPU cores ({m['cpu']}), T={report['settings']['steps']}\n"
                 f"in-process: {local.get('model', '-')} latent {local.get('latent', '-')}; "
                 "Triton: benchmark pipeline", fontsize=9)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.01, report["command"], fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    """The doc's tables, from a report."""
    out = ["| variant | in-process s | speedup | Triton s | speedup | ideal (perfect) | ideal (partition) "
           "| overhead/step in-process ms | overhead/step Triton ms | MB/round (fp32) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    local, triton = report.get("local") or {}, report.get("triton") or {}
    for k in VARIANTS:
        lv, tv = local.get("variants", {}).get(k), triton.get("variants", {}).get(k)
        g = lambda v, key, f="{:.2f}", scale=1: f.format(v[key] * scale) if v else "-"  # noqa: E731
        ideal = (lv or tv)["ideal"]
        mb = " / ".join(f"{v['cross_bytes_per_round_fp32'] / 1e6:.2f}" for v in (lv, tv) if v)
        out.append(f"| {LABELS[k]} | {g(lv, 'wall_s')} | {g(lv, 'speedup')} | {g(tv, 'e2e_s')} | "
                   f"{g(tv, 'speedup')} | {ideal['perfect']:.2f} | "
                   f"{(lv or {}).get('ideal', {}).get('partition', float('nan')):.2f} / "
                   f"{(tv or {}).get('ideal', {}).get('partition', float('nan')):.2f} | "
                   f"{g(lv, 'overhead_per_step_s', '{:.1f}', 1e3)} | "
                   f"{g(tv, 'overhead_per_step_s', '{:.1f}', 1e3)} | {mb} |")
    return "\n".join(out)


def where_the_time_goes(report: dict) -> str:
    """Median per-step split of a Triton request, per deployment."""
    triton = report.get("triton") or {}
    steps = triton.get("steps", 1)
    out = ["| deployment | e2e ms/step | component compute ms/step (per execution) | queue ms/step "
           "| text enc + VAE ms | BLS ms/step outside the critical path |", "|---|---|---|---|---|---|"]
    for k, v in triton.get("variants", {}).items():
        runs = v["runs"]
        comps = sorted(runs[0]["components"])
        comp = ", ".join(f"{c}: {median([r['components'][c]['compute_s'] for r in runs]) / steps * 1e3:.1f}"
                         for c in comps)
        queue = ", ".join(f"{c}: {median([r['components'][c]['queue_s'] for r in runs]) / steps * 1e3:.2f}"
                          for c in comps)
        tev = median([r["text_encoder_s"] + r["vae_decoder_s"] for r in runs]) * 1e3
        out.append(f"| {LABELS[k]} | {v['e2e_s'] / steps * 1e3:.1f} | {comp} | {queue} | {tev:.1f} | "
                   f"{v['overhead_per_step_s'] * 1e3:.1f} |")
    return "\n".join(out)


# -- SDXL: the paper's configurations on sdxl-full, projected from measured stage times -------

SDXL_CONFIGS = ((2, 1, 1), (3, 1, 1), (4, 1, 1), (2, 2, 9), (3, 2, 9), (4, 2, 9))  # (N, S, w)
SDXL_LAYOUTS = ("outer_ring", "sequential")


def sdxl_projections(model: str = "sdxl-full", latent: int = 16, steps: int = 50,
                     configs=SDXL_CONFIGS, repeats: int = 3) -> dict:
    """Per configuration and layout: the time-balanced cut, its measured component times and
    the cost model's projected speedup from them and from the FLOP shares of the same cut."""
    from asyncdiff.configs import load_unet
    from asyncdiff.cost import project
    from asyncdiff.partition import build_partition, graph_interface
    from asyncdiff.placement import Placement
    from asyncdiff.profile import profile_stages
    from asyncdiff.schedule import make_plan
    from asyncdiff.stages import build_stage_graph

    t0 = time.perf_counter()
    unet = load_unet(model)
    load_s = time.perf_counter() - t0
    graph = build_stage_graph(unet)
    timed = profile_stages(graph, 2, latent, latent, "time", repeats=repeats)
    flops = profile_stages(build_stage_graph(load_unet(model, device="meta")), 2, latent, latent)
    flop_of = dict(zip(flops.names, flops.costs))
    out = {"model": model, "latent": latent, "steps": steps, "load_s": load_s,
           "unet_call_s": sum(timed.costs), "stage_s": dict(zip(timed.names, timed.costs)),
           "configs": []}
    for n, stride, warmup in configs:
        for layout in SDXL_LAYOUTS:
            part = build_partition(timed, num_components=n, model=model, stride=stride,
                                   layout=layout, **graph_interface(graph))
            plan = make_plan(steps, n, stride, warmup, ring=layout == "outer_ring")
            place = Placement(n, stride)
            times = [c.cost for c in part.components]
            by_flops = [sum(flop_of[st] for st in c.stages) for c in part.components]
            # the ring's warm-up front call: its stages before the gap (torch runners run only those)
            fronts = [_front_cost(c.stages, timed) for c in part.components]
            out["configs"].append({
                "name": f"N{n}S{stride} w{warmup}", "layout": layout, "devices": place.world_size,
                "cuts": part.cuts, "component_s": times,
                "largest_share": max(times) / sum(times),
                "front_s": fronts,
                "projected_measured": project(plan, place, times, front_costs=fronts).speedup,
                "projected_measured_whole_ring_warmup": project(plan, place, times).speedup,
                "projected_flops": project(plan, place, by_flops, front_costs=[
                    _front_cost(c.stages, flops) for c in part.components]).speedup})
    out["seconds"] = time.perf_counter() - t0
    return out


def _front_cost(stages: list[str], profile) -> float:
    idx = [profile.names.index(s) for s in stages]
    cut = next((j for j in range(1, len(idx)) if idx[j] != idx[j - 1] + 1), len(idx))
    return sum(profile.costs[i] for i in idx[:cut])


def sdxl_table(res: dict) -> str:
    lines = [f"SDXL ({res['model']}, random weights, latent {res['latent']}, T={res['steps']}): "
             f"one UNet call {res['unet_call_s']:.2f} s on this machine (sum of stage medians)",
             "", "| config | devices | layout | largest component | projected (measured times) "
             "| projected (FLOP shares) | ring warm-up as a whole call | cuts |",
             "|---|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        lines.append(f"| {c['name']} | {c['devices']} | {c['layout'].replace('_', '-')} | "
                     f"{100 * c['largest_share']:.1f}% | {c['projected_measured']:.2f}x | "
                     f"{c['projected_flops']:.2f}x | "
                     f"{c['projected_measured_whole_ring_warmup']:.2f}x | {','.join(c['cuts'])} |")
    return "\n".join(lines)


def sdxl_main(a) -> int:
    import json

    res = sdxl_projections(latent=a.sdxl_latent, steps=a.steps or 50)
    print(sdxl_table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine_info(), "sdxl": res}, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"fewer steps ({QUICK}); <= 10 min on 2 cores")
    p.add_argument("--json", type=Path, help="write every timing and the machine info here")
    p.add_argument("--model", help="in-process denoiser: a folder, a built-in UNet or DiT (e.g. "
                   "sd3-bench); default: the benchmark pipeline's UNet")
    p.add_argument("--latent", type=int, help="in-process latent side (default 32)")
    p.add_argument("--steps", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--no-local", action="store_true", help="skip the in-process part")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton part")
    p.add_argument("--no-triton-n2s2", action="store_true", help="Triton: N=1 and N2S1 only")
    p.add_argument("--with-unet", action="store_true", help="with a DiT --model: also run the "
                   "benchmark UNet in-process, and report both side by side")
    p.add_argument("--check", action="store_true", help="compare each variant's latents with "
                   "LocalRunner, and the sequential run's with the plain denoiser loop")
    p.add_argument("--note", help="a remark kept in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--workdir", help="keep the benchmark pipeline and exports here")
    p.add_argument("--from-json", type=Path, help="measure nothing: report/plot this saved JSON")
    p.add_argument("--plot", type=Path, help="write the speedup bar chart (PNG) here")
    p.add_argument("--markdown", action="store_true", help="also print the doc's markdown tables")
    p.add_argument("--sdxl", action="store_true", help="only the paper's SDXL configurations on "
                   "sdxl-full: measured stage times, cost-model projections (see the docstring)")
    p.add_argument("--sdxl-latent", type=int, default=16, help="--sdxl: latent side (default 16)")
    a = p.parse_args(argv)
    s = Settings(**(QUICK if a.quick else {}))
    for key in ("model", "latent", "steps", "reps", "workdir"):
        if getattr(a, key) is not None:
            setattr(s, key, getattr(a, key))
    s.triton, s.triton_n2s2 = not a.no_triton, not a.no_triton_n2s2
    s.check, s.with_unet = a.check, a.with_unet
    return s, a


def main(argv: list[str] | None = None) -> int:
    import json

    s, a = parse_args(argv)
    if a.sdxl:
        return sdxl_main(a)
    if a.from_json:
        return _from_json(a)
    report = {"command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": asdict(s), "machine": machine_info(), "note": a.note}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asyncdiff-speed-") as tmp:
        workdir = Path(s.workdir or tmp)
        s.model = local_model(s.model, workdir)
        dit = is_dit(s.model)
        if dit and s.triton:
            s.triton = False
            report["triton_skipped"] = TRITON_SKIPPED_FOR_DITS
        local = run_local(s) if not a.no_local else None
        unet = None
        if dit and s.with_unet and not a.no_local:  # the same settings, right after
            unet = run_local(replace(s, model=local_model(None, workdir)))
        triton = run_triton(s, workdir) if s.triton else None
    report.update(local=local, unet_local=unet, triton=triton, seconds=time.perf_counter() - t0)
    report["machine"]["loadavg_end"] = os.getloadavg()
    if unet:
        report["side_by_side"] = side_by_side(local, unet)
    print(table(local, triton))
    print(weights_table(local, triton))
    if unet:
        print(f"\nbeside the benchmark UNet, same run:\n{side_by_side_table(report['side_by_side'])}")
    line = final_line(local, triton)
    report["final_line"] = line
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
        print(f"wrote {a.json} ({report['seconds']:.0f} s)")
    _extras(report, a)
    print(line)
    return 0


def _from_json(a) -> int:
    import json

    report = json.loads(a.from_json.read_text())
    print(table(report.get("local"), report.get("triton")))
    if report.get("unet_local"):
        print(side_by_side_table(side_by_side(report["local"], report["unet_local"])))
    _extras(report, a)
    print(report["final_line"])
    return 0


def _extras(report: dict, a) -> None:
    if a.plot:
        plot(report, a.plot)
        print(f"wrote {a.plot}")
    if a.markdown:
        print(markdown(report))
        print(where_the_time_goes(report))


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
