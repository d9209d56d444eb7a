"""Text-to-image with an AsyncDiff plan in-process: the reference every executor is compared to.

The request contract (``Request``, limits, schedulers) is ``asyncdiff.contract``;
the generation loop (scheduler, plan, cache, latents, guidance) is
``asyncdiff.generation``; tokenisation and the text conditioning (SD and SDXL)
are ``asyncdiff.conditioning``; img2img's init latents and timesteps are
``asyncdiff.img2img``.  This module adds image conversion and the diffusers
wrapper: text-to-image and img2img, at the model's size or a request's
HEIGHT x WIDTH, NUM_IMAGES images per request (seeds SEED, SEED+1, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from asyncdiff.conditioning import (  # noqa: F401  (cfg_token_ids, token_ids: the BLS's imports)
    SD, SDXL, SizeConditioning, cfg_token_ids, conditioning_kind, encode_request, token_ids,
)
from asyncdiff.contract import INIT_IMAGE, Request
from asyncdiff.generation import Generation, cfg_batch
from asyncdiff.img2img import encode_moments, init_latents, preprocess


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output [B, C, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (grey images are replicated)."""
    img = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    if img.shape[-1] == 1:
        img = img.expand(-1, -1, -1, 3)
    return (img * 255).round().to(torch.uint8).cpu().numpy()


def to_uint8_image(decoded: torch.Tensor) -> np.ndarray:
    """The first image of a VAE output as [H, W, 3] uint8."""
    return to_uint8_images(decoded[:1])[0]


def per_image(reqs: Sequence[Request]) -> list[Request]:
    """One single-image request per image: a request of NUM_IMAGES n becomes n requests with
    seeds SEED ... SEED+n-1 (each image is what its seed gives alone)."""
    return [dataclasses.replace(r, seed=s, num_images=1) for r in reqs for s in r.seeds()]


def check_transformer(pipe, kind: str, message: str) -> None:
    """ValueError(``message``) unless ``pipe`` has a transformer of denoiser ``kind``."""
    from asyncdiff.configs import denoiser_kind

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or denoiser_kind(transformer.config) != kind:
        raise ValueError(f"{type(pipe).__name__}: {message}")


