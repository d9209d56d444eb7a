"""Process groups for the distributed runner: torchrun CLI, local spawn, jobs in turn.

Usage (W = ``Placement(N, S, batched_stride).world_size``: N, or N+1 for plain stride 2)::

    torchrun --nproc_per_node=W -m asyncdiff.runners.distributed \
        --model sd15 --components N --stride S --warmup 1 --steps 6 --check --json out.json

``--check`` compares the final latents with ``LocalRunner`` (same partition,
plan, seed and conditioning) on the latent owner; on CPU fp32 with one thread
per rank they are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from asyncdiff.runners.job import RunConfig, check, get_partition
from asyncdiff.runners.rank import DistributedRunner, run_generation


def init_group(rank: int | None = None, world: int | None = None, port: int | None = None,
               device: str = "cpu") -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if port is None:  # torchrun: env:// rendezvous
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def select_device(cfg: RunConfig, rank: int) -> None:
    """NCCL needs each rank's CUDA device current before its first collective."""
    if cfg.device != "cpu" and rank < cfg.world_size:
        torch.cuda.set_device(torch.device(cfg.placement.device(rank)))


def run_jobs(cfgs: list[RunConfig], threads: int = 1, do_check: bool = False) -> list[dict]:
    """Run each config in turn on the current group (consecutive equal configs reuse the model).

    Every rank returns one dict per config; ``latents`` and ``check`` are set on the latent owner.
    """
    torch.set_num_threads(threads)
    results, runner, built = [], None, None
    for cfg in cfgs:
        if dist.get_world_size() < cfg.world_size:  # spare ranks idle; too few is Placement's error
            cfg.placement.check_world(dist.get_world_size(), "ranks")
        if cfg != built:
            runner = built = None  # free the previous config's modules before building
            if dist.get_rank() < cfg.world_size:
                runner = DistributedRunner(cfg, dist.get_rank())
            built = cfg
        res = run_generation(cfg, runner)
        res.update(config=asdict(cfg), world_size=cfg.world_size,
                   wall_s=max(s["wall_s"] for s in res["ranks"]))
        if do_check and res["latents"] is not None:
            res["check"] = check(cfg, res["latents"])
        results.append(res)
    return results


def _report(results: list[dict]) -> dict | None:
    """The JSON report, on the latent owner (the only rank holding the latents and the check)."""
    if results[0]["latents"] is None:
        return None
    runs = [{k: v for k, v in r.items() if k not in ("latents", "config", "world_size")} for r in results]
    return {"config": results[0]["config"], "world_size": results[0]["world_size"], "runs": runs}


def _print_report(report: dict) -> None:
    for k, run in enumerate(report["runs"]):
        print(f"run {k}: wall {run['wall_s'] * 1e3:.1f} ms")
        for s in run["ranks"]:
            print(f"  rank {s['rank']} [{s['role']}]: compute {s['compute_s'] * 1e3:.1f} ms, "
                  f"recv wait {s['recv_wait_s'] * 1e3:.1f} ms, send wait {s['send_wait_s'] * 1e3:.1f} ms, "
                  f"sent {s['bytes_sent'] / 1e6:.2f} MB in {s['msgs_sent']} msgs, params {s['params']}")
        if "check" in run:
            print("  check:", json.dumps(run["check"]))


def _spawn_worker(rank: int, world: int, port: int, cfgs: list, queue) -> None:
    if sys.platform.startswith("linux"):  # rendezvous is on 127.0.0.1: keep gloo on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    select_device(cfgs[0], rank)
    init_group(rank, world, port, cfgs[0].device)
    try:
        results = run_jobs(cfgs)
        for k, res in enumerate(results):  # only the latent owner has latents: it reports them
            if res["latents"] is not None:
                res["latents"] = res["latents"].cpu().numpy()  # by value: this process exits
                queue.put((k, res))
    finally:
        dist.destroy_process_group()


