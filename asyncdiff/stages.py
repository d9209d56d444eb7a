"""A denoiser as an ordered list of stages: the stage loop, and the UNet's stages.

``build_stage_graph`` takes a diffusers ``UNet2DConditionModel`` (stages below)
or an SD3 / FLUX transformer (stages in ``asyncdiff.dit``).  The UNet has an
explicit skip stack.

Stage names (they are also the names of the tensors the stages produce)::

    conv_in                      pushes skip
    down{b}_{j}                  resnet j (+ attention j) of down block b; pushes skip
    down{b}_ds                   downsampler of down block b; pushes skip
    mid                          the whole mid block
    up{b}_{j}                    pops one skip, concatenates, resnet j (+ attention j)
    up{b}_us                     upsampler of up block b
    conv_out                     conv_norm_out + act + conv_out: the noise prediction

The skip stack is LIFO exactly as in diffusers: ``up{b}_{j}`` pops the most
recent unpopped push.  ``Stage.skip`` names the stage whose output it pops, so
every skip connection of the UNet is visible in ``StageGraph.skips()``;
``Stage.prev`` names the tensor it continues from (``sample`` for ``conv_in``).
With both inputs named (``Stage.reads``), ``run_stages`` -- the one stage
loop, used by the graph, the components, the profiler and export -- reads every
input from and writes every output (``Stage.writes``) to one dict of named
tensors.

The time embedding (timestep projection, MLP and SDXL's ``text_time`` added
conditioning) is not a stage: it is small, so every component recomputes it
from ``timestep`` (+ ``text_embeds``, ``time_ids``) rather than receiving it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asyncdiff.configs import denoiser_kind

SUPPORTED_DOWN = {"DownBlock2D", "CrossAttnDownBlock2D"}
SUPPORTED_UP = {"UpBlock2D", "CrossAttnUpBlock2D"}
SUPPORTED_MID = {"UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None}


class TimeEmbedding(nn.Module):
    """The UNet's time embedding, including SDXL's text_time added conditioning."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.text_time = unet.config.addition_embed_type == "text_time"
        if self.text_time:
            self.add_time_proj = unet.add_time_proj
            self.add_embedding = unet.add_embedding
        self.act = unet.time_embed_act

    @property
    def inputs(self) -> list[tuple[str, str]]:
        """(name, role) of the pipeline inputs it is computed from."""
        extra = [("text_embeds", "text_embeds"), ("time_ids", "time_ids")] if self.text_time else []
        return [("timestep", "timestep"), *extra]

    def embed(self, env: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self(env["timestep"], dtype, env.get("text_embeds"), env.get("time_ids"))

    def forward(self, timestep, dtype, text_embeds=None, time_ids=None):
        emb = self.time_embedding(self.time_proj(timestep).to(dtype))
        if self.text_time:
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            added = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(added)
        return self.act(emb) if self.act is not None else emb


class Stage(nn.Module):
    """One stage: ``forward(hidden, skip, temb, text) -> hidden`` (UNet), or the token streams
    of a DiT (``asyncdiff.dit``); it writes one tensor per name in ``writes``."""

    needs_temb = False
    needs_text = False

    def __init__(self, name: str, skip: str | None = None, pushes: bool = False):
        super().__init__()
        self.name = name
        self.skip = skip  # name of the stage whose output this one pops
        self.pushes = pushes
        self.prev = "sample"  # tensor this stage continues from; set by build_stage_graph
        self.writes = [name]  # the tensors it produces, its main output first

    def reads(self) -> list[tuple[str, str]]:
        """(tensor, role) of each activation it reads: what crosses a cut into it."""
        if self.prev == "sample":
            return [("sample", "latent")]
        return [(self.prev, "hidden")] + ([(self.skip, "skip")] if self.skip else [])

    def inputs(self, env: dict[str, torch.Tensor], temb, text) -> tuple:
        """The call's arguments, read from ``env`` by name."""
        return env[self.prev], env[self.skip] if self.skip else None, temb, text


# on_stage(stage, args) -> output: runs (or times, or counts) one stage call.
StageHook = Callable[[Stage, tuple], torch.Tensor]


class ConvIn(Stage):
    def __init__(self, unet):
        super().__init__("conv_in", pushes=True)
        self.conv = unet.conv_in
        self.center = bool(unet.config.center_input_sample)

    def forward(self, h, skip, temb, text):
        return self.conv(2 * h - 1.0 if self.center else h)


class ResnetAttention(Stage):
    """resnet (+ cross-attention transformer); up-path stages first concatenate a skip."""

    needs_temb = True

    def __init__(self, name, resnet, attention=None, skip=None, pushes=False):
        super().__init__(name, skip=skip, pushes=pushes)
        self.resnet = resnet
        self.attention = attention
        self.needs_text = attention is not None

    def forward(self, h, skip, temb, text):
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.resnet(h, temb)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states=text, return_dict=False)[0]
        return h


