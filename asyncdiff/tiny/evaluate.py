"""Measure the tiny model: prompt accuracy and step-to-step block similarity.

    python -m asyncdiff.tiny.evaluate [--quick]

1. Sequential (ordinary) sampling of every prompt template x digit x seed,
   judged by the committed classifier against the prompt's digit.
2. Mean cosine similarity of each UNet block's output between consecutive
   denoising steps (the redundancy AsyncDiff exploits), for the trained
   UNet and for the same architecture at random init.
Prints the numbers and writes benchmarks/out/tiny_model_quality.json (``--out
benchmarks/results/tiny_model_quality.json`` replaces the committed full run).

    python -m asyncdiff.tiny.evaluate --dit [--quick]

measures the tiny SD3 model (asyncdiff/tiny/sd3_model) instead: prompt accuracy of
``StableDiffusion3Pipeline`` samples (flow-matching Euler), written to
benchmarks/out/tiny_dit_quality.json.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import MODEL_DIR, classify, digit_of, load_pipeline, prompts_for
from .data import load_split

BLOCKS = ("down0", "down1", "down2", "mid", "up0", "up1", "up2")
# Not benchmarks/results/: a run, quick ones above all, must not replace the committed
# result unless --out names it (the benchmarks' convention, benchmarks.output_path).
RESULT = Path("benchmarks/out/tiny_model_quality.json")
DIT_RESULT = Path("benchmarks/out/tiny_dit_quality.json")


def blocks_of(unet):
    mods = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    return dict(zip(BLOCKS, mods))


class StepCosine:
    """Forward hooks that compare each block's output with its output at
    the previous UNet call (= previous denoising step)."""

    def __init__(self, unet):
        self.prev, self.pairs = {}, {name: [] for name in BLOCKS}
        self.handles = [m.register_forward_hook(self._hook(name))
                        for name, m in blocks_of(unet).items()]

    def _hook(self, name):
        def hook(_module, _inputs, out):
            out = (out[0] if isinstance(out, tuple) else out).flatten(1)
            if name in self.prev:
                cos = torch.nn.functional.cosine_similarity(
                    out, self.prev[name], dim=1)
                self.pairs[name].append(cos.mean().item())
            self.prev[name] = out.detach().clone()
        return hook

    def new_trajectory(self):
        self.prev = {}

    def summary(self):
        for h in self.handles:
            h.remove()
        return {n: {"mean": float(np.mean(v)), "min": float(np.min(v))}
                for n, v in self.pairs.items()}


def generate(pipe, prompts, seeds, args):
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(list(prompts), num_inference_steps=args.steps,
               guidance_scale=args.guidance_scale, generator=gens,
               output_type="np")
    return out.images


def batched(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def prompt_accuracy(pipe, args):
    pairs = [(p, s) for s in range(args.seeds)
             for d in range(10) for p in prompts_for(d)]
    preds, start = [], time.time()
    for chunk in batched(pairs, args.batch):
        images = generate(pipe, [p for p, _ in chunk], [s for _, s in chunk],
                          args)
        preds.extend(classify(images).tolist())
    wanted = np.array([digit_of(p) for p, _ in pairs])
    hits = np.array(preds) == wanted
    per_digit = {str(d): float(hits[wanted == d].mean()) for d in range(10)}
    return {"pairs": len(pairs), "accuracy": float(hits.mean()),
            "per_digit": per_digit,
            "seconds_per_image": (time.time() - start) / len(pairs)}


def block_cosine(pipe, unet, args):
    """Per-block step-to-step cosine (and prompt accuracy) for one UNet."""
    trained_unet, pipe.unet = pipe.unet, unet
    probe = StepCosine(unet)
    prompts = [prompts_for(d)[k] for k in range(args.cos_templates)
               for d in range(10)]
    preds = []
    for chunk in batched(prompts, args.batch):
        probe.new_trajectory()
        preds.extend(classify(generate(pipe, chunk, [0] * len(chunk),
                                       args)).tolist())
    pipe.unet = trained_unet
    hits = np.array(preds) == np.array([digit_of(p) for p in prompts])
    return probe.summary(), float(hits.mean())


def random_unet(config, seed=123):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config).eval()


def classifier_accuracy():
    images, labels = load_split("heldout")
    return float((classify(images) == labels.numpy()).mean())


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_grid(pipe, path, args, scale=6, gap=4):
    """One sample per digit 0..9 in a row, upscaled with nearest pixels."""
    from PIL import Image

    prompts = [prompts_for(d)[2] for d in range(10)]
    images = generate(pipe, prompts, [0] * 10, args)[..., 0]
    tile = 16 * scale
    grid = Image.new("L", (10 * tile + 11 * gap, tile + 2 * gap), 255)
    for d, img in enumerate(images):
        im = Image.fromarray((img * 255).round().astype(np.uint8))
        grid.paste(im.resize((tile, tile), Image.NEAREST),
                   (gap + d * (tile + gap), gap))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def print_report(res):
    seq = res["sequential"]
    print(f"classifier held-out accuracy: {res['classifier_heldout_accuracy']:.4f}")
    print(f"sequential prompt accuracy: {seq['accuracy']:.4f} over "
          f"{seq['pairs']} prompt/seed pairs "
          f"({res['steps']} DDIM steps, guidance {res['guidance_scale']})")
    print(f"{'block':6} {'trained mean/min':>18} {'random mean/min':>18}")
    for b in BLOCKS:
        t, r = res["block_cosine"]["trained"][b], res["block_cosine"]["random_init"][b]
        print(f"{b:6} {t['mean']:9.4f}/{t['min']:.4f} {r['mean']:9.4f}/{r['min']:.4f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed per prompt (60 pairs) and 10 cosine prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--dit", action="store_true",
                   help="the tiny SD3 model: prompt accuracy only (block cosine is the UNet's)")
    p.add_argument("--model", type=Path, default=None,
                   help="pipeline folder (default: the committed UNet or, with --dit, SD3 one)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None,
                   help="also save a one-sample-per-digit PNG here")
    args = p.parse_args(argv)
    args.seeds = 1 if args.quick else 4
    args.cos_templates = 1 if args.quick else 3
    if args.dit:
        from .train_dit import SD3_MODEL_DIR

        args.model, args.out = args.model or SD3_MODEL_DIR, args.out or DIT_RESULT
    args.model, args.out = args.model or MODEL_DIR, args.out or RESULT
    return args


def evaluate_dit(args):
    """Prompt accuracy of the tiny SD3 pipeline's own sampling."""
    from .train_dit import load_sd3_pipeline

    pipe = load_sd3_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    res = {"quick": args.quick, "scheduler": type(pipe.scheduler).__name__,
           "steps": args.steps, "guidance_scale": args.guidance_scale,
           "model_folder_bytes": folder_bytes(args.model),
           "sequential": prompt_accuracy(pipe, args)}
    seq = res["sequential"]
    print(f"tiny SD3 prompt accuracy: {seq['accuracy']:.4f} over {seq['pairs']} prompt/seed "
          f"pairs ({args.steps} steps, guidance {args.guidance_scale}), "
          f"{seq['seconds_per_image']:.3f} s/image; folder {res['model_folder_bytes']} bytes")
    if args.grid:
        save_grid(pipe, args.grid, args)
    return res


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(2)
    if args.dit:
        res = evaluate_dit(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        return res
    pipe = load_pipeline(path=args.model)
    pipe.set_progress_bar_config(disable=True)
    trained, _ = block_cosine(pipe, pipe.unet, args)
    untrained, untrained_acc = block_cosine(
        pipe, random_unet(pipe.unet.config), args)
    res = {
        "quick": args.quick, "scheduler": type(pipe.scheduler).__name__,
        "steps": args.steps, "guidance_scale": args.guidance_scale,
        "model_folder_bytes": folder_bytes(args.model),
        "classifier_heldout_accuracy": classifier_accuracy(),
        "sequential": prompt_accuracy(pipe, args),
        "block_cosine": {"trained": trained, "random_init": untrained},
        "random_init_prompt_accuracy": untrained_acc,
    }
    print_report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    if args.grid:
        save_grid(pipe, args.grid, args)


if __name__ == "__main__":
    main()
