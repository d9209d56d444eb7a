"""Rebuild the tiny text-to-image model and the digit classifier.

    python -m asyncdiff.tiny.train [--out DIR] [--seed 0]

writes DIR/model (a StableDiffusionPipeline folder) and DIR/classifier.
Without --out it overwrites the committed copies inside the package.
Bit-identical results need the same seed, thread count and machine.
Set MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 on
small CPUs: without them glibc churns pages and steps get several x slower.
"""

import argparse
import importlib.util
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import classifier as clf
from .data import load_split, prompt_templates, prompts_for
from .tokenizer import write_tokenizer_dir

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
TEXT_DIM = 24  # 32 puts the folder over 15 MB (the token table dominates)
DROP_PROMPT = 0.1  # empty prompts teach the unconditional branch for CFG


def scheduler_config():
    """DDIM settings that sample well: leading spacing avoids t=999 where
    alpha_bar ~ 0, and clipping hurts with CFG."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                clip_sample=False, set_alpha_to_one=False,
                timestep_spacing="leading", steps_offset=1)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
        sample_size=16, mid_block_add_attention=False)


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
        projection_dim=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)
    te = CLIPTextModel(cfg)
    # HF's std-0.02 init makes every prompt encode alike and the UNet then
    # learns to ignore the text; unit-variance tokens keep them apart.
    torch.nn.init.normal_(te.get_input_embeddings().weight, std=1.0)
    return te


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                          "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                        "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8)


def train_vae(vae, x, steps, batch, gen):
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    bar = tqdm(range(steps), desc="vae", mininterval=2)
    for step in bar:
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(recon, xb)
        loss = mse + 1e-4 * post.kl().mean() / xb[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _log(bar, step, steps, mse=mse.item())
    vae.eval()
    with torch.no_grad():
        means = vae.encode(x).latent_dist.mean
    # unit-variance latents, as SD's scaling_factor does
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return means * vae.config.scaling_factor


def _log(bar, step, total, **values):
    bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
    if step % 100 == 0 or step == total - 1:
        text = " ".join(f"{k}={v:.5f}" for k, v in values.items())
        bar.write(f"{bar.desc} step {step}: {text}")


def prompt_table(tok_dir):
    """Token ids of every (digit, template) prompt, then the empty one."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    prompts = [p for d in range(10) for p in prompts_for(d)] + [""]
    return tokenizer(prompts, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def sample_prompts(labels, gen):
    """Row of prompt_table per image; DROP_PROMPT of them empty."""
    n_t = len(prompt_templates)
    rows = labels * n_t + torch.randint(n_t, labels.shape, generator=gen)
    empty = torch.rand(labels.shape, generator=gen) < DROP_PROMPT
    return torch.where(empty, torch.full_like(rows, 10 * n_t), rows), ~empty


def lr_factor(step, total, warmup=200):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


class Ema:
    """Exponential moving average of a parameter list (warm-up decay)."""

    def __init__(self, params):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    def update(self, step):
        d = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(self.shadow, d)
            torch._foreach_add_(self.shadow, [p.detach() for p in self.params],
                                alpha=1 - d)

    def copy_to_params(self):
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)


def train_denoiser(unet, te, latents, labels, ids, args, gen):
    """Joint eps-prediction training of UNet and text encoder."""
    from diffusers import DDPMScheduler

    alpha_bar = DDPMScheduler(num_train_timesteps=1000,
                              beta_schedule="squaredcos_cap_v2").alphas_cumprod
    # Throw-away probe: forcing the text states to carry the digit keeps
    # the encoder from collapsing all prompts onto one vector.
    probe = torch.nn.Linear(TEXT_DIM, 10)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params + list(probe.parameters()), lr=args.lr,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.steps))
    ema = Ema(params)
    unet.train()
    te.train()
    bar = tqdm(range(args.steps), desc="unet+text", mininterval=2)
    for step in bar:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows, cond = sample_prompts(labels[idx], gen)
        states = te(ids[rows]).last_hidden_state
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(len(alpha_bar), (args.batch,), generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        mse = F.mse_loss(unet(xt, t, encoder_hidden_states=states).sample,
                         noise)
        ce = F.cross_entropy(probe(states[cond].mean(1)), labels[idx][cond])
        loss = mse + 0.1 * ce
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        _log(bar, step, args.steps, mse=mse.item(), ce=ce.item())
    ema.copy_to_params()
    unet.eval()
    te.eval()


def tokenizer_source(bpe):
    """A folder holding the three CLIP tokenizer files."""
    committed = PACKAGE_DIR / "model" / "tokenizer"
    if bpe is None and (committed / "vocab.json").exists():
        return committed
    if bpe is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise SystemExit("need --bpe bpe_simple_vocab_16e6.txt.gz "
                             "(it ships in the open_clip_torch wheel)")
        bpe = Path(spec.submodule_search_locations[0]) / \
            "bpe_simple_vocab_16e6.txt.gz"
    return write_tokenizer_dir(bpe, tempfile.mkdtemp(prefix="clip_tok_"))


def write_bpe_tokenizer(folder, tok_dir):
    """Replace what save_pretrained wrote in ``folder`` (v5: only tokenizer.json, 3.6 MB)
    by the three BPE tokenizer files of ``tok_dir`` (1.5 MB)."""
    folder = Path(folder)
    shutil.rmtree(folder)
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tok_dir) / name, folder / name)


def save_pipeline(out, vae, te, tok_dir, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(
            tok_dir), unet=unet, scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    staging = Path(str(out) + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    write_bpe_tokenizer(staging / "tokenizer", tok_dir)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def training_parser(description: str, out: Path, lr: float, out_help: str | None = None):
    """The options every tiny-model trainer takes (this one and ``train_dit``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--threads", type=int, default=1)
    return p


def seeded(args) -> torch.Generator:
    """Threads and seeds from the options; the data generator of the run."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed)


def parse_args(argv=None):
    p = training_parser(__doc__.splitlines()[0], PACKAGE_DIR, 2e-3,
                        "writes OUT/model and OUT/classifier_weights")
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--bpe", type=Path, default=None,
                   help="CLIP bpe_simple_vocab_16e6.txt.gz (default: reuse "
                        "the committed tokenizer)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    gen = seeded(args)
    start = time.time()
    tok_dir = tokenizer_source(args.bpe)
    images, labels = load_split("train")

    net = clf.train_classifier(images, labels, seed=args.seed)
    clf.save_classifier(net, args.out / "classifier_weights")

    vae = build_vae()
    latents = train_vae(vae, images * 2 - 1, args.vae_steps, args.batch, gen)
    ids = prompt_table(tok_dir)
    unet, te = build_unet(), build_text_encoder()
    train_denoiser(unet, te, latents.detach(), labels, ids, args, gen)
    save_pipeline(args.out / "model", vae, te, tok_dir, unet)
    print(f"done in {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