class Resample(Stage):
    """A downsampler (pushes a skip) or an upsampler (plain 2x, see ``check_sample_size``)."""

    def __init__(self, name, module, pushes):
        super().__init__(name, pushes=pushes)
        self.module = module

    def forward(self, h, skip, temb, text):
        return self.module(h)


class Mid(Stage):
    needs_temb = True

    def __init__(self, mid_block):
        super().__init__("mid")
        self.block = mid_block
        self.needs_text = bool(getattr(mid_block, "has_cross_attention", False))

    def forward(self, h, skip, temb, text):
        if self.needs_text:
            return self.block(h, temb, encoder_hidden_states=text)
        return self.block(h, temb)


class ConvOut(Stage):
    def __init__(self, unet):
        super().__init__("conv_out")
        self.norm = unet.conv_norm_out
        self.act = unet.conv_act
        self.conv = unet.conv_out

    def forward(self, h, skip, temb, text):
        if self.norm is not None:
            h = self.act(self.norm(h))
        return self.conv(h)


@dataclass
class StageGraph:
    """The denoiser as stages in execution order plus the shared time embedding (for a DiT:
    ``asyncdiff.dit.DitConditioning``)."""

    stages: list[Stage]
    time_embedding: nn.Module  # .inputs, .embed(env, dtype)
    config: dict

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def skips(self) -> dict[str, str]:
        """consumer stage -> producer stage, for every skip connection."""
        return {s.name: s.skip for s in self.stages if s.skip is not None}

    @property
    def text_time(self) -> bool:
        return getattr(self.time_embedding, "text_time", False)

    @property
    def kind(self) -> str:
        return denoiser_kind(self.config)

    @property
    def tensors(self) -> list[str]:
        """Every tensor the stages write, in order."""
        return [n for s in self.stages for n in s.writes]

    def run(self, env: dict[str, torch.Tensor], stages: Sequence[str] | None = None,
            on_stage: StageHook | None = None) -> dict[str, torch.Tensor]:
        """``run_stages`` on the named ``stages`` (default: all); ``env`` gains their outputs."""
        chosen = self.stages if stages is None else [self.stages[self.index(n)] for n in stages]
        return run_stages(chosen, self.time_embedding, env, on_stage)

    def forward(self, sample, timestep, encoder_hidden_states, **conditioning):
        """Run every stage in order: equals ``unet(...).sample`` / ``transformer(...).sample``.
        ``conditioning``: text_embeds, time_ids (SDXL); pooled_projections, guidance, img_ids,
        txt_ids (DiT)."""
        env = {"sample": sample, "timestep": expand_timestep(timestep, sample),
               "encoder_hidden_states": encoder_hidden_states}
        env.update({name: conditioning[name] for name, _ in self.time_embedding.inputs
                    if name != "timestep"})
        return self.run(env)[self.stages[-1].name]