class AsyncDiffPipeline:
    """A diffusers SD or SDXL pipeline whose UNet runs as an AsyncDiff plan in-process.

    ``cuts``: explicit cut points (stage names) instead of the balanced split;
    ``components`` then defaults to what they make (otherwise to 2).  The conditioning
    (SD: text states; SDXL: text states, pooled embeddings, time ids) is what the
    partition's components take (``asyncdiff.conditioning``).  A diffusers SD3 pipeline (a
    ``transformer``, no ``unet``) makes an ``asyncdiff.sd3.AsyncDiffSD3Pipeline``, a FLUX one
    an ``asyncdiff.flux.AsyncDiffFluxPipeline``.
    """

    def __new__(cls, sd_pipe=None, *args, **kwargs):
        transformer = getattr(sd_pipe, "transformer", None)
        if cls is AsyncDiffPipeline and getattr(sd_pipe, "unet", None) is None \
                and transformer is not None:
            from asyncdiff.configs import denoiser_kind

            if denoiser_kind(transformer.config) == "flux":
                from asyncdiff.flux import AsyncDiffFluxPipeline

                return super().__new__(AsyncDiffFluxPipeline)
            from asyncdiff.sd3 import AsyncDiffSD3Pipeline

            return super().__new__(AsyncDiffSD3Pipeline)
        return super().__new__(cls)

    rows_per_prompt = 2  # the denoiser batch of one image: [negative; prompt]

    def __init__(self, sd_pipe, components: int | None = None, stride: int = 1, *,
                 layout="sequential", cost="flops", batched_stride: bool = False,
                 latent_size: int | None = None, cuts: Sequence[str] | None = None):
        from asyncdiff.components import build_components
        from asyncdiff.configs import default_latent_size
        from asyncdiff.partition import partition_denoiser
        from asyncdiff.runners import LocalRunner

        self.sd = sd_pipe
        self.batched_stride = batched_stride
        denoiser = self.denoiser
        size = latent_size or default_latent_size(denoiser.config)
        if components is None and cuts is None:
            components = 2
        self.partition = partition_denoiser(
            denoiser, components, model="pipeline", batch=self.rows_per_prompt, height=size,
            width=size, metric=cost, stride=stride, layout=layout.replace("-", "_"),
            batched_stride=batched_stride, cuts=None if cuts is None else list(cuts),
        )
        self.kind = conditioning_kind(self.partition)
        pixels = size * sd_pipe.vae_scale_factor
        self.default_size = (pixels, pixels)  # (height, width)
        self.sizes = SizeConditioning.default(pixels, pixels)  # diffusers' SDXL defaults
        self.runner = LocalRunner(build_components(denoiser, self.partition))

    @classmethod
    def from_pretrained(cls, path: str | Path = "tiny", **kwargs) -> "AsyncDiffPipeline":
        """The tiny model, or a saved SD / SDXL pipeline folder (its model_index.json class)."""
        from diffusers import DiffusionPipeline

        if str(path) == "tiny":
            from asyncdiff.tiny import MODEL_DIR

            path = MODEL_DIR
        return cls(DiffusionPipeline.from_pretrained(path).to("cpu"), **kwargs)

    @property
    def denoiser(self):
        """The model the plan cuts: the UNet, or a DiT pipeline's transformer."""
        unet = getattr(self.sd, "unet", None)
        return unet if unet is not None else self.sd.transformer

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

    def image_size(self, reqs: Sequence[Request]) -> tuple[int, int]:
        """The (height, width) pixels of a batch (HEIGHT / WIDTH 0: the model's default);
        ValueError naming them when the requests disagree or the UNet cannot take the size."""
        from asyncdiff.stages import check_sample_size

        sizes = {(r.height or self.default_size[0], r.width or self.default_size[1]) for r in reqs}
        if len(sizes) > 1:
            raise ValueError(f"HEIGHT and WIDTH must be the same for every request of a batch, "
                             f"got {sorted(sizes)}")
        height, width = sizes.pop()
        f = self.sd.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"HEIGHT and WIDTH must be multiples of {f} (the VAE's scale), "
                             f"got {height} x {width}")
        try:
            check_sample_size(dict(self.denoiser.config), height // f, width // f)
        except ValueError as e:
            raise ValueError(f"HEIGHT x WIDTH {height} x {width}: {e}") from None
        return height, width

    def generation(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                   sizes: SizeConditioning | None = None,
                   init_image: np.ndarray | torch.Tensor | None = None) -> Generation:
        """A validated Generation of one request or a lockstep batch of them, one row per image
        (``per_image``). ``sizes``: SDXL's size conditioning, default: diffusers' for the
        request's size. ``init_image``: img2img from uint8 [H, W, 3] (every image starts from
        it) or [B, H, W, 3] (one per image) at the request's size, with its STRENGTH."""
        reqs = per_image([reqs] if isinstance(reqs, Request) else list(reqs))
        for r in reqs:
            r.validate()
        height, width = self.image_size(reqs)
        sizes = sizes or SizeConditioning.default(height, width)
        pairs = [self.encode(r, sizes) for r in reqs]
        conditioning = {name: cfg_batch([p[name] for p in pairs]) for name in pairs[0]}
        f = self.sd.vae_scale_factor
        start = {}
        if init_image is not None:
            start = dict(zip(("init_latents", "noise"),
                             self.init_latents(init_image, [r.seed for r in reqs], height, width)))
        return Generation(self.partition, reqs, conditioning, self.sd.scheduler.config,
                          time_shift=time_shift, batched_stride=self.batched_stride,
                          latent_size=(height // f, width // f), **start)

    @torch.no_grad()
    def init_latents(self, init_image, seeds: Sequence[int], height: int, width: int):
        """img2img's (init latents, noise) [B, C, h, w]: the VAE encoder in torch (fp32, as
        diffusers upcasts SDXL's), then ``asyncdiff.img2img.init_latents`` with one seed per
        image. Each distinct image is encoded alone, as diffusers does."""
        vae = self.sd.vae
        if getattr(vae.config, "latents_mean", None) is not None:
            raise NotImplementedError("VAEs with latents_mean / latents_std are not supported")
        images = preprocess(init_image, height, width)
        if images.shape[0] not in (1, len(seeds)):
            raise ValueError(f"{INIT_IMAGE.name} holds {images.shape[0]} images for "
                             f"{len(seeds)} seeds: give one, or one per image")
        dtype = vae.dtype
        if dtype != torch.float32:  # diffusers upcasts a force_upcast VAE to encode; fp32 here
            vae.to(torch.float32)
        try:
            moments = torch.cat([encode_moments(vae, x[None]) for x in images])
        finally:
            if dtype != torch.float32:
                vae.to(dtype)
        if moments.shape[0] != len(seeds):
            moments = moments.expand(len(seeds), -1, -1, -1)
        return init_latents(moments, seeds, float(vae.config.scaling_factor),
                            getattr(vae.config, "shift_factor", None))

    @torch.no_grad()
    def generate_latents(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                         sizes: SizeConditioning | None = None,
                         init_image: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w], one row per image (B = 1 for a single one-image
        request). ``init_image``: img2img (see ``generation``)."""
        return self.runner.generate(self.generation(reqs, time_shift, sizes, init_image))

    def img2img_latents(self, req: Request | Sequence[Request], image: np.ndarray | torch.Tensor,
                        time_shift: bool = False,
                        sizes: SizeConditioning | None = None) -> torch.Tensor:
        """img2img's final latents [NUM_IMAGES, C, h, w] from the uint8 [H, W, 3] ``image``."""
        return self.generate_latents(req, time_shift, sizes, init_image=image)

    def img2img(self, req: Request, image: np.ndarray | torch.Tensor,
                time_shift: bool = False) -> np.ndarray:
        """[NUM_IMAGES, H, W, 3] uint8 images from the uint8 [H, W, 3] ``image``."""
        return self.decode_images(self.img2img_latents(req, image, time_shift))

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
