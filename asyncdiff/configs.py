"""Built-in denoiser configurations and model loading by name or folder.

``sd15``/``sd21``/``sdxl`` keep the block structure of the real models (block
types, layers per block, attention layout, transformer depth, SDXL added
conditioning) but are narrowed to run in milliseconds on a CPU; the
``-full`` variants are the published architectures (random weights), used for
FLOP counts and speed benchmarks.  ``tiny`` is the trained model shipped in
``asyncdiff/tiny/model``.

The DiTs: ``sd3-medium`` (``SD3Transformer2DModel``) and ``flux-dev``
(``FluxTransformer2DModel``) are the published shapes; ``sd3`` and ``flux``
keep their structure (joint blocks, single blocks, guidance embedding) narrowed
for tests.  The denoiser kind (``unet`` | ``sd3`` | ``flux``) is read from the
config (``denoiser_kind``).
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

_SD3_MEDIUM = dict(
    _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16,
    num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
_FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19,
    num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
_NARROW = dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
               pooled_projection_dim=16)
DIT_CONFIGS: dict[str, dict] = {
    "sd3-medium": _SD3_MEDIUM,
    "flux-dev": _FLUX_DEV,
    "sd3": {**_SD3_MEDIUM, **_NARROW, "sample_size": 16, "num_layers": 3,
            "caption_projection_dim": 16, "pos_embed_max_size": 16},
    "flux": {**_FLUX_DEV, **_NARROW, "in_channels": 16, "num_layers": 2, "num_single_layers": 3,
             "axes_dims_rope": [2, 2, 4]},
    # The speed benchmark's DiT: SD3's structure at 256 wide (4 heads of 64) and 6 joint blocks,
    # ~0.3 s per CFG-batch call at latent 32 on one CPU core; 6 blocks cut evenly for N2S1 (3|3)
    # and for batched N2S2 (4|2).
    "sd3-bench": {**_SD3_MEDIUM, "sample_size": 32, "num_layers": 6, "num_attention_heads": 4,
                  "joint_attention_dim": 256, "caption_projection_dim": 256,
                  "pooled_projection_dim": 256, "pos_embed_max_size": 32},
}

# 2**(VAE down blocks - 1) of the pipeline each config comes from: image px -> latent px.
VAE_SCALE = {name: 8 for name in [*UNET_CONFIGS, *DIT_CONFIGS]}

# Text tokens a DiT pipeline feeds by default: SD3 77 CLIP + 256 T5, FLUX 512 T5.
TEXT_TOKENS = {"unet": 77, "sd3": 333, "flux": 512}
# Latent side when a config has no sample_size (FLUX): 1024 px images.
DEFAULT_LATENT = 128
DENOISER_CLASSES = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3",
                    "FluxTransformer2DModel": "flux"}

# The pooled text embedding width of SDXL-like configs (the rest of the add input is time ids).
TEXT_EMBEDS_DIM = {"sdxl-full": 1280, "sdxl": 32}


@dataclass
class ModelSource:
    """Where a UNet came from, enough to rebuild it in another process."""

    name: str  # a built-in name, or a folder path
    unet_dir: Path | None  # the denoiser folder (unet/ or transformer/), None for built-ins
    vae_scale: int


def builtin_names() -> list[str]:
    return ["tiny", *UNET_CONFIGS, *DIT_CONFIGS]


def denoiser_kind(config) -> str:
    """``unet``, ``sd3`` or ``flux``: from ``_class_name`` when the config has it, else from
    the fields only that family has (a model's ``.config`` carries no class name)."""
    config = dict(config)
    name = config.get("_class_name")
    if name is not None:
        if name not in DENOISER_CLASSES:
            raise ValueError(f"denoiser config _class_name={name!r} is not supported "
                             f"(supported: {', '.join(DENOISER_CLASSES)})")
        return DENOISER_CLASSES[name]
    for kind, field in (("unet", "down_block_types"), ("flux", "num_single_layers"),
                        ("sd3", "caption_projection_dim")):
        if field in config:
            return kind
    raise ValueError("denoiser config has no _class_name and none of down_block_types (UNet), "
                     "num_single_layers (FLUX), caption_projection_dim (SD3)")


def denoiser_class(config):
    """The diffusers model class of ``config``."""
    import diffusers

    kind = denoiser_kind(config)
    return getattr(diffusers, next(c for c, k in DENOISER_CLASSES.items() if k == kind))


def default_latent_size(config) -> int:
    return dict(config).get("sample_size") or DEFAULT_LATENT


def default_batch(config) -> int:
    """Denoiser batch of one prompt: 2 with classifier-free guidance, 1 for a guidance-distilled
    model (FLUX dev embeds the guidance scale instead)."""
    return 1 if dict(config).get("guidance_embeds") else 2


def resolve(model: str) -> ModelSource:
    """Map a built-in name, a diffusers pipeline folder or a UNet folder to a ModelSource."""
    if model == "tiny":
        from asyncdiff.tiny import MODEL_DIR

        model = str(MODEL_DIR)
    if model in UNET_CONFIGS or model in DIT_CONFIGS:
        return ModelSource(model, None, VAE_SCALE[model])
    path = Path(model)
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").exists():
            return ModelSource(model, path / sub, _vae_scale(path / "vae" / "config.json"))
    if (path / "config.json").exists():
        return ModelSource(model, path, 8)
    raise ValueError(
        f"model {model!r} is neither a built-in ({', '.join(builtin_names())}) nor a folder "
        "with unet/ or transformer/config.json (a diffusers pipeline) or config.json (a denoiser)"
    )


def _vae_scale(vae_config: Path) -> int:
    if not vae_config.exists():
        return 8
    blocks = json.loads(vae_config.read_text())["block_out_channels"]
    return 2 ** (len(blocks) - 1)


def load_denoiser(source: ModelSource | str, device: str | torch.device = "cpu", seed: int = 0):
    """The denoiser (UNet or DiT) of ``source``: trained weights from a folder, seeded random
    weights for built-ins.

    ``device="meta"`` builds a weightless model (shapes and FLOPs only).
    """
    if isinstance(source, str):
        source = resolve(source)
    meta = str(device) == "meta"
    if source.unet_dir is not None:
        config = json.loads((Path(source.unet_dir) / "config.json").read_text())
    else:
        config = {**UNET_CONFIGS, **DIT_CONFIGS}[source.name]
    cls = denoiser_class(config)
    if source.unet_dir is not None and not meta:
        return cls.from_pretrained(source.unet_dir).to(device).eval()
    with torch.device(device):
        if not meta:
            torch.manual_seed(seed)
        model = cls.from_config(config)
    return model.eval()


load_unet = load_denoiser  # the name callers of the UNet-only version use


def example_inputs(unet_config: dict, batch: int, height: int, width: int, device="cpu", seed=0):
    """Seeded inputs (sample, timestep, encoder_hidden_states, extra) for a denoiser.

    ``extra``: SDXL's text_embeds and time_ids; a DiT's pooled_projections, and FLUX's
    img_ids / txt_ids (batch first, like every component input) and guidance.
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    kind = denoiser_kind(unet_config)
    if kind != "unet":
        return _dit_inputs(unet_config, kind, batch, height, width, device, rand)
    sample = rand(batch, unet_config["in_channels"], height, width)
    timestep = torch.linspace(900, 100, batch).to(device)
    text = rand(batch, 77, unet_config["cross_attention_dim"])
    extra = {}
    if unet_config.get("addition_embed_type") == "text_time":
        time_dim = unet_config["addition_time_embed_dim"]
        text_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * time_dim
        extra = {"text_embeds": rand(batch, text_dim), "time_ids": rand(batch, 6).abs() * 512}
    return sample, timestep, text, extra


def _dit_inputs(config: dict, kind: str, batch: int, height: int, width: int, device, rand):
    tokens = TEXT_TOKENS[kind]
    text = rand(batch, tokens, config["joint_attention_dim"])
    extra = {"pooled_projections": rand(batch, config["pooled_projection_dim"])}
    if kind == "sd3":
        sample = rand(batch, config["in_channels"], height, width)
        return sample, torch.linspace(900, 100, batch).to(device), text, extra
    # FLUX: 2x2-packed latents [B, h/2 * w/2, in_channels]; timesteps are sigmas in [0, 1].
    rows, cols = height // 2, width // 2
    sample = rand(batch, rows * cols, config["in_channels"])
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2).float()], dim=1)
    extra["img_ids"] = img_ids.expand(batch, -1, -1).to(device)
    extra["txt_ids"] = torch.zeros(batch, tokens, 3).to(device)
    if config.get("guidance_embeds"):
        extra["guidance"] = torch.full((batch,), 3.5).to(device)
    return sample, torch.linspace(0.9, 0.1, batch).to(device), text, extra
