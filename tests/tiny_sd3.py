"""A tiny random-weight SD3 pipeline, built offline: CLIP-L and CLIP-G stand-ins (both with a
projection), a tiny T5 encoder with a Unigram tokenizer trained here on a few sentences (no
T5 tokenizer can be downloaded), the narrowed ``sd3`` transformer config, a 16-channel VAE
with SD3's shift_factor, and FlowMatchEulerDiscreteScheduler with SD3's shift."""

from __future__ import annotations

from pathlib import Path

import torch

# CLIP-L 8 + CLIP-G 16 = 24 <= T5's 32 (= the sd3 config's joint_attention_dim): diffusers pads
# the CLIP states up to T5's width. Pooled: 8 + 8 = the config's pooled_projection_dim 16.
CLIP_DIMS, PROJECTION_DIM, T5_DIM = (8, 16), 8, 32
T5_SENTENCES = [
    "a red cube on a table", "a photo of a cat", "blurry, low quality",
    "an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk", "two dogs playing in the snow",
    "a bowl of fruit", "the quick brown fox jumps over the lazy dog",
]


def build_t5_tokenizer(max_length: int = 256):
    """A T5-style fast tokenizer: Unigram over Metaspace pieces, ``</s>`` appended, pad id 0,
    eos id 1, unk id 2 (T5's special-token ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(T5_SENTENCES * 4, UnigramTrainer(
        vocab_size=96, special_tokens=specials, unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0, model_max_length=max_length)


def build_tiny_sd3(seed: int = 0, with_t5: bool = True):
    """The pipeline; ``with_t5=False`` leaves text_encoder_3 / tokenizer_3 out (diffusers then
    feeds zeros in the T5 slot)."""
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
    )

    from asyncdiff.configs import DIT_CONFIGS
    from asyncdiff.tiny import MODEL_DIR

    torch.manual_seed(seed)
    common = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=2,
                  num_attention_heads=2, bos_token_id=49406, eos_token_id=49407,
                  hidden_act="gelu", projection_dim=PROJECTION_DIM)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=CLIP_DIMS[0], intermediate_size=16, pad_token_id=49407, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=CLIP_DIMS[1], intermediate_size=32, pad_token_id=0, **common)).eval()
    t5 = tok3 = None
    if with_t5:
        tok3 = build_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tok3), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)).eval()
    config = {k: v for k, v in DIT_CONFIGS["sd3"].items() if k != "_class_name"}
    transformer = SD3Transformer2DModel(**config).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                        sample_size=32).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    tok_dir = Path(MODEL_DIR) / "tokenizer"
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        text_encoder_2=te2, tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"),
        text_encoder_3=t5, tokenizer_3=tok3,
    ).to("cpu")


def save_tiny_sd3(folder: str | Path, **kwargs) -> Path:
    """The pipeline as a diffusers folder (``StableDiffusion3Pipeline.from_pretrained`` reads
    it)."""
    build_tiny_sd3(**kwargs).save_pretrained(folder)
    return Path(folder)
