"""Train the tiny SD3-architecture (MMDiT) model on the digits data.

    python -m asyncdiff.tiny.train_dit [--out DIR] [--steps 1000]

writes DIR (default: asyncdiff/tiny/sd3_model), a ``StableDiffusion3Pipeline``
folder.  It reuses the committed tiny model (asyncdiff/tiny/model) as it is:

* VAE: the tiny 1-channel AutoencoderKL (4 latent channels, vae_scale_factor 1),
  weights unchanged; SD3 decodes ``latents / scaling_factor + shift_factor``, so
  shift_factor is set to 0 (the tiny VAE's latents were only scaled).
* text_encoder (CLIP-L slot): the committed CLIPTextModel's weights, frozen, inside a
  CLIPTextModelWithProjection whose projection is the identity (fixed, not trained):
  the pooled projection is the final-layer-normed EOS state.
* text_encoder_2 (CLIP-G slot): SD3 requires a second CLIP encoder; here it is a
  placeholder two wide with zero token embeddings, so its output is the same for every
  prompt (all prompt information comes from the CLIP-L slot).  It costs 0.4 MB.
* No T5: diffusers fills the T5 slot with zeros (256 tokens).

Only the transformer trains, with SD3's rectified-flow objective: x_t = (1 - s) x0 + s e,
target e - x0, s ~ U(0, 1) (uniform rather than SD3's logit-normal: the few-step Euler
sampler visits s near 1 and near 0, which logit-normal rarely trains), timestep 1000 s.
The conditioning of every prompt is computed once with the assembled pipeline's own
``encode_prompt``, so training sees exactly what sampling feeds.
Bit-identical results need the same seed, thread count and machine.  Set
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 (see train.py).
"""

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import MODEL_DIR, prompts_for
from .data import load_split
from .train import (Ema, _log, lr_factor, sample_prompts, seeded, training_parser,
                    write_bpe_tokenizer)

SD3_MODEL_DIR = Path(__file__).resolve().parent / "sd3_model"
FLOW_SHIFT = 1.0  # SD3 uses 3.0 at 1024 px; a 16x16 latent needs no shift towards noise
PLACEHOLDER_WIDTH = 2  # CLIP-G slot width (its token table is vocab x width floats)
# 64 image tokens (8x8 patches) + 77 CLIP + 256 zero T5 text tokens per sample.
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                   num_layers=4, attention_head_dim=16, num_attention_heads=4,
                   joint_attention_dim=32, caption_projection_dim=64,
                   pos_embed_max_size=8)


def load_sd3_pipeline(path=SD3_MODEL_DIR, device="cpu"):
    """The committed tiny SD3 pipeline, from disk only (no hub access).  The folder has no
    T5; diffusers wants that said when loading (it then feeds zeros in the T5 slot)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True).to(device)


def clip_l_from_committed():
    """The committed tiny CLIPTextModel inside a CLIPTextModelWithProjection whose
    projection is the identity."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder")
    out = CLIPTextModelWithProjection(te.config)  # projection_dim == hidden_size
    out.text_model.load_state_dict(te.state_dict())
    with torch.no_grad():
        out.text_projection.weight.copy_(torch.eye(te.config.hidden_size))
    return out.eval()


def clip_g_placeholder():
    """A minimal prompt-independent CLIP-G stand-in (zero token embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    w = PLACEHOLDER_WIDTH
    te = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=w, intermediate_size=2 * w, projection_dim=w,
        num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    torch.nn.init.zeros_(te.get_input_embeddings().weight)
    return te.eval()


def build_pipeline(transformer):
    """Assemble the SD3 pipeline around ``transformer`` from the committed tiny parts."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae").eval()
    vae.register_to_config(shift_factor=0.0)
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
        vae=vae, text_encoder=clip_l_from_committed(), tokenizer=tok,
        text_encoder_2=clip_g_placeholder(), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def build_transformer():
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig

    # pooled = [CLIP-L projection (identity: the committed encoder's width); placeholder]
    clip_l = CLIPTextConfig.from_pretrained(MODEL_DIR / "text_encoder").hidden_size
    return SD3Transformer2DModel(**TRANSFORMER, pooled_projection_dim=clip_l + PLACEHOLDER_WIDTH)


