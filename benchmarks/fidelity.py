"""AsyncDiff fidelity on the tiny digits model: how far do async images drift from sequential ones?

    python -m benchmarks.fidelity [--model tiny|tiny-sd3] [--quick] [--pairs 200] [--steps 25]
                                  [--guidance-scale 3.0] [--json PATH]
                                  [--plot docs/img/fidelity.png]

For a fixed, seeded set of prompt/seed pairs (every digit, the tiny model's
prompt templates) each (N components, stride S, warm-up w) config is sampled
and compared image-by-image with the sequential image of the same pair:
PSNR, SSIM, and the digit classifier's accuracy against the prompt's digit; for scale,
the PSNR between sequential images of the same prompts with other seeds.
``--model tiny-sd3`` runs the trained tiny MMDiT (asyncdiff/tiny/sd3_model, flow-matching
Euler) through ``AsyncDiffSD3Pipeline`` instead of the UNet (DDIM).
Beside them: the plan's ideal speedup and the paper's measured SD 2.1 ones.
The last line printed is ``psnr_n2s1_w1=<dB> acc_seq=<a> acc_n2s1_w1=<b>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asyncdiff.contract import Request
from asyncdiff.cost import balanced, project
from asyncdiff.partition import NOISE_PRED
from asyncdiff.pipeline import AsyncDiffPipeline
from asyncdiff.placement import Placement
from asyncdiff.schedule import make_plan
from asyncdiff.sd3 import AsyncDiffSD3Pipeline
from benchmarks import output_path
from benchmarks.metrics import PSNR_CAP_DB, SSIM_SIGMA, SSIM_WINDOW, psnr, ssim

FULL_CONFIGS = [(1, 1, 1)] + [(n, s, w) for n in (2, 3, 4) for s in (1, 2) for w in (1, 3, 5, 9)]
DIT_CONFIGS = [(1, 1, 1)] + [(n, s, w) for n in (2, 3, 4) for s in (1, 2) for w in (1, 3, 5)]
# The headline N2S1-w1 plus the paper's two stride configs and one warm-up step more.
QUICK_CONFIGS = [(1, 1, 1), (2, 1, 1), (2, 1, 3), (2, 2, 1), (3, 2, 1)]
QUICK_PAIRS = 30

# Paper, SD 2.1 on RTX A5000s, measured wall-clock speedups (spec §5).
# Table 1 (50 steps, w=1 by the spec's inference), Table 7 (25 steps), Table 2 (N3S2 warm-up sweep).
PAPER_SPEEDUP = {
    "table1_50steps": {"N2S1": 1.8, "N3S1": 2.3, "N4S1": 2.6, "N2S2": 3.0, "N3S2": 4.0},
    "table7_25steps": {"N2S1": 1.7, "N3S1": 2.1, "N4S1": 2.4, "N2S2": 2.7, "N3S2": 3.4},
    "table2_n3s2_warmup": {"3": 3.5, "5": 3.1, "7": 2.9, "9": 2.7, "11": 2.4},
}


@dataclass(frozen=True)
class Model:
    """A model the sweep can run: how to load it, which weights identify it, its sampler."""

    name: str
    weights: str  # file under the pipeline folder hashed into the result
    scheduler: str  # the Request SCHEDULER value
    configs: tuple  # the default (full) sweep
    json: str  # default result file of the full sweep

    def load(self):
        import asyncdiff.tiny

        if self.name == "tiny-sd3":
            from asyncdiff.tiny.train_dit import load_sd3_pipeline

            return load_sd3_pipeline()
        return asyncdiff.tiny.load_pipeline()  # looked up at call time (tests replace it)

    def folder(self) -> Path:
        from asyncdiff.tiny import MODEL_DIR
        from asyncdiff.tiny.train_dit import SD3_MODEL_DIR

        return Path(SD3_MODEL_DIR if self.name == "tiny-sd3" else MODEL_DIR)


MODELS = {
    "tiny": Model("tiny", "unet/diffusion_pytorch_model.safetensors", "ddim",
                  tuple(FULL_CONFIGS), "benchmarks/results/fidelity.json"),
    "tiny-sd3": Model("tiny-sd3", "transformer/diffusion_pytorch_model.safetensors",
                      "flowmatch-euler", tuple(DIT_CONFIGS),
                      "benchmarks/results/fidelity_dit.json"),
}


@dataclass(frozen=True)
class Pair:
    prompt: str
    seed: int
    digit: int


def label(n: int, s: int, w: int) -> str:
    return f"N{n}S{s}-w{w}"


def make_pairs(count: int, seed: int = 0) -> list[Pair]:
    """``count`` prompt/seed pairs, digits round-robin so every digit appears; templates and
    seeds drawn from ``seed`` so the set is fixed across runs and machines."""
    from asyncdiff.tiny import prompts_for

    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(count):
        digit = k % 10
        templates = prompts_for(digit)
        prompt = templates[int(rng.integers(len(templates)))]
        pairs.append(Pair(prompt, int(rng.integers(0, 2**31 - 1)), digit))
    return pairs


def ideal_speedup(steps: int, n: int, s: int, w: int) -> float:
    """The cost model's projection with balanced components and free communication.

    Warm-up steps cost one full UNet call, a parallel round 1/N of one (S=2
    rounds run on N+1 devices and produce two steps): T / (w + rounds/N).
    """
    return project(make_plan(steps, n, s, w), Placement(n, s), balanced(n)).speedup


@torch.no_grad()
def generate(pipe: AsyncDiffPipeline, pairs: list[Pair], steps: int, guidance: float,
             warmup: int, seed_offset: int = 0) -> np.ndarray:
    """The pipeline's generation for a whole batch of pairs at once (one Generation of B requests).

    Batching B prompts into one UNet batch of 2B is what makes the sweep
    affordable on a CPU.  ``seed_offset`` shifts every seed (the other-seed baseline).
    Returns uint8 (B, H, W, 3).
    """
    scheduler = getattr(pipe, "scheduler_name", "ddim")
    reqs = [Request(p.prompt, seed=(p.seed + seed_offset) % 2**31, steps=steps,
                    guidance_scale=guidance, warmup=warmup, scheduler=scheduler)
            for p in pairs]
    return pipe.decode_images(pipe.generate_latents(reqs))


def generate_all(pipe, pairs, steps, guidance, warmup, batch, seed_offset=0) -> np.ndarray:
    chunks = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    return np.concatenate([generate(pipe, c, steps, guidance, warmup, seed_offset)
                           for c in chunks])


def as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def accuracy(images: np.ndarray, digits: np.ndarray) -> tuple[float, np.ndarray]:
    from asyncdiff.tiny import classify

    pred = np.asarray(classify(as_float(images)))
    return float((pred == digits).mean()), pred


def log_line(msg: str) -> None:
    print(msg, flush=True)  # progress shows up live under nohup


def evaluate(sd, pairs: list[Pair], configs, steps: int, guidance: float, batch: int,
             log=log_line) -> dict:
    """Sample the sequential reference and every config; return all numbers."""
    digits = np.array([p.digit for p in pairs])
    pipes = {}

    def pipe_for(n, s):
        # One AsyncDiffPipeline per (N, S); all share the loaded weights.
        if (n, s) not in pipes:
            pipes[(n, s)] = AsyncDiffPipeline(sd, components=n, stride=s)
        return pipes[(n, s)]

    t0 = time.perf_counter()
    ref_pipe = reference_pipe(sd)
    reference = generate_all(ref_pipe, pairs, steps, guidance, 1, batch)
    acc_seq, pred_seq = accuracy(reference, digits)
    log(f"sequential reference: {len(pairs)} images in {time.perf_counter() - t0:.1f} s, "
        f"accuracy {acc_seq:.3f}")
    # Scale for the PSNRs below: the same prompts sampled with other seeds.
    other = generate_all(ref_pipe, pairs, steps, guidance, 1, batch, seed_offset=1)
    psnr_other = psnr(as_float(other), as_float(reference))
    log(f"other seed vs sequential: psnr {psnr_other.mean():.2f} dB")
    rows = []
    for n, s, w in configs:
        t0 = time.perf_counter()
        images = generate_all(pipe_for(n, s), pairs, steps, guidance, w, batch)
        acc, pred = accuracy(images, digits)
        p, q = psnr(as_float(images), as_float(reference)), ssim(as_float(images), as_float(reference))
        rows.append({
            "config": label(n, s, w), "components": n, "stride": s, "warmup": w,
            "psnr_mean": float(p.mean()), "psnr_median": float(np.median(p)),
            "psnr_min": float(p.min()), "ssim_mean": float(q.mean()), "ssim_min": float(q.min()),
            "accuracy": acc, "agree_with_sequential": float((pred == pred_seq).mean()),
            "ideal_speedup": ideal_speedup(steps, n, s, w),
            "parallel_rounds": make_plan(steps, n, s, w).parallel_rounds,
            "seconds": time.perf_counter() - t0,
            "psnr_per_pair": [round(float(v), 3) for v in p],
            "ssim_per_pair": [round(float(v), 4) for v in q],
        })
        log(f"{label(n, s, w)}: psnr {p.mean():.2f} dB, ssim {q.mean():.4f}, acc {acc:.3f} "
            f"({rows[-1]['seconds']:.1f} s)")
    return {"accuracy_sequential": acc_seq, "predictions_sequential": pred_seq.tolist(),
            "psnr_other_seed_mean": float(psnr_other.mean()), "configs": rows}


class _WholeDenoiser:
    """The sequential reference: the diffusers denoiser itself, not our components.

    A one-component plan is all warm-up, so each step is one call, which this
    executor runs on the whole UNet / transformer.  Keeping the reference independent
    of the component code makes the N=1 row a real check (expected: identical images,
    reported as the PSNR cap).
    """

    def __init__(self, sd):
        super().__init__(sd, components=1, stride=1)
        self.runner = self

    def generate(self, gen):
        return gen.run(self.run_wave)

    def run_wave(self, calls) -> list[dict]:
        (call,) = calls
        x = call.inputs
        if "pooled_projections" in x:  # SD3's MMDiT
            out = self.sd.transformer(hidden_states=x["sample"], timestep=x["timestep"],
                                      encoder_hidden_states=x["encoder_hidden_states"],
                                      pooled_projections=x["pooled_projections"])
        else:
            out = self.sd.unet(x["sample"], x["timestep"],
                               encoder_hidden_states=x["encoder_hidden_states"])
        return [{NOISE_PRED: out.sample}]


class ReferencePipe(_WholeDenoiser, AsyncDiffPipeline):
    """The UNet pipelines' sequential reference."""


