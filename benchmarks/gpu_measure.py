"""Measurements of the GPU benchmark: call timing, CUDA-graph replays, interface transfers and
fp16-vs-fp32 parity. Every function takes the settings and returns JSON-ready dicts."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from asyncdiff.profile import time_calls

RESERVE_S = 15.0  # kept back by the guard for projections and writing the JSON


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    models: list[str]
    latent: int | None  # None: each config's sample_size
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
        return d


class Clock:
    """Elapsed time for progress lines, and the guard: the whole budget, and a per-model deadline
    so that a slow first model leaves the next one its share."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.deadline = budget_s - RESERVE_S
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def share(self, parts_left: int) -> None:
        """Give the next part an equal share of what is left of the budget."""
        left = self.budget_s - RESERVE_S - self.elapsed()
        self.deadline = self.elapsed() + max(left, 0.0) / max(parts_left, 1)

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s < min(self.deadline, self.budget_s - RESERVE_S)

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


# -- timing ------------------------------------------------------------------------------------


def timed(fn, s: Settings) -> dict:
    """Median of ``s.iters`` calls after ``s.warm_iters`` (the core timer: CUDA events on a GPU)."""
    ms = [t * 1e3 for t in time_calls(fn, s.iters, s.warm_iters, s.device)]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "n": len(ms)}


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


def graph_or_skip(fn, s: Settings, clock: Clock, skipped: list, what: str) -> dict:
    if not clock.allows(5.0):
        skipped.append({"what": f"CUDA graph {what}", "reason": "time guard"})
        return {"error": "skipped: time guard"}
    return try_graph(fn, s)


def graph_note(graph: dict | None) -> str:
    if graph is None:
        return ""
    if "median_ms" in graph:
        return f", graph {graph['median_ms']:.3f} ms"
    return f", graph failed ({graph['error']})"


# -- components --------------------------------------------------------------------------------


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
        clock.log(f"component {what} ({key[0]}..{key[-1]}): eager {results[key]['eager']['median_ms']:.3f} ms")
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
        graph = results[key]["graph"] = graph_or_skip(component_fn(comp, values), s, clock, skipped, what)
        if "CUDA unusable" in graph.get("error", ""):
            broken = f"CUDA unusable after the capture of {what}"
            skipped.append({"what": "remaining CUDA graphs", "reason": broken})
        clock.log(f"component {what}{graph_note(graph)}")


# -- transfers ---------------------------------------------------------------------------------


def d2d_mode(s: Settings) -> tuple[str, str | None]:
    if not s.cuda:
        return "host memcpy (smoke, lower bound)", "no GPU: d2d not measured"
    if torch.cuda.device_count() > 1:
        peer = torch.cuda.can_device_access_peer(0, 1)
        return f"cuda:0 -> cuda:1 (peer access {'on' if peer else 'off'})", None
    return "same-device copy (lower bound)", "single GPU: d2d not measured"


def measure_transfers(names: list[str], values: dict, s: Settings, clock: Clock, skipped: list,
                      model: str) -> dict:
    mode, note = d2d_mode(s)
    out = {"d2d_mode": mode, "d2d_note": note, "host_mode": None, "tensors": {}}
    if s.cuda:
        out["host_mode"] = "cuda:0 -> pinned host -> cuda:0 (non_blocking copies, one stream)"
    else:
        skipped.append({"what": f"{model}: host-staged transfers", "reason": "no CUDA device: no pinned-host staging"})
    for name in names:
        if not clock.allows(2.0):
            skipped.append({"what": f"{model}: transfer {name}", "reason": "time guard"})
            continue
        out["tensors"][name] = transfer(values[name], s)
    clock.log(f"{model}: transfers: {len(out['tensors'])} tensors, d2d = {mode}")
    return out


def transfer(t: torch.Tensor, s: Settings) -> dict:
    nbytes = t.numel() * t.element_size()
    rec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": nbytes}
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


# -- fp16 vs fp32 ------------------------------------------------------------------------------


def error(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |got - ref| and ||got - ref|| / ||ref||, computed in fp32."""
    got, ref = got.float(), ref.float()
    diff = got - ref
    norm = ref.norm().item()
    return {"max_abs": diff.abs().max().item(), "rel_l2": diff.norm().item() / norm if norm else None,
            "ref_max_abs": ref.abs().max().item(), "finite": bool(torch.isfinite(got).all())}


@torch.no_grad()
def parity(pairs: dict, values32: dict, values_low: dict, end_to_end: torch.Tensor, final: str,
           dtype: torch.dtype) -> dict:
    """Every component in ``dtype`` against the same component in fp32, both on the fp32 stage
    values (``values_low``: the same, cast as the low-precision model takes them), so errors do
    not compound across components; and the whole stage graph end to end (``end_to_end``).

    ``pairs``: key -> (label, fp32 component, low-precision component)."""
    out = {"dtype": str(dtype).removeprefix("torch.") + " vs float32",
           "unet": error(end_to_end, values32[final]), "components": {}}
    for what, c32, c_low in pairs.values():
        ref = c32(*(values32[n] for n in c32.input_names))
        got = c_low(*(values_low[n] for n in c_low.input_names))
        out["components"][what] = {name: error(g, r) for name, g, r in zip(c32.output_names, got, ref)}
    out["max_component_rel_l2"] = max(
        (e["rel_l2"] or 0.0 for comp in out["components"].values() for e in comp.values()), default=None)
    return out
