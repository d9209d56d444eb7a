"""Who sends which tensor to whom, and when: a plan replayed on placeholders.

``build_routes`` runs the plan through an ``ActivationCache`` holding ``Msg``
placeholders instead of tensors, so every value a call reads names the rank and
step that produced it.  Each producer then sends exactly the interface tensors a
consumer reads (point to point, once), and the latent owner -- the rank whose
component takes ``sample`` and which runs the scheduler -- receives the noise
prediction the plan picks for each step.

Every message travels in the *phase* it is produced in: ``(step, wave)``, with
wave -1 for the latent (sent before the step's first wave).  Each rank exchanges
all of a phase's messages in one batch and visits phases in plan order, so a
send and its receive always sit in the same batch on both ranks: no posting
order can form a wait cycle (see ``exchanges``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from asyncdiff.runners.cache import ActivationCache
from asyncdiff.schedule import Plan

LATENT = "sample"

Phase = tuple[int, int]  # (step, wave); wave -1: the latent, before the step's first wave


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


class Op(NamedTuple):
    """One point-to-point operation of a rank: ``send`` to or ``recv`` from ``peer``."""

    kind: str
    peer: int
    msg: Msg


def send_key(msg: Msg) -> tuple[int, int, int]:
    return (msg.step, msg.slot, msg.order)


@dataclass
class Routes:
    """Routing of one plan, identical on every rank."""

    latent_owner: int
    needs: dict[tuple[int, int], list[Msg]] = field(default_factory=lambda: defaultdict(list))
    eps: dict[int, Msg] = field(default_factory=dict)  # step -> remote eps for the latent owner
    dests: dict[Msg, list[int]] = field(default_factory=lambda: defaultdict(list))
    phase: dict[Msg, Phase] = field(default_factory=dict)  # when each routed message is produced

    def exchanges(self, rank: int) -> dict[Phase, list[Op]]:
        """``rank``'s operations, one batch per phase, phases in plan order.

        Within a batch, operations between the same two ranks are listed by
        ``send_key`` on both ends, which is how NCCL and gloo match them.
        """
        batches: dict[Phase, list[Op]] = defaultdict(list)
        for msg, dsts in self.dests.items():
            for dst in dsts:
                if msg.src == rank:
                    batches[self.phase[msg]].append(Op("send", dst, msg))
                elif dst == rank:
                    batches[self.phase[msg]].append(Op("recv", msg.src, msg))
        return {p: sorted(ops, key=lambda op: (send_key(op.msg), op.peer, op.kind))
                for p, ops in sorted(batches.items())}


def latent_owner(partition: Partition) -> int:
    for comp in partition.components:
        if any(t.role == "latent" for t in comp.inputs):
            return comp.index
    raise ValueError("no component takes the latent")


def build_routes(partition: Partition, plan: Plan, placement: Placement) -> Routes:
    """Replay ``plan`` through an ActivationCache of placeholders to find who sends what to whom."""
    routes = Routes(latent_owner(partition))
    cache = ActivationCache(partition, plan)
    outputs = {c.index: c.output_names for c in partition.components}
    produced: dict[Msg, Phase] = {}

    def need(rank: int, msg: Msg, key: tuple[int, int]) -> None:
        if msg.src != rank and rank not in routes.dests[msg]:
            routes.dests[msg].append(rank)
            routes.needs[key].append(msg)

    for i, st in enumerate(plan.steps):
        latent = Msg(LATENT, i, routes.latent_owner, -1, 0)
        produced[latent] = (i, -1)
        for w, wave in enumerate(cache.waves(i)):
            for pos, call in wave:
                r = placement.rank_of(st, pos)
                for msg in cache.inputs(i, call, latent).values():
                    need(r, msg, (r, i))
            for pos, call in wave:
                r = placement.rank_of(st, pos)
                outs = {name: Msg(name, i, r, pos, j) for j, name in enumerate(outputs[call.component])}
                produced.update(dict.fromkeys(outs.values(), (i, w)))
                cache.record(i, pos, outs)
        eps = cache.noise_pred(i)
        if eps.src != routes.latent_owner:  # the step's noise prediction, to the scheduler
            routes.dests[eps].append(routes.latent_owner)
            routes.eps[i] = eps
    routes.phase = {msg: produced[msg] for msg in routes.dests}
    return routes