def run_stages(stages: Sequence[Stage], time_embedding: nn.Module | None,
               env: dict[str, torch.Tensor], on_stage: StageHook | None = None,
               ) -> dict[str, torch.Tensor]:
    """The stage loop: run ``stages`` in order, each reading its inputs from ``env`` by name
    (``Stage.prev``, ``Stage.skip``, ``timestep``, ``encoder_hidden_states``, ...) and writing
    its outputs to ``env`` under ``stage.writes``; returns ``env``.

    The time embedding is computed once, in the dtype of the first stage's hidden input, when
    a stage needs it. ``on_stage`` replaces the plain call ``stage(*args)``. No branch depends
    on tensor values, so the loop traces into ONNX as it is.
    """
    temb = None
    if time_embedding is not None and any(s.needs_temb for s in stages):
        temb = time_embedding.embed(env, env[stages[0].prev].dtype)
    text = env.get("encoder_hidden_states")
    for stage in stages:
        args = stage.inputs(env, temb, text)
        out = on_stage(stage, args) if on_stage is not None else stage(*args)
        if len(stage.writes) == 1:
            env[stage.name] = out
        else:
            env.update(zip(stage.writes, out, strict=True))
    return env


def expand_timestep(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A per-sample float timestep vector, as components take it (batchable across requests)."""
    t = torch.as_tensor(timestep, device=sample.device)
    return t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)


def build_stage_graph(unet: nn.Module) -> StageGraph:
    """Decompose a UNet, SD3 or FLUX transformer into stages sharing (not copying) its modules."""
    kind = denoiser_kind(unet.config)
    if kind != "unet":
        from asyncdiff.dit import build_dit_graph

        return build_dit_graph(unet, kind)
    check_supported(unet)
    stages: list[Stage] = [ConvIn(unet)]
    stack = ["conv_in"]
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            attn = attentions[j] if attentions is not None else None
            stages.append(ResnetAttention(f"down{b}_{j}", resnet, attn, pushes=True))
            stack.append(stages[-1].name)
        if block.downsamplers is not None:
            stages.append(Resample(f"down{b}_ds", block.downsamplers[0], pushes=True))
            stack.append(stages[-1].name)
    if unet.mid_block is not None:
        stages.append(Mid(unet.mid_block))
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            attn = attentions[j] if attentions is not None else None
            stages.append(ResnetAttention(f"up{b}_{j}", resnet, attn, skip=stack.pop()))
        if block.upsamplers is not None:
            stages.append(Resample(f"up{b}_us", block.upsamplers[0], pushes=False))
    stages.append(ConvOut(unet))
    assert not stack, f"unpopped skips {stack}"
    for before, stage in zip(stages, stages[1:]):
        stage.prev = before.name
    return StageGraph(stages, TimeEmbedding(unet), dict(unet.config))


def check_supported(unet: nn.Module) -> None:
    """Reject UNet features the stage graph does not reproduce, naming the config field."""
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
        "num_class_embeds": cfg.num_class_embeds,
    }
    for key, value in unsupported.items():
        if value is not None:
            raise ValueError(f"UNet config {key}={value!r} is not supported (must be None)")
    if cfg.addition_embed_type not in (None, "text_time"):
        raise ValueError(
            f"UNet config addition_embed_type={cfg.addition_embed_type!r} is not supported "
            "(allowed: None, 'text_time')"
        )
    for kind, types, allowed in (
        ("down_block_types", cfg.down_block_types, SUPPORTED_DOWN),
        ("up_block_types", cfg.up_block_types, SUPPORTED_UP),
        ("mid_block_type", [cfg.mid_block_type], SUPPORTED_MID),
    ):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"UNet config {kind} contains {bad}; supported: {sorted(map(str, allowed))}")


def check_sample_size(unet_config: dict, height: int, width: int) -> None:
    """Latent sides must divide by 2**downsamplers: upsamplers then double exactly (DiTs:
    ``asyncdiff.dit.check_dit_sample_size``)."""
    kind = denoiser_kind(unet_config)
    if kind != "unet":
        from asyncdiff.dit import check_dit_sample_size

        return check_dit_sample_size(unet_config, kind, height, width)
    factor = 2 ** (len(unet_config["down_block_types"]) - 1)
    for name, side in (("height", height), ("width", width)):
        if side < factor or side % factor:
            raise ValueError(
                f"latent {name}={side} must be a positive multiple of {factor} for this UNet"
            )
