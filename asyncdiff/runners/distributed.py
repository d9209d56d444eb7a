"""DistributedRunner: an AsyncDiff plan on torch.distributed, one process per device.

Rank r < N owns component r; with stride 2 (and no ``--batch-stride``) rank N
owns the stride copy of component N-1, otherwise rank N-1 runs both calls of
the last component as one doubled batch.  Each rank keeps only its own
component's modules.

Routing is derived, not hand-written: ``build_routes`` replays the plan
through an ``ActivationCache`` holding placeholders (``Msg``) instead of
tensors, so every tensor a call reads names the rank and step that produced
it.  From that, each producer sends exactly the interface tensors a consumer
reads (point-to-point, no broadcast), once, right after computing them, and
the latent owner -- the rank whose component takes ``sample`` and which runs
the scheduler -- receives the noise prediction the plan picks for each step.
At run time every rank keeps a real ``ActivationCache`` that it fills with
its own outputs and the tensors it receives, so the cache's staleness check
guards the distributed dataflow too.  Only the conditioning and the timesteps
are broadcast, once per generation.

Usage (W = N, or N+1 for stride 2 without --batch-stride)::

    torchrun --nproc_per_node=W -m asyncdiff.runners.distributed \
        --model sd15 --components N --stride S --warmup 1 --steps 6 --check --json out.json

``--check`` compares the final latents with ``LocalRunner`` (same partition,
plan, seed and conditioning) on the latent owner; on CPU fp32 with one thread
per rank they are bit-identical.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.partition import Partition
from asyncdiff.runners.cache import ActivationCache
from asyncdiff.runners.local import LocalRunner
from asyncdiff.schedule import Plan, Step, make_plan

LATENT = "sample"

# DDIM settings of Stable Diffusion 1.x/2.x, for the random-weight built-in UNets.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


@dataclass
class RunConfig:
    model: str = "sd15"
    components: int = 2
    stride: int = 1
    warmup: int = 1
    steps: int = 6
    batch_stride: bool = False
    latent: int | None = None  # latent side; default: the UNet's sample_size
    partition_file: str | None = None  # a saved Partition (e.g. balanced by measured time)
    seed: int = 0  # initial noise and random conditioning
    weights_seed: int = 0  # random weights of built-in UNets
    guidance: float = 3.0
    scheduler: str = "ddim"
    time_shift: bool = False
    device: str = "cpu"

    @property
    def world_size(self) -> int:
        extra = self.stride == 2 and not self.batch_stride and self.components > 1
        return self.components + int(extra)


# -- routing: the plan replayed on placeholders --------------------------------

@dataclass(frozen=True)
class Msg:
    """One tensor value in flight: ``name`` produced at ``step`` by call ``slot`` on rank ``src``.

    ``slot`` is the call's position in its step (-1 for the latent), so the two
    noise predictions of a stride-2 round are different messages.
    """

    name: str
    step: int
    src: int
    slot: int
    order: int  # position among the producing call's outputs: fixes the send order


@dataclass
class Routes:
    """Per-rank routing, identical on every rank."""

    latent_owner: int
    needs: dict[tuple[int, int], list[Msg]] = field(default_factory=lambda: defaultdict(list))
    eps: dict[int, Msg] = field(default_factory=dict)  # step -> remote eps for the latent owner
    dests: dict[Msg, list[int]] = field(default_factory=lambda: defaultdict(list))

    def expected(self, rank: int) -> dict[int, list[Msg]]:
        """Messages ``rank`` receives, per source, in the order the source sends them."""
        per_src: dict[int, list[Msg]] = defaultdict(list)
        for msg, dsts in self.dests.items():
            if rank in dsts:
                per_src[msg.src].append(msg)
        return {src: sorted(msgs, key=send_key) for src, msgs in per_src.items()}


def send_key(msg: Msg) -> tuple[int, int, int]:
    return (msg.step, msg.slot, msg.order)


def rank_of(step: Step, pos: int, components: int, batch_stride: bool) -> int:
    if step.stride_copy and pos == len(step.calls) - 1:
        return components - 1 if batch_stride else components
    return step.calls[pos].component


def latent_owner(partition: Partition) -> int:
    for comp in partition.components:
        if any(t.role == "latent" for t in comp.inputs):
            return comp.index
    raise ValueError("no component takes the latent")


def build_routes(partition: Partition, plan: Plan, batch_stride: bool) -> Routes:
    """Replay ``plan`` through an ActivationCache of placeholders to find who sends what to whom."""
    n = partition.num_components
    routes = Routes(latent_owner(partition))
    cache = ActivationCache(partition, plan)
    outputs = {c.index: c.output_names for c in partition.components}

    def need(rank: int, step: int, msg: Msg, key: tuple[int, int]) -> None:
        if msg.src != rank and rank not in routes.dests[msg]:
            routes.dests[msg].append(rank)
            routes.needs[key].append(msg)

    for i, st in enumerate(plan.steps):
        latent = Msg(LATENT, i, routes.latent_owner, -1, 0)
        for wave in cache.waves(i):
            for pos, call in wave:
                r = rank_of(st, pos, n, batch_stride)
                for msg in cache.inputs(i, call, latent).values():
                    need(r, i, msg, (r, i))
            for pos, call in wave:
                r = rank_of(st, pos, n, batch_stride)
                outs = {name: Msg(name, i, r, pos, j) for j, name in enumerate(outputs[call.component])}
                cache.record(i, pos, outs)
        eps = cache.noise_pred(i)
        if eps.src != routes.latent_owner:  # the step's noise prediction, to the scheduler
            routes.dests[eps].append(routes.latent_owner)
            routes.eps[i] = eps
    return routes


# -- communication ----------------------------------------------------------------

class Stats:
    def __init__(self):
        self.compute_s = self.recv_wait_s = self.send_wait_s = self.sched_s = 0.0
        self.calls = self.batched_calls = self.bytes_sent = self.bytes_recv = 0
        self.msgs_sent = self.msgs_recv = 0


class Mailbox:
    """Posts receives in each source's send order (NCCL matches point-to-point ops by order)."""

    def __init__(self, rank: int, routes: Routes, shapes: dict[str, list[int]], device, stats: Stats):
        self.queues = routes.expected(rank)
        self.posted: dict[Msg, tuple[torch.Tensor, Any]] = {}
        self.next = {src: 0 for src in self.queues}
        self.shapes, self.device, self.stats = shapes, torch.device(device), stats
        self.pending_sends: list = []

    def _post_until(self, msg: Msg) -> None:
        queue = self.queues[msg.src]
        while msg not in self.posted:
            m = queue[self.next[msg.src]]
            self.next[msg.src] += 1
            buf = torch.empty(self.shapes[m.name], dtype=torch.float32, device=self.device)
            self.posted[m] = (buf, dist.irecv(buf, src=m.src))

    def prepost(self, upto_step: int) -> None:
        """Post receives for everything produced up to ``upto_step``, so it lands during compute."""
        for src, queue in self.queues.items():
            k = self.next[src]
            if k < len(queue) and queue[k].step <= upto_step:
                last = max(m for m in range(k, len(queue)) if queue[m].step <= upto_step)
                self._post_until(queue[last])

    def recv(self, msg: Msg) -> torch.Tensor:
        self._post_until(msg)
        buf, work = self.posted.pop(msg)
        t0 = time.perf_counter()
        work.wait()
        _sync(self.device)
        self.stats.recv_wait_s += time.perf_counter() - t0
        self.stats.msgs_recv += 1
        self.stats.bytes_recv += buf.numel() * buf.element_size()
        return buf

    def send(self, tensor: torch.Tensor, dsts: list[int]) -> None:
        tensor = tensor.contiguous()
        for dst in dsts:
            self.pending_sends.append((tensor, dist.isend(tensor, dst=dst)))
            self.stats.msgs_sent += 1
            self.stats.bytes_sent += tensor.numel() * tensor.element_size()
        # Drop finished sends; never block here (the receiver may be waiting on us).
        self.pending_sends = [(t, w) for t, w in self.pending_sends if not w.is_completed()]

    def drain(self) -> None:
        t0 = time.perf_counter()
        for _, work in self.pending_sends:
            work.wait()
        self.pending_sends.clear()
        self.stats.send_wait_s += time.perf_counter() - t0
        assert not self.posted, f"received but unused: {list(self.posted)}"


