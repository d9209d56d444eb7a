"""Text-to-image with an AsyncDiff plan in-process: the reference every executor is compared to.

The request contract (``Request``, limits, schedulers) is ``asyncdiff.contract``;
the generation loop (scheduler, plan, cache, latents, guidance) is
``asyncdiff.generation``.  This module adds what a text-to-image front end
needs around them: tokenisation, image conversion and the diffusers wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from asyncdiff.contract import INPUT_BY_FIELD, Request, token_limit_message
from asyncdiff.generation import Generation, cfg_batch


def cfg_token_ids(tokenizer, req: Request) -> np.ndarray:
    """[negative; prompt] token ids [2, max_length], the classifier-free guidance pair."""
    return np.concatenate([token_ids(tokenizer, getattr(req, f), INPUT_BY_FIELD[f].name)
                           for f in ("negative_prompt", "prompt")])


def token_ids(tokenizer, prompt: str, name: str = INPUT_BY_FIELD["prompt"].name) -> np.ndarray:
    """Padded token ids [1, max_length]; a prompt over the limit is rejected, not truncated.

    One tokenizer run: unpadded, counted, then padded here.
    """
    limit = tokenizer.model_max_length
    ids = tokenizer(prompt).input_ids
    if len(ids) > limit:
        raise ValueError(token_limit_message(name, len(ids), limit))
    pad = tokenizer.pad_token_id
    return np.asarray([ids + [pad] * (limit - len(ids))], dtype=np.int64)


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
    """A diffusers Stable Diffusion pipeline whose UNet runs as an AsyncDiff plan in-process.

    ``cuts``: explicit cut points (stage names) instead of the balanced split;
    ``components`` then defaults to what they make (otherwise to 2).
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
            metric=cost, stride=stride, layout=layout, batched_stride=batched_stride,
            cuts=None if cuts is None else list(cuts),
        )
        self.runner = LocalRunner(build_components(sd_pipe.unet, self.partition))

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
        ids = cfg_token_ids(self.sd.tokenizer, Request(prompt, negative_prompt))
        return self.sd.text_encoder(torch.from_numpy(ids))[0]

    def generation(self, reqs: Request | Sequence[Request], time_shift: bool = False) -> Generation:
        """A validated Generation of one request or a lockstep batch of them."""
        reqs = [reqs] if isinstance(reqs, Request) else list(reqs)
        for r in reqs:
            r.validate()
        text = cfg_batch([self.encode_text(r.prompt, r.negative_prompt) for r in reqs])
        return Generation(self.partition, reqs, {"encoder_hidden_states": text},
                          self.sd.scheduler.config, time_shift=time_shift,
                          batched_stride=self.batched_stride)

    @torch.no_grad()
    def generate_latents(self, reqs: Request | Sequence[Request], time_shift: bool = False) -> torch.Tensor:
        """Final latents [B, C, h, w] (B = 1 for a single request)."""
        return self.runner.generate(self.generation(reqs, time_shift))

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        """[B, H, W, 3] uint8."""
        vae = self.sd.vae
        return to_uint8_images(vae.decode(latents / vae.config.scaling_factor).sample)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The first image, [H, W, 3] uint8."""
        return self.decode_images(latents[:1])[0]

    def __call__(self, req: Request, time_shift: bool = False) -> np.ndarray:
        return self.decode(self.generate_latents(req, time_shift))
