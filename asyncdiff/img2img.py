"""img2img: from an init image to the starting latents and the timesteps that remain.

Pure torch (no Triton): the in-process pipeline and the BLS both use it, so a
served img2img request starts exactly where diffusers'
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` start
with ``generator=[torch.Generator().manual_seed(s) for s in seeds]``:

1. ``preprocess``: uint8 [H, W, 3] -> float [B, 3, H, W] in [-1, 1] (no resizing).
2. The VAE encoder (``encode_moments``; served: the ``vae_encoder`` model) gives the
   posterior's moments, mean and log-variance concatenated on the channels.
3. ``init_latents``: per image, ONE CPU generator seeded with its seed draws first
   the posterior sample, then the noise img2img adds (diffusers' order).
4. ``img2img_timesteps``: the scheduler's timesteps cut by STRENGTH
   (diffusers' ``get_timesteps``); the generation adds the noise at the first of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from asyncdiff.contract import INIT_IMAGE

LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
# ITU-R 601 luma, as PIL's convert("L"): a one-channel VAE (the tiny model) sees RGB this way.
LUMA = (0.299, 0.587, 0.114)


def preprocess(images, height: int, width: int) -> torch.Tensor:
    """uint8 RGB [H, W, 3] or [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], as diffusers'
    VaeImageProcessor makes of an image already at the target size. A wrong size or dtype is
    a ValueError naming INIT_IMAGE (no resizing: the request's size is the image's)."""
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"{INIT_IMAGE.name} must be uint8 RGB, got {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != (height, width, 3):
        raise ValueError(f"{INIT_IMAGE.name} must be [HEIGHT, WIDTH, 3] = [{height}, {width}, 3] "
                         f"uint8 (the request's size), got {list(array.shape)}")
    x = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).float() / 255.0  # a writable copy
    return 2.0 * x - 1.0


def to_vae_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, 3, H, W] -> the VAE's input channels: as is for 3, luma for 1 (linear, so it
    commutes with the [-1, 1] normalisation)."""
    if channels == image.shape[1]:
        return image
    if channels == 1 and image.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=image.dtype, device=image.device).reshape(1, 3, 1, 1)
        return (image * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot feed a {image.shape[1]}-channel image to a {channels}-channel VAE")


def encode_moments(vae, image: torch.Tensor) -> torch.Tensor:
    """The VAE encoder: image [B, 3, H, W] in [-1, 1] -> moments [B, 2C, h, w] (the
    parameters of diffusers' DiagonalGaussianDistribution). The served ``vae_encoder`` graph
    is this function."""
    x = to_vae_channels(image, int(vae.config.in_channels))
    return vae.encode(x).latent_dist.parameters


def init_latents(moments: torch.Tensor, seeds: Sequence[int], scaling_factor: float,
                 shift_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled posterior samples, noise), each [B, C, h, w] fp32 on the CPU.

    Image b uses ``torch.Generator().manual_seed(seeds[b])``: it draws the posterior sample
    (mean + std * randn), then from the same generator the noise of that image's shape, as
    diffusers does with a list of per-image generators. Sampled in fp32 whatever the
    encoder served (diffusers upcasts SDXL's VAE; an fp16 VAE would draw other numbers).
    """
    moments = moments.detach().float().cpu()
    if moments.dim() != 4 or moments.shape[1] % 2:
        raise ValueError(f"moments must be [B, 2C, h, w], got {list(moments.shape)}")
    if len(seeds) != moments.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {moments.shape[0]} images")
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    samples, noises = [], []
    for b, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        eps = torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32)
        samples.append(mean[b:b + 1] + std[b:b + 1] * eps)
        noises.append(torch.randn((1, *mean.shape[1:]), generator=g, dtype=torch.float32))
    latents = torch.cat(samples)
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor, torch.cat(noises)


def start_step(steps: int, strength: float) -> int:
    """The index of the first timestep an img2img request runs (diffusers' ``t_start``)."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def steps_to_run(steps: int, strength: float, warmup: int = 1) -> int:
    """How many of STEPS an img2img request runs; ValueError naming STRENGTH when none, or
    WARMUP when too few are left for it (1 <= WARMUP < steps run, 1 when one runs)."""
    run = steps - start_step(steps, strength)
    if run < 1:
        raise ValueError(f"STRENGTH {strength} x STEPS {steps} leaves no step to run "
                         f"(int(STEPS x STRENGTH) must be >= 1): raise STRENGTH or STEPS")
    top = max(1, run - 1)
    if not 1 <= warmup <= top:
        raise ValueError(f"WARMUP must be in [1, {top}] when STRENGTH {strength} x STEPS {steps} "
                         f"leaves {run} steps to run, got {warmup}")
    return run


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an img2img request runs, after ``scheduler.set_timesteps(steps)``;
    sets the scheduler's begin index where it has one (Euler's and DPM-Solver's step index
    and ``add_noise`` read it)."""
    begin = start_step(steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def noised_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """The starting latents: ``latents`` noised to the first remaining timestep."""
    first = timesteps[:1].repeat(latents.shape[0])
    return scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), first)