def connect_pairs(routes: Routes, rank: int, device: str) -> None:
    """NCCL only: open every point-to-point channel up front, pairs in one global order.

    NCCL creates a pair's communicator on its first send/recv, blocking until both
    ends arrive; doing that lazily mid-step could chain into a wait cycle, one global
    order cannot.  Gloo connects every pair at init, so this is skipped there.
    """
    if dist.get_backend() != "nccl":
        return
    pairs = sorted({tuple(sorted((m.src, d))) for m, dsts in routes.dests.items() for d in dsts})
    for a, b in pairs:
        if rank in (a, b):
            peer = b if rank == a else a
            out, back = torch.zeros(1, device=device), torch.empty(1, device=device)
            ops = [dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, back, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- model setup ------------------------------------------------------------------

_PARTITIONS: dict[tuple, Partition] = {}  # FLOP partitions by config: cheap to share, slow to profile


def get_partition(cfg: RunConfig, unet=None) -> Partition:
    """The partition of ``cfg``: a saved file, or FLOP balancing (deterministic on every rank)."""
    if cfg.partition_file:
        return Partition.load(cfg.partition_file)
    key = (cfg.model, cfg.weights_seed, cfg.components, cfg.stride, cfg.batch_stride, cfg.latent)
    if key not in _PARTITIONS:
        from asyncdiff.configs import load_unet
        from asyncdiff.partition import partition_unet

        unet = unet if unet is not None else load_unet(cfg.model, seed=cfg.weights_seed)
        size = cfg.latent or unet.config.sample_size
        _PARTITIONS[key] = partition_unet(
            unet, cfg.components, model=cfg.model, batch=2, height=size, width=size,
            stride=cfg.stride, batched_stride=cfg.batch_stride,
        )
    return _PARTITIONS[key]


def build_model(cfg: RunConfig, keep: set[int] | None = None):
    """(partition, components) -- components not in ``keep`` are None and their modules freed."""
    from asyncdiff.components import Component
    from asyncdiff.configs import load_unet
    from asyncdiff.stages import build_stage_graph

    unet = load_unet(cfg.model, seed=cfg.weights_seed)
    partition = get_partition(cfg, unet)
    graph = build_stage_graph(unet)
    comps = [
        Component(graph, spec).eval().to(cfg.device) if keep is None or spec.index in keep else None
        for spec in partition.components
    ]
    del unet, graph  # the kept components hold the only references to their modules
    gc.collect()
    return partition, comps


def scheduler_config(model: str) -> dict:
    from asyncdiff.configs import UNET_CONFIGS, resolve

    if model in UNET_CONFIGS:
        return dict(SD_SCHEDULER)
    path = os.path.join(str(resolve(model).unet_dir), "..", "scheduler", "scheduler_config.json")
    with open(path) as f:
        return json.load(f)


COND_ROLES = ("text", "text_embeds", "time_ids")


def make_inputs(cfg: RunConfig, partition: Partition):
    """(scheduler, initial latents, conditioning) -- seeded, so any process can rebuild them.

    Conditioning is random ``[uncond; cond]`` states (+ SDXL's text_embeds/time_ids) of the
    shapes the partition's components take.
    """
    from asyncdiff.configs import example_inputs, load_unet
    from asyncdiff.pipeline import initial_latents, make_scheduler

    scheduler = make_scheduler(cfg.scheduler, scheduler_config(cfg.model))
    scheduler.set_timesteps(cfg.steps)
    shape = next(t.shape for c in partition.components for t in c.inputs if t.role == "latent")
    latents = initial_latents(cfg.seed, (1, *shape[1:]), scheduler.init_noise_sigma)
    config = load_unet(cfg.model, device="meta").config
    _, _, text, extra = example_inputs(config, 2, shape[2], shape[3], seed=cfg.seed + 1)
    everything = {"encoder_hidden_states": text, **extra}
    return scheduler, latents, {k: everything[k] for k in cond_shapes(partition)}


def cond_shapes(partition: Partition) -> dict[str, list[int]]:
    """Conditioning inputs any component takes, in a fixed order (the broadcast order)."""
    shapes = {t.name: t.shape for c in partition.components for t in c.inputs if t.role in COND_ROLES}
    return dict(sorted(shapes.items()))


def tensor_shapes(partition: Partition) -> dict[str, list[int]]:
    shapes = {}
    for comp in partition.components:
        for t in comp.inputs + comp.outputs:
            shapes[t.name] = list(t.shape)
    return shapes


# -- one rank -------------------------------------------------------------------------

class DistributedRunner:
    """This rank's share of a plan: its calls, and the messages around them."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        n = cfg.components
        self.mine = {min(rank, n - 1)}  # the stride-copy rank holds component N-1
        self.partition, comps = build_model(cfg, keep=self.mine)
        # LocalRunner's input assembly and (batched) wave execution, so the arithmetic is
        # exactly the reference's; it only ever indexes this rank's components.
        self.local = LocalRunner(comps, batch_stride=cfg.batch_stride)
        self.params = sum(p.numel() for c in comps if c is not None for p in c.parameters())
        self._connected = False

    def generate(self, cond: dict, timesteps: torch.Tensor, scheduler=None, latents=None):
        """Run one generation; the latent owner passes ``scheduler``/``latents`` and gets the result."""
        from asyncdiff.pipeline import denoise

        cfg = self.cfg
        plan = make_plan(cfg.steps, cfg.components, cfg.stride, cfg.warmup, cfg.time_shift)
        self.routes = build_routes(self.partition, plan, cfg.batch_stride)
        self.cache = ActivationCache(self.partition, plan)
        self.stats = Stats()
        self.mail = Mailbox(self.rank, self.routes, tensor_shapes(self.partition), cfg.device, self.stats)
        self.cond = cond
        self.timesteps = timesteps
        owner = self.rank == self.routes.latent_owner
        if not self._connected:
            connect_pairs(self.routes, self.rank, cfg.device)
            self._connected = True
        self._in_step = 0.0
        t0 = time.perf_counter()
        if owner:
            out = denoise(scheduler, latents, cfg.guidance, self._timed_step)
        else:
            out = None
            for i in range(cfg.steps):
                self.step(i, None)
        self.mail.drain()
        _sync(torch.device(cfg.device))
        self.stats.wall_s = time.perf_counter() - t0
        if owner:  # scheduler/guidance time = what the loop spent outside step()
            self.stats.sched_s = self.stats.wall_s - self._in_step
        return out

    def _timed_step(self, i: int, model_input: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        eps = self.step(i, model_input)
        self._in_step += time.perf_counter() - t0
        return eps

    def step(self, i: int, latent: torch.Tensor | None):
        """Plan step ``i`` on this rank; returns the noise prediction on the latent owner."""
        st, r, n = self.cache.plan.steps[i], self.rank, self.cfg.components
        if latent is not None:
            dsts = self.routes.dests.get(Msg(LATENT, i, r, -1, 0))
            if dsts:
                self.mail.send(latent, dsts)
        for wave in self.cache.waves(i):
            mine = [(pos, c) for pos, c in wave if rank_of(st, pos, n, self.cfg.batch_stride) == r]
            if mine:
                latent = self._receive(i, latent)
                self._compute(i, mine, latent)
        self.mail.prepost(i)
        if r != self.routes.latent_owner:
            self.cache.eps.clear()  # this rank's predictions were sent; nothing reads them here
            return None
        remote = self.routes.eps.get(i)
        if remote is not None:
            src = st.eps
            self.cache.eps[(src.component, src.timestep_index, src.computed_at_step)] = self.mail.recv(remote)
        return self.cache.noise_pred(i)

    def _receive(self, i: int, latent):
        for msg in self.routes.needs.get((self.rank, i), ()):
            value = self.mail.recv(msg)
            if msg.name == LATENT:
                latent = value
            else:
                self.cache.values[msg.name] = (msg.step, value)
        return latent

    def _compute(self, i: int, mine: list, latent) -> None:
        inputs = [self.local.call_inputs(self.cache, i, c, latent, self.cond, self.timesteps) for _, c in mine]
        t0 = time.perf_counter()
        with torch.no_grad():
            outs = self.local.run_wave([c for _, c in mine], inputs)
        _sync(torch.device(self.cfg.device))
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.calls += len(mine)
        self.stats.batched_calls += int(len(outs) > 1)
        for (pos, _), out in zip(mine, outs):
            self.cache.record(i, pos, out)
            for j, (name, tensor) in enumerate(out.items()):
                dsts = self.routes.dests.get(Msg(name, i, self.rank, pos, j))
                if dsts:
                    self.mail.send(tensor, dsts)


# -- a whole generation across the process group --------------------------------------

def run_generation(cfg: RunConfig, runner: DistributedRunner | None) -> dict:
    """Collective: every rank of the default group calls it; ranks beyond cfg.world_size idle.

    Returns {"latents": final latents on the latent owner (None elsewhere), "owner",
    "ranks": every active rank's stats}.
    """
    rank, device = dist.get_rank(), torch.device(cfg.device)
    active = runner is not None
    owner = _agree_owner(latent_owner(runner.partition) if active else -1, device)
    scheduler = latents = None
    cond = {}
    steps = torch.empty(cfg.steps, dtype=torch.float64, device=device)
    if rank == owner:
        scheduler, latents, cond = make_inputs(cfg, runner.partition)
        latents = latents.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        steps.copy_(scheduler.timesteps.to(torch.float64))  # exact for int and fp32 timesteps
    shapes = _agree_cond_shapes(cond_shapes(runner.partition) if active else None, owner)
    for name, shape in shapes.items():  # conditioning: broadcast once per generation
        cond.setdefault(name, torch.empty(shape, device=device))
        dist.broadcast(cond[name], src=owner)
    dist.broadcast(steps, src=owner)
    timesteps = steps  # float64 holds int and fp32 timesteps exactly: calls see the same fp32 value
    dist.barrier()
    out = runner.generate(cond, timesteps, scheduler, latents) if active else None
    stats = None
    if active:
        stats = dict(vars(runner.stats), rank=rank, role=_role(cfg, rank, owner), params=runner.params)
    all_stats = [None] * dist.get_world_size()
    dist.all_gather_object(all_stats, stats)
    return {"latents": out, "owner": owner, "ranks": [s for s in all_stats if s is not None]}


def _agree_cond_shapes(mine: dict | None, owner: int) -> dict:
    """Idle ranks join the broadcasts too, so they learn the shapes from the owner."""
    box = [mine]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def _agree_owner(mine: int, device) -> int:
    """The latent owner, known to active ranks only, made known to all (idle ranks say -1)."""
    t = torch.tensor([mine], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _role(cfg: RunConfig, rank: int, owner: int) -> str:
    n = cfg.components
    role = f"component {rank}" if rank < n else f"stride copy of component {n - 1}"
    if cfg.batch_stride and cfg.stride == 2 and rank == n - 1 and n > 1:
        role += " (+ batched stride copy)"
    return role + (" + scheduler" if rank == owner else "")


def reference_latents(cfg: RunConfig, batch_stride: bool | None = None) -> torch.Tensor:
    """LocalRunner on the same partition, plan, seed and conditioning."""
    from asyncdiff.pipeline import denoise

    partition, comps = build_model(cfg)
    bs = cfg.batch_stride if batch_stride is None else batch_stride
    runner = LocalRunner(comps, batch_stride=bs)
    scheduler, latents, cond = make_inputs(cfg, partition)
    device = torch.device(cfg.device)
    plan = make_plan(cfg.steps, cfg.components, cfg.stride, cfg.warmup, cfg.time_shift)
    cache = ActivationCache(partition, plan)
    cond = {k: v.to(device) for k, v in cond.items()}

    def noise_pred(i, model_input):
        return runner.noise_pred(cache, i, model_input, cond, timesteps)

    timesteps = scheduler.timesteps.to(device)

    return denoise(scheduler, latents.to(device), cfg.guidance, noise_pred)


def check(cfg: RunConfig, latents: torch.Tensor) -> dict:
    """Compare with LocalRunner: exact for the same execution, max abs error across batching."""
    ref = reference_latents(cfg)
    out = {"equal_to_local": bool(torch.equal(latents, ref)),
           "max_abs_err_vs_local": float((latents - ref).abs().max())}
    if cfg.batch_stride and cfg.stride == 2:
        plain = reference_latents(cfg, batch_stride=False)
        out["max_abs_err_vs_unbatched_local"] = float((latents - plain).abs().max())
        out["batched_vs_unbatched_local_err"] = float((ref - plain).abs().max())
    return out


# -- process group entry points ---------------------------------------------------------

def init_group(rank: int | None = None, world: int | None = None, port: int | None = None,
               device: str = "cpu") -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if port is None:  # torchrun: env:// rendezvous
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def run_jobs(cfgs: list[RunConfig], threads: int = 1, do_check: bool = False) -> list[dict]:
    """Run each config in turn on the current group (consecutive equal configs reuse the model).

    Every rank returns one dict per config; ``latents`` and ``check`` are set on the latent owner.
    """
    torch.set_num_threads(threads)
    results, runner, built = [], None, None
    for cfg in cfgs:
        if dist.get_world_size() < cfg.world_size:
            raise ValueError(f"{cfg} needs {cfg.world_size} ranks, the group has {dist.get_world_size()}")
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
    import queue as queue_mod

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
    results, deadline = [], time.monotonic() + timeout_s
    try:
        while len(results) < len(cfgs):
            try:
                results.append(results_q.get(timeout=1.0))
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
    for _, res in results:
        res["latents"] = torch.from_numpy(res["latents"])
    return [res for _, res in sorted(results, key=lambda kr: kr[0])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m asyncdiff.runners.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15", help="built-in config name, 'tiny', or a diffusers folder")
    p.add_argument("--components", type=int, required=True)
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-stride", action="store_true", help="S=2 on N ranks: last component batched x2")
    p.add_argument("--latent", type=int, help="latent side (default: the UNet's sample_size)")
    p.add_argument("--partition", help="a saved Partition JSON (overrides FLOP balancing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "euler", "dpmsolver++"))
    p.add_argument("--time-shift", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses LOCAL_RANK's GPU, NCCL)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1 for exactness)")
    p.add_argument("--runs", type=int, default=1, help="timed generations (the first includes warm-up)")
    p.add_argument("--check", action="store_true", help="compare with LocalRunner on the latent owner")
    p.add_argument("--json", help="write config, timings per rank and check results here (rank 0)")
    a = p.parse_args(argv)
    device = a.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    cfg = RunConfig(
        model=a.model, components=a.components, stride=a.stride, warmup=a.warmup, steps=a.steps,
        batch_stride=a.batch_stride, latent=a.latent, partition_file=a.partition,
        seed=a.seed, guidance=a.guidance, scheduler=a.scheduler, time_shift=a.time_shift, device=device,
    )
    if "WORLD_SIZE" not in os.environ:
        p.error(f"launch with: torchrun --nproc_per_node={cfg.world_size} -m asyncdiff.runners.distributed ...")
    init_group(device=device)
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
    if failed and not (cfg.batch_stride or device != "cpu"):
        raise SystemExit("check FAILED: distributed latents differ from LocalRunner")


if __name__ == "__main__":
    main()
