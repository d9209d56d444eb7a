"""A tiny random-weight FLUX.1 pipeline, built offline: a CLIP stand-in (``CLIPTextModel``:
FLUX takes only its pooled output), a tiny T5 encoder with ``tests.tiny_sd3``'s offline
tokenizer, the narrowed ``flux`` transformer config taking 16-channel latents packed 2x2 (64
features), dev-like (``guidance_embeds``) or schnell-like, a 16-channel VAE with FLUX's
scaling and shift factors, and FlowMatchEulerDiscreteScheduler with dynamic shifting."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd3 import build_t5_tokenizer

CLIP_DIM = 16  # = the flux config's pooled_projection_dim (CLIP's pooled output, unprojected)
T5_DIM = 32  # = the flux config's joint_attention_dim
LATENT_CHANNELS = 16
# FLUX.1-dev's scheduler config (the shift is replaced by mu from the image size).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                 base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """The pipeline; ``guidance_embeds=False`` is schnell-like (no guidance embedding)."""
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from asyncdiff.configs import DIT_CONFIGS
    from asyncdiff.tiny import MODEL_DIR

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=49406, eos_token_id=49407, hidden_act="gelu", hidden_size=CLIP_DIM,
        intermediate_size=32, pad_token_id=49407)).eval()
    tok2 = build_t5_tokenizer(512)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()
    config = {k: v for k, v in DIT_CONFIGS["flux"].items() if k != "_class_name"}
    config.update(in_channels=4 * LATENT_CHANNELS, guidance_embeds=guidance_embeds)
    transformer = FluxTransformer2DModel(**config).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                        sample_size=32).eval()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(Path(MODEL_DIR) / "tokenizer"),
        text_encoder_2=t5, tokenizer_2=tok2,
    ).to("cpu")