@torch.no_grad()
def prompt_conditioning(pipe):
    """(text states [P, 333, 32], pooled [P, 26]) of every (digit, template) prompt,
    then the empty prompt, as the pipeline encodes them."""
    prompts = [p for d in range(10) for p in prompts_for(d)] + [""]
    text, _, pooled, _ = pipe.encode_prompt(prompts, None, None,
                                            do_classifier_free_guidance=False)
    return text, pooled


@torch.no_grad()
def vae_latents(vae, images):
    """Unit-variance latents of images in [0, 1], as SD3 samples them (shift 0)."""
    z = vae.encode(images * 2 - 1).latent_dist.mean
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def collapse_zero_tokens(text):
    """Keep one of the trailing all-zero T5 tokens; returns (text, how many it stands for).

    Identical context tokens stay identical through every joint block (each token is
    processed alone except in attention, where identical queries get identical outputs),
    so K of them act in attention as one key whose logit is raised by log K.
    ``repeated_last_key`` applies that; the image-token outputs are unchanged
    (tests/benchmarks/test_fidelity.py checks it) and a training step is ~3x cheaper
    (142 tokens, not 397).
    """
    zero = (text == 0).all(dim=-1).all(dim=0)
    first = int(zero.nonzero()[0])
    assert zero[first:].all(), "zero tokens must be the trailing ones"
    return text[:, :first + 1], len(zero) - first


@contextlib.contextmanager
def repeated_last_key(count):
    """Inside: every scaled_dot_product_attention treats its last key as ``count`` copies
    (diffusers' joint attention puts the context tokens last)."""
    sdpa = F.scaled_dot_product_attention

    def biased(query, key, value, attn_mask=None, **kw):
        assert attn_mask is None
        bias = torch.zeros(key.shape[-2], dtype=query.dtype)
        bias[-1] = math.log(count)
        return sdpa(query, key, value, attn_mask=bias[None], **kw)

    F.scaled_dot_product_attention = biased
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def train_transformer(model, latents, labels, text, pooled, args, gen):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
    ema = Ema(model.parameters())
    model.train()
    text, count = collapse_zero_tokens(text)
    with repeated_last_key(count):
        _train_loop(model, latents, labels, text, pooled, args, gen, opt, sched, ema)
    ema.copy_to_params()
    model.eval()


def _train_loop(model, latents, labels, text, pooled, args, gen, opt, sched, ema):
    bar = tqdm(range(args.steps), desc="mmdit", mininterval=5)
    for step in bar:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows, _ = sample_prompts(labels[idx], gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(args.batch, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        pred = model(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=text[rows],
                     pooled_projections=pooled[rows], timestep=sigma * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        _log(bar, step, args.steps, mse=loss.item())


def save_pipeline(pipe, out):
    """save_pretrained, then the 1.5 MB BPE tokenizer files in place of v5's 3.6 MB
    tokenizer.json (in both tokenizer folders: a folder holds only copies)."""
    out = Path(out)
    staging = Path(str(out) + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_bpe_tokenizer(staging / name, MODEL_DIR / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def parse_args(argv=None):
    return training_parser(__doc__.splitlines()[0], SD3_MODEL_DIR, 1e-3).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    gen = seeded(args)
    start = time.time()
    pipe = build_pipeline(build_transformer())
    text, pooled = prompt_conditioning(pipe)
    images, labels = load_split("train")
    latents = vae_latents(pipe.vae, images)
    train_transformer(pipe.transformer, latents, labels, text, pooled, args, gen)
    save_pipeline(pipe, args.out)
    print(f"done in {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
