"""A diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` as an ordered list of stages.

Stage names::

    embed          patch embedding (SD3 pos_embed / FLUX x_embedder) + context_embedder
    joint{j}       joint (double-stream, MMDiT) block j
    single{j}      single-stream block j (FLUX)
    proj_out       norm_out + proj_out (+ SD3's unpatchify): the noise prediction

Two token streams cross every cut: the image tokens, named after the stage
(``joint3``), and the text tokens (``joint3_txt``).  diffusers 0.42 passes them
separately to the single blocks too (a single block concatenates them inside
and splits them again), so they stay two tensors throughout.  SD3's last joint
block is ``context_pre_only``: it writes image tokens only.  SD3 image tokens
cross as a [B, h/p, w/p, D] grid, a free view of the [B, L, D] tokens, so the
output stage can unpatchify without the latent.

Like the UNet's time embedding, the conditioning is not a stage: every
component recomputes the time + pooled-text (+ FLUX guidance) embedding and
FLUX's rotary embedding from ``timestep``, ``pooled_projections``,
``guidance``, ``img_ids``, ``txt_ids``.
"""

from __future__ import annotations

import torch
from torch import nn

from asyncdiff.stages import Stage, StageGraph

TEXT_SUFFIX = "_txt"


def _ids(ids: torch.Tensor) -> torch.Tensor:
    # Component inputs are batch first; the ids are the same for every sample.
    return ids[0] if ids.dim() == 3 else ids