def spawn(cfgs: list[RunConfig], world: int | None = None, method: str = "spawn",
          timeout_s: float = 600.0) -> list[dict]:
    """Run configs on ``world`` local processes (default: the largest need); results in order.

    ``method="fork"`` reuses the caller's imports (seconds instead of a diffusers import per
    rank); it is safe while ranks use one torch thread, as ``run_jobs`` sets.
    """
    import torch.multiprocessing as mp

    world = world or max(c.world_size for c in cfgs)
    if method == "fork":  # import once here rather than once per rank
        import asyncdiff.components  # noqa: F401
        import asyncdiff.pipeline  # noqa: F401
        from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401

        for cfg in cfgs:  # profiled once, inherited by every rank
            get_partition(cfg)
    ctx = mp.get_context(method)
    results_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spawn_worker, args=(r, world, port, cfgs, results_q)) for r in range(world)]
    for p in procs:
        p.start()
    results = collect(results_q, procs, len(cfgs), timeout_s)
    for _, res in results:
        res["latents"] = torch.from_numpy(res["latents"])
    return [res for _, res in sorted(results, key=lambda kr: kr[0])]


def collect(queue, procs: list, count: int, timeout_s: float) -> list:
    """``count`` messages from rank processes; fails fast when one dies, and ends the others."""
    import queue as queue_mod

    msgs, deadline = [], time.monotonic() + timeout_s
    try:
        while len(msgs) < count:
            try:
                msgs.append(queue.get(timeout=1.0))
            except queue_mod.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"rank processes failed (exit codes {failed}) or timed out")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # only our own children, and only if still running
            if p.is_alive():
                p.terminate()
    return msgs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asyncdiff.runners.distributed",
                                description="An AsyncDiff plan on torch.distributed, one process per device.")
    p.add_argument("--model", default="sd15", help="built-in config name, 'tiny', or a diffusers folder")
    p.add_argument("--components", type=int, required=True)
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batched-stride", action="store_true", help="S=2 on N ranks: last component batched x2")
    p.add_argument("--latent", type=int, help="latent side (default: the UNet's sample_size)")
    p.add_argument("--partition", help="a saved Partition JSON (overrides FLOP balancing)")
    p.add_argument("--cuts", type=_csv, help="comma-separated stage names where components 1..N-1 start "
                                             "(default: FLOP-balanced)")
    p.add_argument("--layout", default="sequential", choices=("sequential", "outer-ring"),
                   help="outer-ring: component N-1 holds the first and the last stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "euler", "dpmsolver++"))
    p.add_argument("--time-shift", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: NCCL, rank r on --gpus[r]")
    p.add_argument("--gpus", type=_gpu_ids, help="comma-separated CUDA ids, one per rank (default 0..W-1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1 for exactness)")
    p.add_argument("--runs", type=int, default=1, help="timed generations (the first includes warm-up)")
    p.add_argument("--check", action="store_true", help="compare with LocalRunner on the latent owner")
    p.add_argument("--json", help="write config, timings per rank and check results here (latent owner)")
    return p


def config(a: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=a.model, components=a.components, stride=a.stride, warmup=a.warmup, steps=a.steps,
        batched_stride=a.batched_stride, latent=a.latent, partition_file=a.partition, cuts=a.cuts,
        seed=a.seed, guidance_scale=a.guidance_scale, scheduler=a.scheduler, time_shift=a.time_shift,
        device=a.device, gpus=a.gpus, layout=a.layout.replace("-", "_"),
    )


def main(argv: list[str] | None = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    cfg = config(a)
    try:
        world = cfg.world_size
        if "WORLD_SIZE" in os.environ:
            cfg.placement.check_world(int(os.environ["WORLD_SIZE"]), "torchrun ranks")
    except ValueError as e:
        p.error(str(e))
    if "WORLD_SIZE" not in os.environ:
        p.error(f"launch with: torchrun --nproc_per_node={world} -m asyncdiff.runners.distributed ...")
    select_device(cfg, int(os.environ["RANK"]))
    init_group(device=cfg.device)
    try:
        results = run_jobs([cfg] * a.runs, a.threads, a.check)
        report = _report(results)
    finally:
        dist.destroy_process_group()
    if report is None:
        return
    _print_report(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = any(not r.get("check", {}).get("equal_to_local", True) for r in report["runs"])
    if failed and not (cfg.batched_stride or cfg.device != "cpu"):
        raise SystemExit("check FAILED: distributed latents differ from LocalRunner")


def _csv(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _gpu_ids(value: str) -> tuple[int, ...]:
    return tuple(int(g) for g in _csv(value))
