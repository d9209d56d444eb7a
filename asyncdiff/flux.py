"""FLUX.1 text-to-image in-process: a diffusers ``FluxPipeline`` whose transformer runs as an
AsyncDiff plan through the shared ``Generation`` loop.

What differs from SD3 (``asyncdiff.sd3``), step by step through one request:

1. conditioning: CLIP's *pooled* output only (``CLIPTextModel.pooler_output``, no
   projection, no hidden states) as ``pooled_projections``, and T5's last hidden state alone
   as ``encoder_hidden_states`` (512 tokens by default, ``TEXT_TOKENS["flux"]``), encoded
   once per image; ``txt_ids`` are zeros [T, 3], ``img_ids`` each packed token's
   (0, row, column).  No negative prompt: FLUX runs without classifier-free guidance
   (diffusers' ``true_cfg_scale`` 1), so the model batch is ONE row per image, not a
   [negative; prompt] pair, and a NEGATIVE_PROMPT is refused.
2. guidance: a guidance-distilled model (``guidance_embeds``, FLUX dev) takes GUIDANCE_SCALE
   as the ``guidance`` input of every component (``Generation`` fills it per row); a model
   without (FLUX schnell) ignores GUIDANCE_SCALE, as diffusers does.
3. latents: drawn [1, 16, h, w] per seed as diffusers draws them, then kept unpacked; each
   step packs them into 2x2-patch tokens [B, h/2 * w/2, 64] for the transformer and unpacks
   its prediction (the Euler step is elementwise, so where it runs changes nothing).
4. timesteps: FlowMatchEulerDiscreteScheduler (SCHEDULER ``flowmatch-euler``) with FLUX's
   sigmas ``linspace(1, 1/T, T)`` and, with ``use_dynamic_shifting``, the shift ``mu`` from
   the number of image tokens (``flux_timestep_kwargs``); the components take sigmas
   (t / 1000) and multiply by 1000 inside, as the transformer does.
5. decode: the latents [B, 16, h, w] / scaling_factor + shift_factor into the VAE.

``AsyncDiffPipeline(flux_pipe, ...)`` makes this class.  Not here yet: img2img, true CFG
(``true_cfg_scale`` > 1 with a negative prompt) and a separate T5 prompt (prompt_2).  The
conditioning (``flux_conditioning``, ``flux_ids``) is ``asyncdiff.conditioning``'s, shared with
the Triton BLS, which serves FLUX through the same loop (``FLUX_DENOISING``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from asyncdiff.conditioning import (  # noqa: F401  (FLUX's conditioning, re-exported)
    FLUX, FLUX_PATCH, FLUX_T5_TOKENS, IMG_IDS, TEXT_STATES, TXT_IDS, SizeConditioning,
    check_no_negative_prompt, encode_flux_request, flux_conditioning, flux_ids,
)
from asyncdiff.contract import FLOW_MATCH_EULER, Request
from asyncdiff.generation import Denoising, Generation
from asyncdiff.pipeline import AsyncDiffPipeline, check_transformer, per_image, to_uint8_images

PATCH = FLUX_PATCH
# calculate_shift's defaults when the scheduler config leaves them out (FluxPipeline's).
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                  "max_shift": 1.15}


def dynamic_shift_mu(config: Mapping, image_tokens: int) -> float:
    """FLUX's resolution-dependent shift: linear in the number of image tokens, from
    base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    c = {k: config.get(k, v) for k, v in SHIFT_DEFAULTS.items()}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_tokens * slope + c["base_shift"] - slope * c["base_image_seq_len"]


def flux_timestep_kwargs(config: Mapping, steps: int, image_tokens: int) -> dict:
    """``set_timesteps`` keywords as ``FluxPipeline`` passes them: sigmas linspace(1, 1/T, T)
    (none when the scheduler makes its own flow sigmas) and ``mu`` for dynamic shifting."""
    config = dict(config)
    kwargs = {"mu": dynamic_shift_mu(config, image_tokens)}
    if not config.get("use_flow_sigmas"):
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    return kwargs


FLUX_DENOISING = Denoising(cfg=False, timestep_scale=1000.0, patch=PATCH,
                           timestep_kwargs=flux_timestep_kwargs)


class AsyncDiffFluxPipeline(AsyncDiffPipeline):
    """A diffusers FLUX.1 pipeline (dev or schnell) whose transformer runs as an AsyncDiff plan.

    Arguments as ``AsyncDiffPipeline``'s (``cuts``: stage names of ``asyncdiff.dit``, e.g.
    ``["single0"]``; ``latent_size`` default 128, diffusers' 1024 px for an 8x VAE).  Requests
    must use SCHEDULER ``flowmatch-euler`` and no NEGATIVE_PROMPT.
    """

    scheduler_name = FLOW_MATCH_EULER

    rows_per_prompt = 1  # no classifier-free guidance: one row per image
    t5_tokens = FLUX_T5_TOKENS

    def __init__(self, flux_pipe, *args, **kwargs):
        check_transformer(flux_pipe, FLUX, "only FLUX pipelines (a FluxTransformer2DModel) run here")
        super().__init__(flux_pipe, *args, **kwargs)

    @property
    def encoders(self) -> list:
        """CLIP (pooled only), T5."""
        return [self.sd.text_encoder, self.sd.text_encoder_2]

    @property
    def tokenizers(self) -> list:
        return [self.sd.tokenizer, self.sd.tokenizer_2]

    @torch.no_grad()
    def encode(self, req: Request,
               sizes: SizeConditioning | None = None) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [1, 512, W] and ``pooled_projections`` [1, P] of one
        prompt (``sizes`` is SDXL's and ignored)."""
        check_no_negative_prompt(req)
        return encode_flux_request(self.encoders, self.tokenizers, req, self.t5_tokens)

    @torch.no_grad()
    def encode_text(self, prompt: str, negative_prompt: str = "") -> torch.Tensor:
        """[1, T, W] T5 text states (no guidance pair)."""
        return self.encode(Request(prompt, negative_prompt))[TEXT_STATES]

    def generation(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                   sizes: SizeConditioning | None = None,
                   init_image: np.ndarray | torch.Tensor | None = None) -> Generation:
        """A validated Generation, one row per image (seeds SEED, SEED+1, ...)."""
        if init_image is not None:
            raise NotImplementedError("FLUX img2img is not supported yet")
        reqs = per_image([reqs] if isinstance(reqs, Request) else list(reqs))
        for r in reqs:
            r.validate()
            check_no_negative_prompt(r)
        height, width = self.image_size(reqs)
        f = self.sd.vae_scale_factor
        h, w = height // f, width // f
        rows = [self.encode(r) for r in reqs]
        conditioning = {name: torch.cat([c[name] for c in rows]) for name in rows[0]}
        text_tokens = conditioning[TEXT_STATES].shape[1]
        conditioning.update(flux_ids(len(reqs), h, w, text_tokens, conditioning[TEXT_STATES].dtype))
        return Generation(self.partition, reqs, conditioning, self.sd.scheduler.config,
                          time_shift=time_shift, batched_stride=self.batched_stride,
                          latent_size=(h, w), denoising=FLUX_DENOISING)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        """[B, H, W, 3] uint8 from unpacked latents [B, 16, h, w]: the VAE takes
        ``latents / scaling_factor + shift_factor``."""
        from asyncdiff.sd3 import vae_latents

        vae = self.sd.vae
        z = vae_latents(latents, vae.config.scaling_factor,
                        getattr(vae.config, "shift_factor", None)).to(vae.dtype)
        return to_uint8_images(vae.decode(z).sample.float())
