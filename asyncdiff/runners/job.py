"""One distributed job: its configuration, model, seeded inputs and LocalRunner reference.

Everything here is deterministic from the ``RunConfig``, so every rank (and the
reference check) rebuilds the same partition, components and inputs on its own.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass

import torch

from asyncdiff.contract import Request
from asyncdiff.generation import Generation
from asyncdiff.partition import CONDITIONING_ROLES, Partition
from asyncdiff.placement import Placement
from asyncdiff.runners.local import LocalRunner

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
    batched_stride: bool = False
    latent: int | None = None  # latent side; default: the UNet's sample_size
    partition_file: str | None = None  # a saved Partition (e.g. balanced by measured time)
    cuts: list[str] | None = None  # explicit cut points (stage names) instead of balancing
    seed: int = 0  # initial noise and random conditioning
    weights_seed: int = 0  # random weights of built-in UNets
    guidance_scale: float = 3.0
    scheduler: str = "ddim"
    time_shift: bool = False
    device: str = "cpu"  # "cpu", or "cuda": rank r on CUDA device gpus[r]
    gpus: tuple[int, ...] | None = None  # with "cuda"; default 0..world_size-1
    layout: str = "sequential"  # or "outer_ring": component N-1 holds the first and last stages

    @property
    def placement(self) -> Placement:
        """Ranks of every call; raises Placement's message for an impossible configuration."""
        place = Placement(self.components, self.stride, self.batched_stride)
        if self.device == "cpu":
            return place
        return Placement.for_devices(self.components, self.stride, self.batched_stride,
                                     self.gpus or tuple(range(place.world_size)))

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    def request(self) -> Request:
        return Request("random conditioning", seed=self.seed, steps=self.steps, warmup=self.warmup,
                       guidance_scale=self.guidance_scale, scheduler=self.scheduler).validate()

    def generation(self, partition: Partition, cond: dict, timesteps: torch.Tensor | None = None,
                   device: str = "cpu", batched_stride: bool | None = None) -> Generation:
        """This job's Generation; with ``timesteps`` it only routes (no scheduler, no latents)."""
        return Generation(
            partition, [self.request()], cond, scheduler_config(self.model) if timesteps is None else None,
            time_shift=self.time_shift, device=device, timesteps=timesteps,
            batched_stride=self.batched_stride if batched_stride is None else batched_stride,
        )


_PARTITIONS: dict[tuple, Partition] = {}  # FLOP partitions by config: cheap to share, slow to profile


def get_partition(cfg: RunConfig, unet=None) -> Partition:
    """The partition of ``cfg``: a saved file, the given cuts, or FLOP balancing (deterministic
    on every rank)."""
    if cfg.partition_file:
        return Partition.load(cfg.partition_file)
    key = (cfg.model, cfg.weights_seed, cfg.components, cfg.stride, cfg.batched_stride, cfg.latent,
           tuple(cfg.cuts or ()), cfg.layout)
    if key not in _PARTITIONS:
        from asyncdiff.configs import load_unet
        from asyncdiff.partition import partition_unet

        unet = unet if unet is not None else load_unet(cfg.model, device="meta")
        size = cfg.latent or unet.config.sample_size
        _PARTITIONS[key] = partition_unet(
            unet, cfg.components, model=cfg.model, batch=2, height=size, width=size,
            stride=cfg.stride, batched_stride=cfg.batched_stride, cuts=cfg.cuts,
            layout=cfg.layout,
        )
    return _PARTITIONS[key]


def build_model(cfg: RunConfig, keep: set[int] | None = None, device: str | None = None):
    """(partition, components) -- components not in ``keep`` are None and their modules freed."""
    from asyncdiff.components import Component
    from asyncdiff.configs import load_unet
    from asyncdiff.stages import build_stage_graph

    unet = load_unet(cfg.model, seed=cfg.weights_seed)
    partition = get_partition(cfg, unet)
    graph = build_stage_graph(unet)
    device = device or cfg.placement.device(0)
    comps = [
        Component(graph, spec).eval().to(device) if keep is None or spec.index in keep else None
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


def make_conditioning(cfg: RunConfig, partition: Partition) -> dict[str, torch.Tensor]:
    """Seeded random ``[uncond; cond]`` states (+ SDXL's text_embeds/time_ids) of the shapes the
    partition's components take, so any process can rebuild them."""
    from asyncdiff.configs import example_inputs, load_unet

    shape = next(t.shape for c in partition.components for t in c.inputs if t.role == "latent")
    config = load_unet(cfg.model, device="meta").config
    _, _, text, extra = example_inputs(config, 2, shape[2], shape[3], seed=cfg.seed + 1)
    everything = {"encoder_hidden_states": text, **extra}
    return {k: everything[k] for k in cond_shapes(partition)}


def cond_shapes(partition: Partition) -> dict[str, list[int]]:
    """Conditioning inputs any component takes, in a fixed order (the broadcast order)."""
    shapes = {t.name: t.shape for c in partition.components for t in c.inputs if t.role in CONDITIONING_ROLES}
    return dict(sorted(shapes.items()))


def tensor_shapes(partition: Partition) -> dict[str, list[int]]:
    shapes = {}
    for comp in partition.components:
        for t in comp.inputs + comp.outputs:
            shapes[t.name] = list(t.shape)
    return shapes


def reference_latents(cfg: RunConfig, batched_stride: bool | None = None) -> torch.Tensor:
    """LocalRunner on the same partition, plan, seed and conditioning."""
    partition, comps = build_model(cfg)
    device = cfg.placement.device(0)
    cond = {k: v.to(device) for k, v in make_conditioning(cfg, partition).items()}
    gen = cfg.generation(partition, cond, device=device, batched_stride=batched_stride)
    return LocalRunner(comps).generate(gen)


def check(cfg: RunConfig, latents: torch.Tensor) -> dict:
    """Compare with LocalRunner: exact for the same execution, max abs error across batching."""
    ref = reference_latents(cfg)
    out = {"equal_to_local": bool(torch.equal(latents, ref)),
           "max_abs_err_vs_local": float((latents - ref).abs().max())}
    if cfg.batched_stride:
        plain = reference_latents(cfg, batched_stride=False)
        out["max_abs_err_vs_unbatched_local"] = float((latents - plain).abs().max())
        out["batched_vs_unbatched_local_err"] = float((ref - plain).abs().max())
    return out
