"""Text-to-image sampling with an AsyncDiff plan: the reference every executor is compared to.

The pieces (request validation, tokenisation, seeded latents, schedulers,
classifier-free guidance, decoding) are plain functions so that the Triton
BLS model reuses them and only swaps how a step's components are executed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asyncdiff.schedule import make_plan

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
SCHEDULERS = ("ddim", "euler", "dpmsolver++")


@dataclass
class Request:
    """One generation's parameters, with the server's defaults."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 3.0
    warmup: int = 1
    scheduler: str = "ddim"

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("PROMPT must be a non-empty UTF-8 string")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"STEPS must be in [1, {MAX_STEPS}], got {self.steps}")
        top = max(1, self.steps - 1)
        if not 1 <= self.warmup <= top:
            raise ValueError(f"WARMUP must be in [1, {top}] (1 <= WARMUP < STEPS), got {self.warmup}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"GUIDANCE_SCALE must be a finite number >= 0, got {self.guidance_scale}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"SEED must be in [0, {MAX_SEED}], got {self.seed}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SCHEDULER must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler (they are stateful: one per generation)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"SCHEDULER must be one of {list(SCHEDULERS)}, got {name!r}")


def token_ids(tokenizer, prompt: str) -> np.ndarray:
    """Padded token ids [1, max_length]; a prompt over the limit is rejected, not truncated."""
    limit = tokenizer.model_max_length
    n = len(tokenizer(prompt).input_ids)
    if n > limit:
        raise ValueError(
            f"PROMPT is {n} tokens including start/end; the limit is {limit}: shorten it"
        )
    ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=True).input_ids
    return np.asarray([ids], dtype=np.int64)


def initial_latents(seed: int, shape: tuple[int, ...], init_noise_sigma: float) -> torch.Tensor:
    """Seeded Gaussian latents (CPU generator: the same seed gives the same image anywhere)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32) * init_noise_sigma


def guide(noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + scale * (cond - uncond)


def denoise_steps(scheduler, latents, guidance_scale: float):
    """The sampling loop as a generator: yields ``(i, model_input)``, is sent the step's
    [uncond; cond] noise prediction, and returns the final latents.

    Sync (``denoise``) and async (the Triton BLS) drivers share it.
    """
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = yield i, model_input
        latents = scheduler.step(guide(noise_pred, guidance_scale), t, latents).prev_sample
    return latents


def denoise(scheduler, latents, guidance_scale: float, noise_pred_fn: Callable):
    """Run ``denoise_steps`` with a synchronous ``noise_pred_fn(i, model_input)``."""
    loop = denoise_steps(scheduler, latents, guidance_scale)
    try:
        request = next(loop)
        while True:
            request = loop.send(noise_pred_fn(*request))
    except StopIteration as done:
        return done.value


def to_uint8_image(decoded: torch.Tensor) -> np.ndarray:
    """VAE output [1, C, H, W] in [-1, 1] -> [H, W, 3] uint8 (grey images are replicated)."""
    img = (decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    if img.shape[-1] == 1:
        img = img.expand(-1, -1, 3)
    return (img * 255).round().to(torch.uint8).numpy()


class AsyncDiffPipeline:
    """A diffusers Stable Diffusion pipeline whose UNet runs as an AsyncDiff plan in-process."""

    def __init__(self, sd_pipe, components: int = 2, stride: int = 1, *, layout="sequential",
                 cost="flops", batch_stride: bool = False, latent_size: int | None = None):
        from asyncdiff.components import build_components
        from asyncdiff.partition import partition_unet
        from asyncdiff.runners import LocalRunner

        self.sd = sd_pipe
        size = latent_size or sd_pipe.unet.config.sample_size
        self.latent_shape = (1, sd_pipe.unet.config.in_channels, size, size)
        self.partition = partition_unet(
            sd_pipe.unet, components, model="pipeline", batch=2, height=size, width=size,
            metric=cost, stride=stride, layout=layout, batched_stride=batch_stride,
        )
        self.runner = LocalRunner(build_components(sd_pipe.unet, self.partition), batch_stride)

    @classmethod
    def from_pretrained(cls, path: str | Path = "tiny", **kwargs) -> "AsyncDiffPipeline":
        from diffusers import StableDiffusionPipeline

        if str(path) == "tiny":
            from asyncdiff.tiny import MODEL_DIR

            path = MODEL_DIR
        return cls(StableDiffusionPipeline.from_pretrained(path).to("cpu"), **kwargs)

    @torch.no_grad()
    def encode_text(self, prompt: str, negative_prompt: str) -> torch.Tensor:
        """[uncond; cond] text states, batch 2."""
        ids = np.concatenate([token_ids(self.sd.tokenizer, p) for p in (negative_prompt, prompt)])
        return self.sd.text_encoder(torch.from_numpy(ids))[0]

    @torch.no_grad()
    def generate_latents(self, req: Request, time_shift: bool = False) -> torch.Tensor:
        from asyncdiff.runners import ActivationCache

        req.validate()
        scheduler = make_scheduler(req.scheduler, self.sd.scheduler.config)
        scheduler.set_timesteps(req.steps)
        text = self.encode_text(req.prompt, req.negative_prompt)
        plan = make_plan(req.steps, self.partition.num_components, self.partition.stride,
                         req.warmup, time_shift)
        cache = ActivationCache(self.partition, plan)
        latents = initial_latents(req.seed, self.latent_shape, scheduler.init_noise_sigma)
        cond = {"encoder_hidden_states": text}

        def noise_pred(i, model_input):
            return self.runner.noise_pred(cache, i, model_input, cond, scheduler.timesteps)

        return denoise(scheduler, latents, req.guidance_scale, noise_pred)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.sd.vae
        return to_uint8_image(vae.decode(latents / vae.config.scaling_factor).sample)

    def __call__(self, req: Request, time_shift: bool = False) -> np.ndarray:
        return self.decode(self.generate_latents(req, time_shift))