class ReferenceSD3Pipe(_WholeDenoiser, AsyncDiffSD3Pipeline):
    """The SD3 pipelines' sequential reference."""


def reference_pipe(sd) -> AsyncDiffPipeline:
    """The sequential reference of a UNet or SD3 pipeline."""
    return ReferencePipe(sd) if getattr(sd, "transformer", None) is None else ReferenceSD3Pipe(sd)


def paper_speedup(n: int, s: int, w: int) -> float | None:
    """The paper's measured SD 2.1 speedup for the same N, S, w (50 steps), if reported."""
    key = f"N{n}S{s}"
    if key == "N3S2" and str(w) in PAPER_SPEEDUP["table2_n3s2_warmup"]:
        return PAPER_SPEEDUP["table2_n3s2_warmup"][str(w)]
    if w == 1:
        return PAPER_SPEEDUP["table1_50steps"].get(key)
    return None


def format_table(result: dict) -> str:
    head = (f"{'config':10} {'PSNR dB':>8} {'SSIM':>7} {'acc':>6} {'agree':>6} "
            f"{'ideal x':>8} {'paper x':>8}")
    lines = [head, "-" * len(head),
             f"{'sequential':10} {'-':>8} {'-':>7} {result['accuracy_sequential']:6.3f} "
             f"{'-':>6} {1.0:8.2f} {1.0:8.1f}"]
    if "psnr_other_seed_mean" in result:
        lines.append(f"{'other seed':10} {result['psnr_other_seed_mean']:8.2f}")
    for r in result["configs"]:
        paper = paper_speedup(r["components"], r["stride"], r["warmup"])
        lines.append(f"{r['config']:10} {r['psnr_mean']:8.2f} {r['ssim_mean']:7.4f} "
                     f"{r['accuracy']:6.3f} {r['agree_with_sequential']:6.3f} "
                     f"{r['ideal_speedup']:8.2f} {paper if paper else '-':>8}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The table of docs/benchmarks-fidelity.md."""
    lines = ["| config | PSNR dB (mean) | PSNR min | SSIM (mean) | acc | agree "
             "| ideal speedup | paper SD 2.1 (measured) |", "|---|---|---|---|---|---|---|---|",
             f"| sequential | – | – | – | {result['accuracy_sequential']:.3f} | – | 1.00× | 1.0× |"]
    if "psnr_other_seed_mean" in result:  # scale: same prompts, sequential, seed + 1
        lines.append(f"| sequential, other seed | {result['psnr_other_seed_mean']:.2f} "
                     "| – | – | – | – | – | – |")
    for r in result["configs"]:
        paper = paper_speedup(r["components"], r["stride"], r["warmup"])
        lines.append(f"| {r['config']} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} "
                     f"| {r['ssim_mean']:.4f} | {r['accuracy']:.3f} "
                     f"| {r['agree_with_sequential']:.3f} | {r['ideal_speedup']:.2f}× "
                     f"| {f'{paper}×' if paper else '–'} |")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    row = next(r for r in result["configs"] if r["config"] == "N2S1-w1")
    return (f"psnr_n2s1_w1={row['psnr_mean']:.2f} acc_seq={result['accuracy_sequential']:.3f} "
            f"acc_n2s1_w1={row['accuracy']:.3f}")


def model_digest(model: Model = MODELS["tiny"]) -> str:
    """sha256 (first 16 hex) of the denoiser weights: ties the numbers to one trained model."""
    import hashlib

    data = (model.folder() / model.weights).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def machine_info() -> dict:
    import diffusers

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__}


