"""Built-in UNet configurations and model loading by name or folder.

``sd15``/``sd21``/``sdxl`` keep the block structure of the real models (block
types, layers per block, attention layout, transformer depth, SDXL added
conditioning) but are narrowed to run in milliseconds on a CPU; the
``-full`` variants are the published architectures (random weights), used for
FLOP counts and speed benchmarks.  ``tiny`` is the trained model shipped in
``asyncdiff/tiny/model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

UNET_CONFIGS: dict[str, dict] = {
    "sd15-full": dict(
        sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sd21-full": dict(
        sample_size=96, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    ),
    "sdxl-full": dict(
        sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=_XL_DOWN, up_block_types=_XL_UP, cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], use_linear_projection=True,
        transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
    "sd15": dict(
        sample_size=16, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
    ),
    "sd21": dict(
        sample_size=16, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=48,
        attention_head_dim=[2, 4, 4, 4], use_linear_projection=True, norm_num_groups=16,
    ),
    "sdxl": dict(
        sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=2,
        down_block_types=_XL_DOWN, up_block_types=_XL_UP, cross_attention_dim=64,
        attention_head_dim=[2, 4, 4], use_linear_projection=True,
        transformer_layers_per_block=[1, 2, 3], addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=16,
    ),
}

# 2**(VAE down blocks - 1) of the pipeline each config comes from: image px -> latent px.
VAE_SCALE = {"sd15-full": 8, "sd21-full": 8, "sdxl-full": 8, "sd15": 8, "sd21": 8, "sdxl": 8}

# The pooled text embedding width of SDXL-like configs (the rest of the add input is time ids).
TEXT_EMBEDS_DIM = {"sdxl-full": 1280, "sdxl": 32}


@dataclass
class ModelSource:
    """Where a UNet came from, enough to rebuild it in another process."""

    name: str  # a built-in name, or a folder path
    unet_dir: Path | None  # folder holding config.json + weights, None for random built-ins
    vae_scale: int


def builtin_names() -> list[str]:
    return ["tiny", *UNET_CONFIGS]


def resolve(model: str) -> ModelSource:
    """Map a built-in name, a diffusers pipeline folder or a UNet folder to a ModelSource."""
    if model == "tiny":
        from asyncdiff.tiny import MODEL_DIR

        model = str(MODEL_DIR)
    if model in UNET_CONFIGS:
        return ModelSource(model, None, VAE_SCALE[model])
    path = Path(model)
    if (path / "unet" / "config.json").exists():
        return ModelSource(model, path / "unet", _vae_scale(path / "vae" / "config.json"))
    if (path / "config.json").exists():
        return ModelSource(model, path, 8)
    raise ValueError(
        f"model {model!r} is neither a built-in ({', '.join(builtin_names())}) nor a folder "
        "with unet/config.json (a diffusers pipeline) or config.json (a UNet)"
    )


def _vae_scale(vae_config: Path) -> int:
    if not vae_config.exists():
        return 8
    blocks = json.loads(vae_config.read_text())["block_out_channels"]
    return 2 ** (len(blocks) - 1)


def load_unet(source: ModelSource | str, device: str | torch.device = "cpu", seed: int = 0):
    """The UNet of ``source``: trained weights from a folder, seeded random weights for built-ins.

    ``device="meta"`` builds a weightless model (shapes and FLOPs only).
    """
    from diffusers import UNet2DConditionModel

    if isinstance(source, str):
        source = resolve(source)
    meta = str(device) == "meta"
    if source.unet_dir is not None and not meta:
        return UNet2DConditionModel.from_pretrained(source.unet_dir).to(device).eval()
    if source.unet_dir is not None:
        config = UNet2DConditionModel.load_config(source.unet_dir)
    else:
        config = UNET_CONFIGS[source.name]
    with torch.device(device):
        if not meta:
            torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    return unet.eval()


def example_inputs(unet_config: dict, batch: int, height: int, width: int, device="cpu", seed=0):
    """Seeded inputs (sample, timestep, encoder_hidden_states, text_embeds, time_ids) for a UNet."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    sample = rand(batch, unet_config["in_channels"], height, width)
    timestep = torch.linspace(900, 100, batch).to(device)
    text = rand(batch, 77, unet_config["cross_attention_dim"])
    extra = {}
    if unet_config.get("addition_embed_type") == "text_time":
        time_dim = unet_config["addition_time_embed_dim"]
        text_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * time_dim
        extra = {"text_embeds": rand(batch, text_dim), "time_ids": rand(batch, 6).abs() * 512}
    return sample, timestep, text, extra
