"""The NCCL posting order, emulated on the CPU: blocking pairwise rendezvous.

NCCL creates a two-rank communicator on the first lone send/recv between two
ranks, and both ranks block there until the other arrives.  Gloo connects every
pair at init, so the gloo tests cannot see a wait cycle; this model can.  Each
rank's program is a list of rendezvous events (key, peers): a rank blocks at an
event until every peer sits at an event with the same key, then they all pass.

* The runner before the fix posted lone isend/irecv in compute order
  (``lone_op_program``, reconstructed from it).  Its ``connect_pairs`` warm-up
  used ``batch_isend_irecv``, which torch runs on the group's communicator (a
  batch is treated like a collective when NCCL picks a communicator), so it
  opened no pair communicator and is not part of the model.
* The runner now exchanges one batch per phase (``Routes.exchanges``); a batch
  is modelled as a rendezvous of all its peers.
"""

from __future__ import annotations

import pytest

from asyncdiff.runners.cache import ActivationCache
from asyncdiff.runners.job import RunConfig, get_partition
from asyncdiff.runners.routing import LATENT, Msg, Routes, build_routes, send_key
from asyncdiff.schedule import make_plan

Event = tuple[tuple, frozenset]


def stuck_ranks(programs: dict[int, list[Event]]) -> list[int]:
    """Simulate blocking rendezvous; the ranks left waiting forever ([] when all finish)."""
    pc = dict.fromkeys(programs, 0)

    def current(r):
        return programs[r][pc[r]] if pc[r] < len(programs[r]) else None

    while True:
        waiting = [r for r in programs if current(r) is not None]
        if not waiting:
            return []
        for r in waiting:
            key, _ = current(r)
            group = {q for q in waiting if current(q)[0] == key}
            # Drop members whose peers are not all present, until the group is closed.
            while any(not current(q)[1] <= group for q in group):
                group = {q for q in group if current(q)[1] <= group}
            if r in group:
                for q in group:
                    pc[q] += 1
                break
        else:
            return waiting


def lone_op_program(routes: Routes, cache: ActivationCache, cfg: RunConfig, rank: int) -> list[Event]:
    """First use of each pair, in the order the runner before the fix posted its lone ops.

    It sent each output right after computing it, posted a source's receives in that
    source's send order up to the one it needed, pre-posted everything produced up to
    the current step after each step, and received the remote noise prediction last.
    """
    placement, outputs = cfg.placement, {c.index: c.output_names for c in cache.partition.components}
    queues: dict[int, list[Msg]] = {}
    for msg, dsts in routes.dests.items():
        if rank in dsts:
            queues.setdefault(msg.src, []).append(msg)
    queues = {src: sorted(msgs, key=send_key) for src, msgs in queues.items()}
    posted, nxt, touched = set(), dict.fromkeys(queues, 0), []

    def post_until(msg):
        while msg not in posted:
            m = queues[msg.src][nxt[msg.src]]
            nxt[msg.src] += 1
            posted.add(m)
            touched.append(m.src)

    def send(msg):
        touched.extend(routes.dests.get(msg, ()))

    owner = rank == routes.latent_owner
    for i, st in enumerate(cache.plan.steps):
        if owner:
            send(Msg(LATENT, i, rank, -1, 0))
        for wave in cache.waves(i):
            mine = [(pos, c) for pos, c in wave if placement.rank_of(st, pos) == rank]
            if mine:
                for msg in routes.needs.get((rank, i), ()):
                    post_until(msg)
                for pos, call in mine:
                    for j, name in enumerate(outputs[call.component]):
                        send(Msg(name, i, rank, pos, j))
        for src, queue in queues.items():
            due = [m for m in queue[nxt[src]:] if m.step <= i]
            if due:
                post_until(due[-1])
        if owner and i in routes.eps:
            post_until(routes.eps[i])
    first = list(dict.fromkeys(touched))
    return [(("pair", min(rank, p), max(rank, p)), frozenset({p})) for p in first]


def batch_program(routes: Routes, rank: int) -> list[Event]:
    return [(("phase", phase), frozenset(op.peer for op in ops))
            for phase, ops in routes.exchanges(rank).items()]


def setup(cfg: RunConfig):
    partition = get_partition(cfg)
    plan = make_plan(cfg.steps, cfg.components, cfg.stride, cfg.warmup)
    return build_routes(partition, plan, cfg.placement), ActivationCache(partition, plan)


CONFIGS = {
    "N2S1": RunConfig(components=2, stride=1, steps=6, latent=16),
    "N3S1": RunConfig(components=3, stride=1, steps=6, latent=16),
    "N3S2": RunConfig(components=3, stride=2, steps=8, latent=16),
    "N3S2-batched": RunConfig(components=3, stride=2, steps=8, latent=16, batched_stride=True),
    "N4S1-w2": RunConfig(components=4, stride=1, steps=6, warmup=2, latent=16),
    "sd21-full-768-N3": RunConfig(model="sd21-full", components=3, steps=6, latent=96),  # the case
}


def test_simulator_finds_a_three_rank_cycle_and_passes_a_global_order():
    def pair(a, b):
        return (("pair", min(a, b), max(a, b)), frozenset({b}))

    cycle = {0: [pair(0, 2), pair(0, 1)], 1: [pair(1, 0), pair(1, 2)], 2: [pair(2, 1), pair(2, 0)]}
    assert stuck_ranks(cycle) == [0, 1, 2]
    ordered = {0: [pair(0, 1), pair(0, 2)], 1: [pair(1, 0), pair(1, 2)], 2: [pair(2, 0), pair(2, 1)]}
    assert stuck_ranks(ordered) == []


@pytest.mark.parametrize("name", ["N3S1", "sd21-full-768-N3"])
def test_lone_ops_deadlock_at_three_ranks(name):
    """The issue's cycle: rank 0 first sends to 2, rank 1 first receives from 0, rank 2 from 1."""
    cfg = CONFIGS[name]
    routes, cache = setup(cfg)
    programs = {r: lone_op_program(routes, cache, cfg, r) for r in range(cfg.world_size)}
    assert [programs[r][0][0] for r in range(3)] == [("pair", 0, 2), ("pair", 0, 1), ("pair", 1, 2)]
    assert stuck_ranks(programs) == [0, 1, 2]


def test_lone_ops_were_fine_at_two_ranks():
    cfg = CONFIGS["N2S1"]
    routes, cache = setup(cfg)
    assert stuck_ranks({r: lone_op_program(routes, cache, cfg, r) for r in range(2)}) == []


@pytest.mark.parametrize("name", list(CONFIGS))
def test_phase_batches_cannot_deadlock(name):
    cfg = CONFIGS[name]
    routes, _ = setup(cfg)
    world = cfg.world_size
    assert stuck_ranks({r: batch_program(routes, r) for r in range(world)}) == []
    # Each message sits in the same phase on both ends, in the same order per pair.
    batches = {r: routes.exchanges(r) for r in range(world)}
    for r in range(world):
        for phase, ops in batches[r].items():
            for peer in {op.peer for op in ops}:
                sent = [op.msg for op in ops if op.kind == "send" and op.peer == peer]
                got = [op.msg for op in batches[peer][phase] if op.kind == "recv" and op.peer == r]
                assert sent == got
    assert sum(len(ops) for b in batches.values() for ops in b.values()) == 2 * sum(
        len(d) for d in routes.dests.values())
