"""Text-to-image with an AsyncDiff plan in-process: the reference every executor is compared to.

The request contract (``Request``, limits, schedulers) is ``asyncdiff.contract``;
the generation loop (scheduler, plan, cache, latents, guidance) is
``asyncdiff.generation``; tokenisation and the text conditioning (SD and SDXL)
are ``asyncdiff.conditioning``.  This module adds image conversion and the
diffusers wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from asyncdiff.conditioning import (  # noqa: F401  (cfg_token_ids, token_ids: the BLS's imports)
    SD, SDXL, SizeConditioning, cfg_token_ids, conditioning_kind, encode_request, token_ids,
)
from asyncdiff.contract import Request
from asyncdiff.generation import Generation, cfg_batch


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output [B, C, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (grey images are replicated)."""
    img = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    if img.shape[-1] == 1:
        img = img.expand(-1, -1, -1, 3)
    return (img * 255).round().to(torch.uint8).cpu().numpy()


def to_uint8_image(decoded: torch.Tensor) -> np.ndarray:
    """The first image of a VAE output as [H, W, 3] uint8."""
    return to_uint8_images(decoded[:1])[0]


class AsyncDiffPipeline:
    """A diffusers SD or SDXL pipeline whose UNet runs as an AsyncDiff plan in-process.

    ``cuts``: explicit cut points (stage names) instead of the balanced split;
    ``components`` then defaults to what they make (otherwise to 2).  The conditioning
    (SD: text states; SDXL: text states, pooled embeddings, time ids) is what the
    partition's components take (``asyncdiff.conditioning``).
    """

    def __init__(self, sd_pipe, components: int | None = None, stride: int = 1, *,
                 layout="sequential", cost="flops", batched_stride: bool = False,
                 latent_size: int | None = None, cuts: Sequence[str] | None = None):
        from asyncdiff.components import build_components
        from asyncdiff.partition import partition_unet
        from asyncdiff.runners import LocalRunner

        self.sd = sd_pipe
        self.batched_stride = batched_stride
        size = latent_size or sd_pipe.unet.config.sample_size
        if components is None and cuts is None:
            components = 2
        self.partition = partition_unet(
            sd_pipe.unet, components, model="pipeline", batch=2, height=size, width=size,
            metric=cost, stride=stride, layout=layout.replace("-", "_"),
            batched_stride=batched_stride, cuts=None if cuts is None else list(cuts),
        )
        self.kind = conditioning_kind(self.partition)
        pixels = size * sd_pipe.vae_scale_factor
        self.sizes = SizeConditioning.default(pixels, pixels)  # diffusers' SDXL defaults
        self.runner = LocalRunner(build_components(sd_pipe.unet, self.partition))

    @classmethod
    def from_pretrained(cls, path: str | Path = "tiny", **kwargs) -> "AsyncDiffPipeline":
        """The tiny model, or a saved SD / SDXL pipeline folder (its model_index.json class)."""
        from diffusers import DiffusionPipeline

        if str(path) == "tiny":
            from asyncdiff.tiny import MODEL_DIR

            path = MODEL_DIR
        return cls(DiffusionPipeline.from_pretrained(path).to("cpu"), **kwargs)

    @property
    def encoders(self) -> list:
        return [e for e in (self.sd.text_encoder, getattr(self.sd, "text_encoder_2", None))
                if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.sd.tokenizer, getattr(self.sd, "tokenizer_2", None))
                if t is not None]

    @torch.no_grad()
    def encode(self, req: Request, sizes: SizeConditioning | None = None) -> dict[str, torch.Tensor]:
        """The denoiser conditioning of one request, [negative; prompt] (batch 2) each."""
        force_zeros = bool(getattr(self.sd.config, "force_zeros_for_empty_prompt", False))
        return encode_request(self.kind, self.encoders, self.tokenizers, req,
                              sizes=(sizes or self.sizes).validate(),
                              force_zeros_for_empty_prompt=force_zeros)

    @torch.no_grad()
    def encode_text(self, prompt: str, negative_prompt: str) -> torch.Tensor:
        """[uncond; cond] text states, batch 2."""
        return self.encode(Request(prompt, negative_prompt))["encoder_hidden_states"]

    def generation(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                   sizes: SizeConditioning | None = None) -> Generation:
        """A validated Generation of one request or a lockstep batch of them (``sizes``: SDXL's
        size conditioning, default: diffusers' for this image size)."""
        reqs = [reqs] if isinstance(reqs, Request) else list(reqs)
        for r in reqs:
            r.validate()
        pairs = [self.encode(r, sizes) for r in reqs]
        conditioning = {name: cfg_batch([p[name] for p in pairs]) for name in pairs[0]}
        return Generation(self.partition, reqs, conditioning, self.sd.scheduler.config,
                          time_shift=time_shift, batched_stride=self.batched_stride)

    @torch.no_grad()
    def generate_latents(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                         sizes: SizeConditioning | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] (B = 1 for a single request)."""
        return self.runner.generate(self.generation(reqs, time_shift, sizes))

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        """[B, H, W, 3] uint8 (the VAE in its own dtype; an SDXL VAE is kept fp32 here)."""
        vae = self.sd.vae
        z = (latents / vae.config.scaling_factor).to(vae.dtype)
        return to_uint8_images(vae.decode(z).sample.float())

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The first image, [H, W, 3] uint8."""
        return self.decode_images(latents[:1])[0]

    def __call__(self, req: Request, time_shift: bool = False) -> np.ndarray:
        return self.decode(self.generate_latents(req, time_shift))
