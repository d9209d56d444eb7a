"""Projections and tables of the GPU benchmark: measured times through the one cost model
(``asyncdiff.cost.project``), and the short table printed as the last lines of the run."""

from __future__ import annotations

from asyncdiff.cost import balanced, project
from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from asyncdiff.profile import StageProfile
from asyncdiff.schedule import make_plan

VARIANTS = ("eager", "graph")
COMMS = ("none", "d2d", "host")


def shares(part: Partition, profile: StageProfile | None) -> list[float] | None:
    """Each component's share of ``profile``'s total cost (another metric than the partition's)."""
    if profile is None:
        return None
    cost = dict(zip(profile.names, profile.costs))
    total = sum(profile.costs)
    return [sum(cost[st] for st in c.stages) / total for c in part.components]


def inbound(part: Partition, k: int) -> list[str]:
    """What component k receives per round: tensors from other components, and for the one
    holding ``conv_in`` the latent (standing for the noise prediction's trip back)."""
    comp = part.components[k]
    return [t.name for t in comp.inputs if t.producer is not None or t.name == "sample"]


def critical_comm(part: Partition, transfers: dict, kind: str) -> tuple[float | None, int | None]:
    """(largest per-consumer inbound transfer time in ms, that consumer), None if unmeasured.

    Tensors are copied one after another, so the sum per consumer is conservative."""
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


def ideal(n: int, stride: int, steps: int, warmup: int) -> float:
    """The cost model's speedup of a perfectly balanced cut with free communication."""
    return project(make_plan(steps, n, stride, warmup), Placement(n, stride), balanced(n)).speedup


def describe_partition(part: Partition, profiles: dict, timings: dict, transfers: dict,
                       steps: int, warmup: int, unet: dict) -> dict:
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
    plan = make_plan(steps, part.num_components, part.stride, warmup)
    placement = Placement(part.num_components, part.stride)
    out["rounds"] = plan.parallel_rounds
    for variant in VARIANTS:
        t_unet = unet.get(variant, {}).get("median_ms")
        if t_unet is None:  # no full-UNet graph time: no graph baseline to compare against
            continue
        costs = [component_time(timings[tuple(c.stages)], variant) for c in part.components]
        out["max_ms"][variant] = max(costs)
        for comm in COMMS:
            ms = 0.0 if comm == "none" else out["comm"][comm]["ms"]
            key = f"{variant}_{comm}"
            if ms is None:
                out["speedup"][key] = out["latency_s"][key] = None
                continue
            proj = project(plan, placement, costs, ms, t_unet)
            out["speedup"][key] = proj.speedup
            out["latency_s"][key] = proj.asynchronous / 1e3
    out["sequential_s"] = {v: steps * unet[v]["median_ms"] / 1e3
                           for v in VARIANTS if "median_ms" in unet.get(v, {})}
    return out


# -- tables ------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", width=6) -> str:
    return f"{x:{width}{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def _pct(x) -> str:
    return f"{100 * x:5.1f}%" if x is not None else f"{'-':>6s}"


def print_components(name: str, model: dict) -> None:
    print(f"\n{name}: components (shares of measured stage time / of FLOPs; medians in ms)")
    print(f"{'config':6s} {'part':5s} {'k':>2s} {'stages':22s} {'t-shr':>6s} {'f-shr':>6s} "
          f"{'eager':>8s} {'graph':>8s} {'in MB':>7s}")
    for cfg, entry in model.get("configs", {}).items():
        for metric, part in entry["partitions"].items():
            for c in part["components"]:
                span = f"{c['stages'][0]}..{c['stages'][-1]}"
                print(f"{cfg:6s} {metric:5s} {c['index']:2d} {span:22s} "
                      f"{_pct(c['time_share'])} {_pct(c['flops_share'])} {_fmt(c['eager_ms'], '.3f', 8)} "
                      f"{_fmt(c['graph_ms'], '.3f', 8)} {c['inbound_bytes'] / 1e6:7.2f}")


def print_summary(report: dict) -> None:
    """The short table, printed last: per model the UNet, parity and projected speedups."""
    s = report["settings"]
    print(f"\nSummary ({report.get('env', {}).get('gpu_name') or 'cpu smoke'}; T={s['steps']} "
          f"w={s['warmup']}; speedups from asyncdiff.cost.project on the 'time' partition, "
          f"else 'flops'; comm none/d2d/host)")
    for name, model in report["models"].items():
        unet = model.get("unet", {})
        par = model.get("parity", {})
        print(f"{name} latent {model.get('latent')}: UNet eager {_fmt(unet.get('eager', {}).get('median_ms'), '.2f', 0)} ms, "
              f"graph {_fmt(unet.get('graph', {}).get('median_ms'), '.2f', 0)} ms; "
              f"fp16 vs fp32 rel-L2 UNet {_fmt(par.get('unet', {}).get('rel_l2'), '.2e', 0)}, "
              f"worst component {_fmt(par.get('max_component_rel_l2'), '.2e', 0)}")
        print(f"  {'config':6s} {'GPUs':>4s} {'ideal':>6s} {'eager: none   d2d  host':>24s} "
              f"{'graph: none   d2d  host':>24s} {'paper':>6s}")
        for cfg, entry in model.get("configs", {}).items():
            part = entry["partitions"].get("time") or entry["partitions"].get("flops") or {}
            sp = part.get("speedup", {})
            cells = [_fmt(sp.get(f"{v}_{c}")) for v in VARIANTS for c in COMMS]
            print(f"  {cfg:6s} {entry['gpus']:4d} {_fmt(entry['ideal_balanced'])}       "
                  f"{' '.join(cells[:3])}       {' '.join(cells[3:])} {_fmt(entry.get('paper_speedup'), '.1f')}")
    for item in report["skipped"]:
        print(f"skipped: {item['what']}: {item['reason']}")
