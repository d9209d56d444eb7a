"""SD3 text-to-image in-process: a diffusers ``StableDiffusion3Pipeline`` whose MMDiT
transformer runs as an AsyncDiff plan through the shared ``Generation`` loop.

What differs from SD / SDXL (``asyncdiff.pipeline``):

* the denoiser is ``pipe.transformer``, cut by ``asyncdiff.dit``'s stage graph;
* the conditioning is SD3's (``asyncdiff.conditioning.encode_sd3_request``): CLIP-L + CLIP-G
  penultimate states padded to T5's width, then T5's states on the sequence; pooled =
  both CLIP pooled outputs; zeros in the T5 slot when the pipeline has no T5;
* the scheduler is flow matching: requests take SCHEDULER ``flowmatch-euler``; latents are
  plain seeded Gaussians (no init_noise_sigma), timesteps go to the transformer as the
  scheduler holds them (sigma * 1000);
* the VAE decodes ``latents / scaling_factor + shift_factor``.

``AsyncDiffPipeline(sd3_pipe, ...)`` makes this class.  Not here yet: img2img (flow
matching noises with ``scale_noise``, not ``add_noise``), schedulers with dynamic shifting,
skip-layer guidance, and a separate prompt per encoder (prompt_2 / prompt_3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from asyncdiff.conditioning import SD3, T5_TOKENS, SizeConditioning, encode_sd3_request
from asyncdiff.contract import FLOW_MATCH_EULER, Request
from asyncdiff.generation import Generation
from asyncdiff.pipeline import AsyncDiffPipeline, check_transformer, to_uint8_images


def vae_latents(latents: torch.Tensor, scaling_factor: float,
                shift_factor: float | None = 0.0) -> torch.Tensor:
    """What the VAE decoder takes: ``latents / scaling_factor + shift_factor`` (SD3's VAE has a
    shift; without one this is SD's ``latents / scaling_factor``). The BLS decodes so too."""
    return latents / scaling_factor + (shift_factor or 0.0)


class AsyncDiffSD3Pipeline(AsyncDiffPipeline):
    """A diffusers SD3 / SD3.5 pipeline whose transformer runs as an AsyncDiff plan.

    Arguments as ``AsyncDiffPipeline``'s (``cuts``: stage names of ``asyncdiff.dit``, e.g.
    ``["joint12"]``).  Requests must use SCHEDULER ``flowmatch-euler``.
    """

    scheduler_name = FLOW_MATCH_EULER

    t5_tokens = T5_TOKENS

    def __init__(self, sd_pipe, *args, **kwargs):
        check_transformer(sd_pipe, SD3, "only SD3 pipelines (an SD3Transformer2DModel) run "
                                        "here; FLUX pipelines: asyncdiff.flux")
        super().__init__(sd_pipe, *args, **kwargs)

    @property
    def encoders(self) -> list:
        """CLIP-L, CLIP-G, T5 (None when the pipeline has none)."""
        return [self.sd.text_encoder, self.sd.text_encoder_2, self.sd.text_encoder_3]

    @property
    def tokenizers(self) -> list:
        return [self.sd.tokenizer, self.sd.tokenizer_2, self.sd.tokenizer_3]

    @torch.no_grad()
    def encode(self, req: Request,
               sizes: SizeConditioning | None = None) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [2, 77 + 256, W] and ``pooled_projections`` [2, P] of one
        request, [negative; prompt] (``sizes`` is SDXL's and ignored)."""
        return encode_sd3_request(self.encoders, self.tokenizers, req,
                                  t5_width=self.denoiser.config.joint_attention_dim,
                                  t5_tokens=self.t5_tokens)

    def generation(self, reqs: Request | Sequence[Request], time_shift: bool = False,
                   sizes: SizeConditioning | None = None,
                   init_image: np.ndarray | torch.Tensor | None = None) -> Generation:
        if init_image is not None:
            raise NotImplementedError("SD3 img2img is not supported yet")
        return super().generation(reqs, time_shift)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        """[B, H, W, 3] uint8: SD3's VAE takes ``latents / scaling_factor + shift_factor``."""
        vae = self.sd.vae
        z = vae_latents(latents, vae.config.scaling_factor,
                        getattr(vae.config, "shift_factor", None)).to(vae.dtype)
        return to_uint8_images(vae.decode(z).sample.float())
