"""Per-stage cost (FLOPs or measured time) and output shapes at a target latent size."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from asyncdiff.configs import example_inputs
from asyncdiff.stages import StageGraph, check_sample_size, expand_timestep

METRICS = ("flops", "time")


@dataclass
class StageProfile:
    names: list[str]
    costs: list[float]  # FLOPs, or seconds per call
    shapes: dict[str, list[int]]  # tensor (stage output) name -> shape (batch first)
    input_shapes: dict[str, list[int]]  # pipeline inputs: sample, timestep, encoder_hidden_states, ...
    metric: str
    latent: list[int] | None = None  # [height, width] of the latent (FLUX packs its sample)


def _weight(graph: StageGraph) -> torch.Tensor:
    """A parameter of ``graph``: it carries the graph's dtype and device."""
    return next(graph.time_embedding.parameters())


def stage_inputs(graph: StageGraph, batch: int, height: int, width: int,
                 device: str | torch.device | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded pipeline inputs for ``graph`` on ``device`` (default: the weights'), cast to the
    graph's dtype like export casts them (``cast_inputs``)."""
    check_sample_size(graph.config, height, width)
    if device is None:
        device = _weight(graph).device
    sample, timestep, text, extra = example_inputs(graph.config, batch, height, width, device, seed)
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text, **extra}
    return cast_inputs(graph, inputs)


def cast_inputs(graph: StageGraph, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float inputs in the graph's dtype (fp16 UNets take fp16 inputs), except the timestep:
    it feeds a sinusoidal projection computed in fp32; a scalar timestep becomes per-sample."""
    dtype = _weight(graph).dtype
    out = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v
           for k, v in inputs.items()}
    out["timestep"] = expand_timestep(inputs["timestep"], inputs["sample"])
    return out


def profile_stages(
    graph: StageGraph, batch: int | None = None, height: int | None = None,
    width: int | None = None, metric: str = "flops", repeats: int = 3, *,
    inputs: dict[str, torch.Tensor] | None = None, device: str | torch.device | None = None,
    warmup: int = 1,
) -> StageProfile:
    """Run the stage graph once and measure each stage call on its real inputs.

    Inputs: ``inputs`` (cast by ``cast_inputs``), or seeded ones at (batch, latent height,
    width) on ``device`` (default: the weights' device). ``flops`` works on a ``meta``-device
    UNet (no weights needed); ``time`` needs real weights and reports the median of
    ``repeats`` calls after ``warmup`` ones (``time_calls``: CUDA events on a GPU).
    """
    if metric not in METRICS:
        raise ValueError(f"cost metric must be one of {METRICS}, got {metric!r}")
    if inputs is None:
        if batch is None or height is None or width is None:
            raise ValueError("profile_stages needs inputs=... or batch, height and width")
        inputs = stage_inputs(graph, batch, height, width, device)
    else:
        height, width = latent_size(graph, inputs)
        check_sample_size(graph.config, height, width)
        inputs = cast_inputs(graph, inputs)
    costs: list[float] = []

    def measure(stage, args):
        costs.append(_measure(lambda: stage(*args), metric, repeats, warmup, args[0].device))
        return stage(*args)

    with torch.no_grad():
        values = graph.run(dict(inputs), on_stage=measure)
    shapes = {n: list(values[n].shape) for n in graph.tensors}
    input_shapes = {k: list(v.shape) for k, v in inputs.items()}
    return StageProfile(graph.names, costs, shapes, input_shapes, metric, [height, width])


def latent_size(graph: StageGraph, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Latent (height, width) of ``inputs``: the sample's last two sides, or for FLUX's packed
    sample twice the token grid that ``img_ids`` spans."""
    if graph.kind != "flux":
        return tuple(inputs["sample"].shape[-2:])
    ids = inputs["img_ids"]
    if ids.device.type == "meta":
        raise ValueError("a FLUX profile on the meta device needs batch, height and width")
    ids = ids.reshape(-1, ids.shape[-1])
    return int(ids[:, 1].max()) * 2 + 2, int(ids[:, 2].max()) * 2 + 2


def _measure(call: Callable[[], object], metric: str, repeats: int, warmup: int,
             device: torch.device) -> float:
    if metric == "flops":
        counter = FlopCounterMode(display=False)
        with counter:
            call()
        return float(counter.get_total_flops())
    times = sorted(time_calls(call, repeats, warmup, device))
    return times[len(times) // 2]


def time_calls(call: Callable[[], object], repeats: int, warmup: int = 1,
               device: str | torch.device = "cpu") -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (they warm caches,
    autotuners and allocators). On CUDA the device is synchronised around every call and
    CUDA events time the GPU work, not the launch."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        call()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return times
    with torch.cuda.device(device):
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            call()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]
