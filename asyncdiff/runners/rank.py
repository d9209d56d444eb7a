"""One rank's share of a generation: its calls, and the message batches around them.

Rank r < N owns component r; with plain stride 2 rank N owns the stride copy of
component N-1, with batched stride rank N-1 runs both calls of the last component
as one doubled batch (``Placement`` decides).  Each rank keeps only its own
component's modules and drives its own ``Generation`` (the latent owner's holds
the scheduler and latents; the others only route), running its share of each
wave and handing received tensors to the generation's cache, so the cache's
staleness check guards the distributed dataflow too.  Only the conditioning and
the timesteps are broadcast, once per generation.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from asyncdiff.generation import Generation
from asyncdiff.runners.job import RunConfig, build_model, cond_shapes, make_conditioning, tensor_shapes
from asyncdiff.runners.local import LocalRunner
from asyncdiff.runners.mailbox import Mailbox, Stats, sync
from asyncdiff.runners.routing import LATENT, Msg, build_routes, latent_owner


class DistributedRunner:
    """This rank's share of a plan: its calls, and the messages around them."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.placement = cfg.placement
        self.device = torch.device(self.placement.device(rank))
        self.mine = {min(rank, cfg.components - 1)}  # the stride-copy rank holds component N-1
        self.partition, comps = build_model(cfg, keep=self.mine, device=str(self.device))
        # LocalRunner executes this rank's share of each wave, so the arithmetic is exactly the
        # reference's; it only ever indexes this rank's components.
        self.local = LocalRunner(comps)
        self.params = sum(p.numel() for c in comps if c is not None for p in c.parameters())

    def generate(self, gen: Generation) -> torch.Tensor | None:
        """Run ``gen`` on this rank; the latent owner's ``gen`` has the scheduler and gets the result."""
        self.gen = gen
        self.routes = build_routes(self.partition, gen.plan, self.placement)
        self.stats = Stats()
        self.mail = Mailbox(self.rank, self.routes, tensor_shapes(self.partition), self.device, self.stats)
        self.owner = self.rank == self.routes.latent_owner
        self.taken: set = set()  # (step, Msg) handed to the cache
        t0 = time.perf_counter()
        for i in range(gen.steps):
            self.step(i)
            if self.owner:
                t1 = time.perf_counter()
                gen.advance(i)
                self.stats.sched_s += time.perf_counter() - t1
            else:
                gen.cache.drop_noise_preds()  # this rank's predictions were sent; nothing reads them here
        self.mail.close()
        sync(self.device)
        self.stats.wall_s = time.perf_counter() - t0
        return gen.latents if self.owner else None

    def step(self, i: int) -> None:
        """Plan step ``i`` on this rank: its calls, and the batches of each phase."""
        gen, st = self.gen, self.gen.plan.steps[i]
        latent = gen.model_input(i)  # None but on the latent owner
        self.mail.exchange((i, -1), {} if latent is None else {Msg(LATENT, i, self.rank, -1, 0): latent})
        for w, wave in enumerate(gen.cache.waves(i)):
            mine = [(pos, c) for pos, c in wave if self.placement.rank_of(st, pos) == self.rank]
            produced = {}
            if mine:
                latent = self._receive(i, w, latent)
                produced = self._compute(i, mine, latent)
            self.mail.exchange((i, w), produced)
        remote = self.routes.eps.get(i) if self.owner else None
        if remote is not None:
            gen.cache.receive_noise_pred(i, self.mail.take(remote))

    def _receive(self, i: int, w: int, latent):
        """Hand the tensors this step's calls read to the cache, those that arrived in phases
        before wave ``w`` (the outer ring's back call reads what its front call's wave could not)."""
        for msg in self.routes.needs.get((self.rank, i), ()):
            if self.routes.phase[msg] >= (i, w) or (i, msg) in self.taken:
                continue
            self.taken.add((i, msg))
            value = self.mail.take(msg)
            if msg.name == LATENT:
                latent = value
            else:
                self.gen.cache.receive(msg.name, msg.step, value)
        return latent

    def _compute(self, i: int, mine: list, latent) -> dict[Msg, torch.Tensor]:
        """Run this rank's calls of a wave; returns the outputs other ranks read."""
        calls = self.gen.calls(i, mine, sample=None if self.owner else latent)
        t0 = time.perf_counter()
        outs = self.local.run_wave(calls)
        sync(self.device)
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.calls += len(mine)
        self.stats.batched_calls += int(len(mine) > len(calls))
        self.gen.record(calls, outs)
        produced = {}
        for pos, out in by_position(calls, outs):
            for j, (name, tensor) in enumerate(out.items()):
                msg = Msg(name, i, self.rank, pos, j)
                if msg in self.routes.dests:
                    produced[msg] = tensor
        return produced


def by_position(calls: list, outs: list):
    """(plan position, outputs) of each call; a merged stride pair splits back by rows, as
    ``Generation.record`` splits it."""
    for call, out in zip(calls, outs):
        if call.split is None:
            yield call.positions[0], out
        else:
            yield call.positions[0], {n: v[:call.split] for n, v in out.items()}
            yield call.positions[1], {n: v[call.split:] for n, v in out.items()}


def run_generation(cfg: RunConfig, runner: DistributedRunner | None) -> dict:
    """Collective: every rank of the default group calls it; ranks beyond cfg.world_size idle.

    Returns {"latents": final latents on the latent owner (None elsewhere), "owner",
    "ranks": every active rank's stats}.
    """
    rank = dist.get_rank()
    active = runner is not None
    device = runner.device if active else _idle_device(cfg)
    owner = _agree_owner(latent_owner(runner.partition) if active else -1, device)
    cond, gen = {}, None
    steps = torch.empty(cfg.steps, dtype=torch.float64, device=device)
    if rank == owner:  # the owner's Generation has the scheduler; the others get its timesteps
        cond = {k: v.to(device) for k, v in make_conditioning(cfg, runner.partition).items()}
        gen = cfg.generation(runner.partition, cond, device=str(device))
        steps.copy_(gen.timesteps.to(torch.float64))  # exact for int and fp32 timesteps
    shapes = _agree_cond_shapes(cond_shapes(runner.partition) if active else None, owner)
    for name, shape in shapes.items():  # conditioning: broadcast once per generation
        cond.setdefault(name, torch.empty(shape, device=device))
        dist.broadcast(cond[name], src=owner)
    dist.broadcast(steps, src=owner)
    if active and gen is None:  # float64 holds the timesteps exactly: calls see the same fp32 value
        gen = cfg.generation(runner.partition, cond, timesteps=steps, device=str(device))
    dist.barrier()
    out = runner.generate(gen) if active else None
    stats = None
    if active:
        stats = dict(vars(runner.stats), rank=rank, role=_role(cfg, rank, owner), params=runner.params)
    all_stats = [None] * dist.get_world_size()
    dist.all_gather_object(all_stats, stats)
    return {"latents": out, "owner": owner, "ranks": [s for s in all_stats if s is not None]}


def _idle_device(cfg: RunConfig) -> torch.device:
    """A spare rank joins the collectives on the device its launcher selected."""
    return torch.device("cpu" if cfg.device == "cpu" else f"cuda:{torch.cuda.current_device()}")


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
    if cfg.batched_stride and rank == n - 1 and n > 1:
        role += " (+ batched stride copy)"
    return role + (" + scheduler" if rank == owner else "")
