"""The speed benchmark's pipeline: the tiny model around a bigger, random-weight UNet.

The tiny model's tokenizer, text encoder, VAE and scheduler are copied (never
modified); its UNet is replaced by one with the SD 1.5 block structure (the
``sd15-full`` config: 4 levels, 2 layers per block, cross-attention in the
first three) with narrower channels, so that a call costs well over 100 ms on
one CPU thread while the fp32 ONNX files stay small enough to export in
seconds (the full-width UNet is 3.4 GB, over protobuf's 2 GB limit at N=1).
Weights are random: speed does not depend on them.

Also here: exporting that pipeline for a deployment (N, S) and serving the
exports side by side, shared by ``benchmarks.speed`` and ``benchmarks.perf``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# Channels of the benchmark UNet: sd15-full's [320, 640, 1280, 1280] x 0.3 (~76 M parameters,
# ~300 MB fp32).
BENCH_CHANNELS = (96, 192, 384, 384)
# Latent side 32 (the tiny VAE has scale 1: 32x32 images). At 16 a call is bound by reading the
# weights, not by FLOPs, so a FLOP-balanced cut is not time-balanced; at 32 compute dominates.
BENCH_LATENT = 32
COPIED = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae")


def unet_config(channels=BENCH_CHANNELS, latent: int = BENCH_LATENT) -> dict:
    """sd15-full with the tiny text encoder's width as cross_attention_dim."""
    from asyncdiff.configs import UNET_CONFIGS
    from asyncdiff.tiny import MODEL_DIR

    text = json.loads((Path(MODEL_DIR) / "text_encoder" / "config.json").read_text())
    return dict(UNET_CONFIGS["sd15-full"], block_out_channels=list(channels),
                cross_attention_dim=text["hidden_size"], sample_size=latent,
                in_channels=4, out_channels=4)


def build(out: Path, channels=BENCH_CHANNELS, latent: int = BENCH_LATENT, seed: int = 0) -> Path:
    """Write the pipeline folder (diffusers layout); reused if already built with this config."""
    import torch
    from diffusers import UNet2DConditionModel

    from asyncdiff.tiny import MODEL_DIR

    out = Path(out)
    config = unet_config(channels, latent)
    stamp = out / "bench_config.json"
    wanted = json.dumps({"unet": config, "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED:
        src = Path(MODEL_DIR) / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(config).save_pretrained(out / "unet")
    stamp.write_text(wanted)  # last: a half-written folder is rebuilt
    return out


@dataclass(frozen=True)
class Deployment:
    components: int
    stride: int = 1
    batched_stride: bool = False

    @property
    def name(self) -> str:
        return f"n{self.components}s{self.stride}" + ("b" if self.batched_stride else "")


def export(pipeline: Path, dep: Deployment, out: Path, default_steps: int = 10,
           validate: bool = True):
    """Export ``pipeline`` for ``dep`` (onnxruntime) into ``out``; returns its Partition.

    An export already in ``out`` from the same pipeline and options is reused.
    """
    from asyncdiff.partition import Partition
    from export.cli import ExportOptions, run_export
    from asyncdiff.contract import STREAM_MODEL_NAME, Request

    out = Path(out)
    stamp = out / "bench_export.json"
    wanted = json.dumps({"pipeline": (Path(pipeline) / "bench_config.json").read_text(),
                         "deployment": dataclasses.asdict(dep), "steps": default_steps,
                         "validate": validate}, sort_keys=True)
    served = out / STREAM_MODEL_NAME / "1" / "partition.json"
    if stamp.is_file() and stamp.read_text() == wanted and served.is_file():
        return Partition.load(served)
    opts = ExportOptions(model=str(pipeline), components=dep.components, stride=dep.stride,
                         batched_stride=dep.batched_stride, backend="onnxruntime", out=out,
                         overwrite=True, progress=False, validate=validate,
                         defaults=Request(steps=default_steps))
    result = run_export(opts)
    stamp.write_text(wanted)
    return result.partition


@contextlib.contextmanager
def serve_all(repos: dict[str, Path], startup_timeout: float = 300.0):
    """Start one TritonServer per repository (free ports); yields {name: server}."""
    from serve.launcher import TritonServer

    with contextlib.ExitStack() as stack:
        servers = {}
        for name, repo in repos.items():
            servers[name] = stack.enter_context(
                TritonServer(Path(repo), startup_timeout=startup_timeout))
        yield servers


def onnx_bytes(repo: Path, model: str) -> int:
    """Bytes of a served model's files (its weights, as the device holds them)."""
    return sum(p.stat().st_size for p in (Path(repo) / model / "1").rglob("*") if p.is_file())
