"""The cost model: projected speedup of a plan on a placement. The only "ideal speedup" formula.

Pure Python. Sequential time is T steps of one full denoiser call. The
AsyncDiff run is replayed step by step on the placement:

* warm-up step: the components run one after another on their devices, so it
  costs one full denoiser call (``denoiser_cost``, default: the sum of the
  component costs) plus every cut's transfer (``transfer_cost``);
* compute round: every device runs its calls of the round at once; the round
  costs the busiest device (a device running both stride timesteps as one
  doubled batch counts the component twice) plus ``transfer_cost``, the
  critical per-round communication;
* communication-only step (S=2): free;
* host (``host_cost``, the serving host's time per call that no component runs: the
  call's round trip through the pipeline model and, once per step, guidance and the
  scheduler step; measured at N=1 by ``benchmarks.step_overhead`` as served step time
  minus component time).  A warm-up step pays it once per call.  A compute round costs
  at least the mean component load plus ``host_cost``: with dataflow dispatch
  (``asyncdiff.dataflow``) component k's call of round t waits for component k-1's of
  round t-1 and component 0's for the scheduler step, so the chain 0 -> 1 -> ... -> N-1
  -> scheduler -> 0 spans N rounds and holds every component once and N round trips:
  (sum of costs + N * host) / N per round (an upper bound: the scheduler step is paid
  once per chain, counted here N times).  The sequential baseline pays it per step too.
  Moving work off component 0 does not shorten that chain, so the partition stays
  balanced on component costs alone.
* outer ring (the paper's SDXL layout): a warm-up step also runs the ring's front
  call before component 0, charged ``front_costs[k]`` (default: the whole ring, what
  an executor with one model per component pays by running the ring on
  placeholders; the torch runners run only the front stages).

    speedup = T * denoiser_cost / sum(step costs)

With ``balanced(N)`` costs and no transfer cost this is the textbook ideal
(e.g. N2S1, T=20, w=1: 20 / (1 + 19/2) = 1.90x). With a partition's cost
shares it is the ideal of that cut; with measured times and transfers it is
the projection of a real machine.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from asyncdiff.placement import Placement
from asyncdiff.schedule import Plan, make_plan


@dataclass(frozen=True)
class Projection:
    sequential: float  # T * denoiser cost
    asynchronous: float  # the plan's projected time, same unit
    warmup_steps: int
    rounds: int
    round_cost: float  # busiest device of a compute round, transfer included
    speedup: float

    def to_json(self) -> dict:
        return asdict(self)


def balanced(n: int, batched_stride: bool = False) -> list[float]:
    """The best cut's component costs (summing to one denoiser call).

    Equal shares; with batched stride the last component runs twice per round,
    so the best cut gives it half the share of the others.
    """
    if not batched_stride or n == 1:
        return [1.0 / n] * n
    return [2.0 / (2 * n - 1)] * (n - 1) + [1.0 / (2 * n - 1)]


def project(plan: Plan, placement: Placement, component_costs: Sequence[float],
            transfer_cost: float = 0.0, denoiser_cost: float | None = None,
            front_costs: Sequence[float] | None = None, host_cost: float = 0.0) -> Projection:
    """Replay ``plan`` on ``placement`` with per-component and per-round transfer costs
    (``front_costs``: the outer ring's front call, per component; default the whole one;
    ``host_cost``: the host's time per call, see the module docstring)."""
    if len(component_costs) != plan.components or placement.components != plan.components:
        raise ValueError(f"plan has {plan.components} components, placement "
                         f"{placement.components}, costs {len(component_costs)}")
    if any(c < 0 for c in component_costs) or transfer_cost < 0 or host_cost < 0:
        raise ValueError("costs must be >= 0")
    full = sum(component_costs) if denoiser_cost is None else denoiser_cost
    total, warm, rounds, round_cost = 0.0, 0, 0, 0.0
    for step in plan.steps:
        if step.mode == "warmup":
            warm += 1
            cuts = plan.components - 1
            front = component_costs if front_costs is None else front_costs
            fronts = sum(front[c.component] for c in step.calls if c.section == "front")
            total += full + fronts + (transfer_cost if cuts else 0.0) + host_cost * len(step.calls)
        elif step.mode == "compute":
            rounds += 1
            load: dict[int, float] = {}
            for pos, call in enumerate(step.calls):
                rank = placement.rank_of(step, pos)
                load[rank] = load.get(rank, 0.0) + component_costs[call.component]
            chain = sum(component_costs[c.component] for c in step.main_calls) / plan.components
            round_cost = max(max(load.values()), chain + host_cost) + transfer_cost
            total += round_cost
    sequential = plan.steps_total * (full + host_cost)
    return Projection(sequential, total, warm, rounds, round_cost,
                      sequential / total if total else float("inf"))


def projected_speedup(plan: Plan, placement: Placement, component_costs: Sequence[float],
                      transfer_cost: float = 0.0, denoiser_cost: float | None = None,
                      host_cost: float = 0.0) -> float:
    return project(plan, placement, component_costs, transfer_cost, denoiser_cost,
                   host_cost=host_cost).speedup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m asyncdiff.cost",
                                description="Projected AsyncDiff speedup (balanced components).")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--components", type=int, required=True)
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batched-stride", action="store_true")
    p.add_argument("--host", type=float, default=0.0,
                   help="host time per call as a fraction of one denoiser call (e.g. 1 ms of host "
                   "on a 20 ms UNet: 0.05); default 0")
    a = p.parse_args(argv)
    if a.host < 0:
        p.error(f"--host must be >= 0, got {a.host}")
    try:
        plan = make_plan(a.steps, a.components, a.stride, a.warmup)
        place = Placement(a.components, a.stride, a.batched_stride)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps({"placement": place.to_json(),
                      "projection": project(plan, place, balanced(a.components, a.batched_stride),
                                            host_cost=a.host).to_json()}))


if __name__ == "__main__":
    main()