class DitConditioning(nn.Module):
    """Per-step conditioning every block needs: (temb, rotary embedding or None)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.time_text_embed = model.time_text_embed
        self.flux = kind == "flux"
        self.guidance = self.flux and bool(model.config.guidance_embeds)
        self.rope = model.pos_embed if self.flux else None  # FluxPosEmbed: no weights
        self.inputs = [("timestep", "timestep"), ("pooled_projections", "pooled")]
        if self.guidance:
            self.inputs.append(("guidance", "guidance"))
        if self.flux:
            self.inputs += [("img_ids", "img_ids"), ("txt_ids", "txt_ids")]

    def embed(self, env: dict[str, torch.Tensor], dtype: torch.dtype):
        t, pooled = env["timestep"], env["pooled_projections"]
        if not self.flux:
            return self.time_text_embed(t, pooled), None
        t = t.to(dtype) * 1000  # FLUX takes sigmas in [0, 1]; its embedding wants 0..1000
        if self.guidance:
            temb = self.time_text_embed(t, env["guidance"].to(dtype) * 1000, pooled)
        else:
            temb = self.time_text_embed(t, pooled)
        rope = self.rope(torch.cat((_ids(env["txt_ids"]), _ids(env["img_ids"])), dim=0))
        return temb, rope


class DitStage(Stage):
    """A stage on the token streams: ``forward(image, text, cond, raw_text) -> outputs``."""

    reads_text = False  # whether it continues the text-token stream

    def __init__(self, name: str, writes_text: bool = True):
        super().__init__(name)
        self.text_prev: str | None = None  # the text-token tensor it reads; set by the builder
        self.writes = [name, name + TEXT_SUFFIX] if writes_text else [name]

    def reads(self) -> list[tuple[str, str]]:
        if self.prev == "sample":
            return super().reads()
        text = [(self.text_prev, "text_tokens")] if self.text_prev is not None else []
        return [(self.prev, "image_tokens"), *text]

    def inputs(self, env, temb, text) -> tuple:
        txt = env[self.text_prev] if self.text_prev is not None else None
        return env[self.prev], txt, temb, text


class Embed(DitStage):
    needs_text = True

    def __init__(self, model: nn.Module, kind: str):
        super().__init__("embed")
        self.grid = kind == "sd3"
        self.patch = model.pos_embed if self.grid else model.x_embedder
        self.context_embedder = model.context_embedder

    def forward(self, sample, txt, cond, text):
        h = self.patch(sample).contiguous()
        if self.grid:
            p = self.patch.patch_size
            h = h.reshape(h.shape[0], sample.shape[-2] // p, sample.shape[-1] // p, h.shape[-1])
        return h, self.context_embedder(text)


class Block(DitStage):
    """A joint or single-stream block; SD3 grids are flattened around the call."""

    needs_temb = True
    reads_text = True

    def __init__(self, name: str, block: nn.Module, rope: bool):
        super().__init__(name, writes_text=not getattr(block, "context_pre_only", False))
        self.block = block
        self.rope = rope

    def forward(self, h, txt, cond, text):
        temb, rotary = cond
        grid = h.shape if h.dim() == 4 else None
        if grid is not None:
            h = h.reshape(grid[0], grid[1] * grid[2], grid[3])
        kw = {"image_rotary_emb": rotary} if self.rope else {}
        txt, h = self.block(hidden_states=h, encoder_hidden_states=txt, temb=temb, **kw)
        if grid is not None:
            h = h.reshape(grid)
        return (h, txt) if len(self.writes) == 2 else h


class Output(DitStage):
    needs_temb = True

    def __init__(self, model: nn.Module, kind: str):
        super().__init__("proj_out", writes_text=False)
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.patch = model.config.patch_size if kind == "sd3" else None
        self.out_channels = model.out_channels

    def forward(self, h, txt, cond, text):
        grid = h.shape if h.dim() == 4 else None
        if grid is not None:
            h = h.reshape(grid[0], grid[1] * grid[2], grid[3])
        out = self.proj_out(self.norm_out(h, cond[0]))
        if grid is None:
            return out  # FLUX: packed tokens, as the transformer returns them
        p, c = self.patch, self.out_channels
        out = out.reshape(grid[0], grid[1], grid[2], p, p, c)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return out.reshape(grid[0], c, grid[1] * p, grid[2] * p)


def build_dit_graph(model: nn.Module, kind: str) -> StageGraph:
    """Decompose an SD3 or FLUX transformer into stages sharing (not copying) its modules."""
    check_dit_supported(model, kind)
    flux = kind == "flux"
    stages: list[DitStage] = [Embed(model, kind)]
    stages += [Block(f"joint{j}", b, flux) for j, b in enumerate(model.transformer_blocks)]
    if flux:
        stages += [Block(f"single{j}", b, True) for j, b in enumerate(model.single_transformer_blocks)]
    stages.append(Output(model, kind))
    for before, stage in zip(stages, stages[1:]):
        stage.prev = before.name
        if stage.reads_text and len(before.writes) == 2:
            stage.text_prev = before.writes[1]
    return StageGraph(stages, DitConditioning(model, kind), dict(model.config))


def check_dit_supported(model: nn.Module, kind: str) -> None:
    """Reject what the stage graph does not reproduce, naming it."""
    for attr in ("encoder_hid_proj", "image_proj"):  # IP-adapter projections, loaded later
        if getattr(model, attr, None) is not None:
            raise ValueError(f"{type(model).__name__} with {attr} (an IP-adapter) is not supported")
    if kind == "flux":
        rope, head = list(model.config.axes_dims_rope), model.config.attention_head_dim
        if sum(rope) != head:
            raise ValueError(f"FLUX config axes_dims_rope={rope} must sum to "
                             f"attention_head_dim={head}")


def check_dit_sample_size(config: dict, kind: str, height: int, width: int) -> None:
    """SD3: sides a multiple of patch_size, at most pos_embed_max_size patches; FLUX: even
    sides (2x2 latent packing)."""
    if kind == "flux":
        factor, limit = 2, None
    else:
        factor = config["patch_size"]
        limit = config.get("pos_embed_max_size")
    for name, side in (("height", height), ("width", width)):
        if side < factor or side % factor:
            raise ValueError(f"latent {name}={side} must be a positive multiple of {factor} "
                             f"for this {kind.upper()} transformer")
        if limit is not None and side // factor > limit:
            raise ValueError(f"latent {name}={side} is over {limit * factor}: "
                             f"pos_embed_max_size={limit} patches of {factor}")
