"""Per-stage cost (FLOPs or measured time) and output shapes at a target latent size."""

from __future__ import annotations

import time
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
    shapes: dict[str, list[int]]  # stage name -> output shape (batch first)
    input_shapes: dict[str, list[int]]  # pipeline inputs: sample, timestep, encoder_hidden_states, ...
    metric: str


def profile_stages(
    graph: StageGraph, batch: int, height: int, width: int, metric: str = "flops", repeats: int = 3
) -> StageProfile:
    """Run the stage graph once per stage at (batch, latent height, width) and measure each stage.

    ``flops`` works on a ``meta``-device UNet (no weights needed); ``time`` needs real weights
    and reports the median of ``repeats`` calls on the current device and thread setting.
    """
    if metric not in METRICS:
        raise ValueError(f"cost metric must be one of {METRICS}, got {metric!r}")
    check_sample_size(graph.config, height, width)
    weight = next(graph.time_embedding.parameters())
    sample, timestep, text, extra = example_inputs(graph.config, batch, height, width, weight.device)
    sample, text = sample.to(weight.dtype), text.to(weight.dtype)  # fp16 UNets take fp16 inputs
    extra = {k: v.to(weight.dtype) for k, v in extra.items()}
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text, **extra}
    costs, shapes, values = [], {}, {}
    with torch.no_grad():
        temb = graph.time_embedding(expand_timestep(timestep, sample), sample.dtype, **extra)
        h = sample
        for stage in graph.stages:
            args = (h, values[stage.skip] if stage.skip else None, temb, text)
            costs.append(_measure(stage, args, metric, repeats))
            h = values[stage.name] = stage(*args)
            shapes[stage.name] = list(h.shape)
    input_shapes = {k: list(v.shape) for k, v in inputs.items()}
    return StageProfile(graph.names, costs, shapes, input_shapes, metric)


def _measure(stage, args, metric: str, repeats: int) -> float:
    if metric == "flops":
        counter = FlopCounterMode(display=False)
        with counter:
            stage(*args)
        return float(counter.get_total_flops())
    device = args[0].device
    times = []
    for _ in range(repeats + 1):  # the first call warms caches and is dropped
        _synchronize(device)
        t0 = time.perf_counter()
        stage(*args)
        _synchronize(device)  # GPU kernels are asynchronous: time the work, not the launch
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