def plot(result: dict, path: Path) -> None:
    """Ideal speedup vs PSNR, one line per (N, S) through its warm-up sweep (cf. paper Fig. 5b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["configs"] if r["components"] > 1]  # N=1 sits at the cap
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key in sorted({(r["components"], r["stride"]) for r in rows}):
        group = sorted((r for r in rows if (r["components"], r["stride"]) == key),
                       key=lambda r: r["warmup"])
        xs, ys = [r["ideal_speedup"] for r in group], [r["psnr_mean"] for r in group]
        ax.plot(xs, ys, "o-", label=f"N{key[0]} S{key[1]}")
        for r, x, y in zip(group, xs, ys):
            ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    s = result["settings"]
    ax.set_xlabel("ideal speedup  T / (warm-up + rounds/N)")
    ax.set_ylabel("PSNR vs sequential (dB, mean)")
    ax.set_title(f"AsyncDiff fidelity, {s.get('model', 'tiny')} digits model ({s['pairs']} "
                 f"pairs, {s['steps']} {s['scheduler']} steps, guidance {s['guidance']})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny",
                   help="tiny: the UNet (DDIM); tiny-sd3: the MMDiT (flow-matching Euler)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_PAIRS} pairs and configs {[label(*c) for c in QUICK_CONFIGS]}")
    p.add_argument("--pairs", type=int, default=None, help="prompt/seed pairs (default 200)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps T")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt/seed pair set")
    p.add_argument("--configs", default=None,
                   help="comma list like 1:1:1,2:1:1 (N:S:w) overriding the sweep")
    p.add_argument("--batch", type=int, default=100, help="pairs per UNet batch")
    # 1 thread: on a shared 2-core machine two OpenMP threads spin against other
    # jobs and ran ~10x slower than one in our measurements.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None,
                   help="default benchmarks/out/fidelity.json, fidelity_dit.json for "
                        "tiny-sd3 (*_quick.json with --quick); the committed runs are "
                        "benchmarks/results/<same name>")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (none when omitted)")
    p.add_argument("--report", type=Path, default=None,
                   help="no sampling: print the markdown table (and --plot) of a saved JSON")
    a = p.parse_args(argv)
    a.pairs = a.pairs or (QUICK_PAIRS if a.quick else 200)
    model = MODELS[a.model]
    a.configs = ([tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
                 if a.configs else QUICK_CONFIGS if a.quick else list(model.configs))
    if (2, 1, 1) not in a.configs:
        p.error("configs must include 2:1:1 (the summary line reports N2S1-w1)")
    full = output_path(Path(model.json).name)
    a.json = a.json or (full.with_name(full.stem + "_quick.json") if a.quick else full)
    return a


def run(args, log=log_line) -> dict:
    """Load the model, sweep, and return the full result dict (no files written)."""
    torch.set_num_threads(args.threads)
    model = MODELS[args.model]
    sd, digest = model.load(), model_digest(model)
    pairs = make_pairs(args.pairs, args.seed)
    t0 = time.perf_counter()
    result = evaluate(sd, pairs, args.configs, args.steps, args.guidance_scale, args.batch, log)
    result.update({
        "command": "python -m benchmarks.fidelity " + " ".join(args.argv),
        "machine": machine_info(),
        ("model_unet_sha256_16" if model.name == "tiny" else "model_denoiser_sha256_16"): digest,
        "settings": {"model": model.name, "pairs": len(pairs), "pair_seed": args.seed,
                     "steps": args.steps, "guidance": args.guidance_scale,
                     "scheduler": model.scheduler, "batch": args.batch,
                     "psnr_cap_db": PSNR_CAP_DB, "ssim_window": SSIM_WINDOW,
                     "ssim_sigma": SSIM_SIGMA, "quick": args.quick},
        "pairs": [p.__dict__ for p in pairs],
        "paper_speedup_sd21": PAPER_SPEEDUP,
        "seconds_total": time.perf_counter() - t0,
    })
    return result


def report(args) -> dict:
    result = json.loads(args.report.read_text())
    print(f"{result['command']}  ({result['seconds_total']:.0f} s, {result['machine']})")
    print(markdown_table(result))
    if args.plot:
        plot(result, args.plot)
    print(summary_line(result))
    return result


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.report:
        return report(args)
    result = run(args)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"total {result['seconds_total']:.1f} s; wrote {args.json}"
          + (f" and {args.plot}" if args.plot else ""))
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
