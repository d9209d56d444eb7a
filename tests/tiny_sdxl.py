"""A tiny random-weight SDXL pipeline, built offline: two CLIP text encoders (the second with a
projection), the narrowed ``sdxl`` UNet config (text_time), a 2-level VAE with force_upcast,
Euler, and the tiny model's CLIP BPE tokenizer twice (the second padding with ``!`` as SDXL's
does)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM_1, TEXT_DIM_2, POOLED_DIM = 24, 40, 32  # 24 + 40 = the sdxl config's cross_attention_dim 64


def build_tiny_sdxl(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
    )

    from asyncdiff.configs import UNET_CONFIGS
    from asyncdiff.tiny import MODEL_DIR

    torch.manual_seed(seed)
    common = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=3,
                  num_attention_heads=2, bos_token_id=49406, eos_token_id=49407,
                  hidden_act="gelu")
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_DIM_1, intermediate_size=48,
                                       pad_token_id=49407, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=TEXT_DIM_2, intermediate_size=80, projection_dim=POOLED_DIM, pad_token_id=0,
        **common)).eval()
    unet = UNet2DConditionModel.from_config(UNET_CONFIGS["sdxl"]).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.13025,
                        force_upcast=True, sample_size=32).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    tok_dir = Path(MODEL_DIR) / "tokenizer"
    tok1 = CLIPTokenizer.from_pretrained(tok_dir)
    tok2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    ).to("cpu")
