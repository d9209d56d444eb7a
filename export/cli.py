"""``python -m export``: a diffusers checkpoint -> per-component ONNX/TensorRT + a Triton repository.

See docs/export.md for the flags, the files written and what is verified where.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asyncdiff.conditioning import (
    FLUX, FLUX_T5_TOKENS, LAST_HIDDEN, PENULTIMATE, POOLED, SD, SD3, SDXL, T5_TOKENS, TEXT_STATES,
    check_added_embedding, conditioning_kind, denoiser_conditioning,
)
from asyncdiff.contract import (
    INPUTS, SCHEDULERS, TEXT_ENCODER, TEXT_ENCODER_3, VAE_DECODER, VAE_ENCODER, NetworkNames,
    PipelineParams, Request, add_request_arguments,
)
from asyncdiff.contract import MAX_SIDE, SIZE_MULTIPLE, format_size, parse_size
from asyncdiff.stages import check_sample_size
from asyncdiff.partition import ACTIVATION_ROLES
from asyncdiff.placement import Placement
from export import repository as repo_mod
from export import tensorrt as trt_mod
from export.lora import LoraSpec, check_loras, fuse_into
from export.onnx_export import (
    Artifact, InterfaceSampler, Network, ParityError, component_network, export_network,
    save_torch_component, text_encoder_network, vae_decoder_network, vae_encoder_network,
)
from serve import deployment

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
BUILD_SCRIPT = "build_engines.sh"
EXIT_PARITY, EXIT_NO_TENSORRT = 3, 4
PARAM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PipelineParams)}


@dataclass
class ExportOptions:
    model: str = "tiny"
    components: int = 2
    stride: int = 1
    backend: str = "onnxruntime"  # tensorrt | onnxruntime | torch
    out: Path = Path("model_repository")
    height: int | None = None  # image pixels; default: the UNet's sample_size * VAE scale
    width: int | None = None
    # --resolutions: every served (width, height) in pixels, the default first (then no
    # height/width); one partition at the default, dynamic spatial dims for the rest.
    resolutions: tuple[tuple[int, int], ...] = ()
    batch: int = 2  # UNet batch at export (2 = one prompt with classifier-free guidance)
    max_batch: int | None = None  # dynamic batching / engine profile limit; default 4 * batch
    fp16: bool = False
    gpus: list[int] | None = None  # default: CPU instances; tensorrt: GPUs 0..world_size-1
    batched_stride: bool = False
    cuts: list[str] | None = None  # stage names where components 1..N-1 start; default: balanced
    cost: str = "flops"
    build_engines: bool = False
    overwrite: bool = False
    validate: bool = True
    progress: bool = True
    defaults: Request = field(default_factory=Request)  # what the server applies to omitted inputs
    component_timeout_s: float = PARAM_DEFAULTS["component_timeout_s"]
    max_queue_size: int = 16  # requests waiting beyond those in flight; more get "server busy"
    layout: str = "sequential"  # or "outer_ring" (the paper's SDXL split)
    # Request defaults to take from the pipeline folder (its scheduler, its family's guidance)
    # instead of ``defaults``: the CLI lists those the user did not give.
    folder_defaults: frozenset[str] = frozenset()
    loras: tuple[LoraSpec, ...] = ()  # --lora: fused into the UNet and text encoders

    @property
    def limit(self) -> int:
        return self.max_batch or 4 * self.batch

    @property
    def max_batch_requests(self) -> int:
        """Requests that fit one batched component call: rows per request are ``batch``,
        twice that for the last component's merged stride pair."""
        return max(1, self.limit // (self.batch * (2 if self.batched_stride else 1)))


@dataclass
class Source:
    """What was loaded: always the denoiser (a UNet, or an SD3/FLUX transformer, kept in
    ``unet``); the rest only from a diffusers pipeline folder (FLUX: ``text_encoder`` is CLIP,
    pooled output only, and ``text_encoder_2`` is T5, as the folder names them)."""

    name: str
    unet: torch.nn.Module
    vae_scale: int
    text_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    scheduler_config: Path | None = None
    tokenizer_dir: Path | None = None
    # SDXL, SD3: the second text encoder (with projection) and its tokenizer; FLUX: T5
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2_dir: Path | None = None
    force_zeros_for_empty_prompt: bool = False
    scheduler_class: str | None = None  # the folder's scheduler _class_name
    safety_checker: bool = False  # the folder has one (it is not served)
    pipeline_class: str | None = None  # a DiT pipeline folder's model_index _class_name
    # SD3: T5 (text_encoder_3) and its tokenizer, when the folder has them
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3_dir: Path | None = None

    @property
    def full_pipeline(self) -> bool:
        return None not in (self.text_encoder, self.vae, self.scheduler_config, self.tokenizer_dir)

    @property
    def denoiser(self) -> str:
        """``unet``, ``sd3`` or ``flux``."""
        from asyncdiff.configs import denoiser_kind

        return denoiser_kind(self.unet.config)


@dataclass
class ExportResult:
    options: ExportOptions
    partition: object
    artifacts: list[Artifact]
    engines: list[Path]
    build_commands: list[str]
    notes: list[str]
    seconds: float
    denoiser: str = "unet"  # or sd3 | flux


def load_source(model: str) -> Source:
    from asyncdiff.configs import load_unet, resolve

    src = resolve(model)
    unet = load_unet(src, device="cpu")
    source = Source(model, unet, src.vae_scale)
    folder = Path(src.name)  # resolve() maps "tiny" to its folder
    index = folder / "model_index.json"
    dit = source.denoiser != "unet"
    if src.unet_dir is None or src.unet_dir != folder / ("transformer" if dit else "unet") \
            or not index.is_file():
        return source  # a built-in or a denoiser folder (even inside a pipeline): components only
    if dit:
        source.pipeline_class = json.loads(index.read_text()).get("_class_name")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "text_encoder").is_dir():  # SD3's CLIP-L has a projection (pooled output)
        cls = CLIPTextModelWithProjection if source.denoiser == "sd3" else CLIPTextModel
        source.text_encoder = cls.from_pretrained(folder / "text_encoder").eval()
    if (folder / "vae").is_dir():
        source.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        source.scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if (folder / "tokenizer").is_dir():
        source.tokenizer_dir = folder / "tokenizer"
    _load_sdxl_parts(source, folder)
    if dit and (folder / "text_encoder_3").is_dir() and (folder / "tokenizer_3").is_dir():
        from transformers import T5EncoderModel

        source.text_encoder_3 = T5EncoderModel.from_pretrained(folder / "text_encoder_3").eval()
        source.tokenizer_3_dir = folder / "tokenizer_3"
    return source


def _load_sdxl_parts(source: Source, folder: Path) -> None:
    """What an SDXL, SD3 or FLUX folder adds (text_encoder_2, tokenizer_2,
    force_zeros_for_empty_prompt), the folder's scheduler class and whether it has a safety
    checker."""
    index = json.loads((folder / "model_index.json").read_text())
    if (folder / "text_encoder_2").is_dir():
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        cls = T5EncoderModel if source.denoiser == FLUX else CLIPTextModelWithProjection
        source.text_encoder_2 = cls.from_pretrained(folder / "text_encoder_2").eval()
    if (folder / "tokenizer_2").is_dir():
        source.tokenizer_2_dir = folder / "tokenizer_2"
    source.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))
    if source.scheduler_config is not None:
        source.scheduler_class = json.loads(source.scheduler_config.read_text()).get("_class_name")
    checker = index.get("safety_checker")
    source.safety_checker = (folder / "safety_checker").is_dir() or (
        isinstance(checker, list) and None not in checker)


# -- what the pipeline folder decides (SD or SDXL) ----------------------------------------

FOLDER_DEFAULTS = ("scheduler", "guidance_scale")
# diffusers scheduler class -> the contract's SCHEDULER name that builds it from the same config
SCHEDULER_NAMES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                   "DPMSolverMultistepScheduler": "dpmsolver++",
                   "FlowMatchEulerDiscreteScheduler": "flowmatch-euler"}
FAMILY_GUIDANCE = {SD: 7.5, SDXL: 5.0, SD3: 7.0, FLUX: 3.5}  # diffusers' pipeline defaults


def folder_defaults(opts: ExportOptions, source: Source, part, notes: list[str]) -> Request:
    """``opts.defaults`` with the fields in ``opts.folder_defaults`` taken from the folder: its
    scheduler class (served with its own config) and its family's guidance. Notes say what was
    chosen and what the folder holds that is not served."""
    from asyncdiff.configs import resolve
    from asyncdiff.tiny import MODEL_DIR

    kind, defaults, chosen = conditioning_kind(part), opts.defaults, []
    if "scheduler" in opts.folder_defaults and source.scheduler_class:
        name = SCHEDULER_NAMES.get(source.scheduler_class)
        if source.scheduler_class == "DPMSolverMultistepScheduler" and _algorithm(source) not in (
                None, "dpmsolver++"):
            name = None
        if name is None:
            chosen.append(f"scheduler {defaults.scheduler} (the folder's {source.scheduler_class} "
                          f"is not one of the served schedulers {list(SCHEDULERS)})")
        else:
            defaults = dataclasses.replace(defaults, scheduler=name)
            chosen.append(f"scheduler {name} (the folder's {source.scheduler_class}, its config)")
    if "guidance_scale" in opts.folder_defaults:
        if Path(resolve(opts.model).name).resolve() == Path(MODEL_DIR).resolve():
            chosen.append(f"guidance {defaults.guidance_scale:g} (the tiny model's, as trained)")
        else:
            defaults = dataclasses.replace(defaults, guidance_scale=FAMILY_GUIDANCE[kind])
            chosen.append(f"guidance {FAMILY_GUIDANCE[kind]:g} ({kind.upper()} pipelines' default)")
    if chosen:
        notes.append("served defaults from the folder: " + "; ".join(chosen))
    if source.safety_checker:
        notes.append("the folder has a safety_checker: it is not served (images are returned "
                     "unchecked)")
    return defaults


def _algorithm(source: Source) -> str | None:
    return json.loads(source.scheduler_config.read_text()).get("algorithm_type")


def text_encoder_networks(source: Source, part) -> list[Network]:
    """SD: text_encoder -> last_hidden_state. SDXL: text_encoder -> penultimate hidden states,
    text_encoder_2 -> penultimate hidden states and the projected pooled ``text_embeds``.
    SD3: both CLIPs -> penultimate hidden states and ``text_embeds``; text_encoder_3 (T5, when
    the folder has it) -> last_hidden_state at 256 tokens. FLUX: text_encoder (CLIP) -> its
    pooled output ``text_embeds``; text_encoder_2 (T5) -> last_hidden_state at the
    transformer's text tokens (512)."""
    kind = conditioning_kind(part)
    if kind == SD:
        return [text_encoder_network(source.text_encoder)]
    if kind == FLUX:
        tokens = check_flux_encoders(source, part)
        return [text_encoder_network(source.text_encoder, pooled_only=True),
                text_encoder_network(source.text_encoder_2, name="text_encoder_2", tokens=tokens)]
    if source.text_encoder_2 is None or source.tokenizer_2_dir is None:
        raise ValueError(f"{source.name}: the {'transformer' if kind == SD3 else 'UNet'} takes "
                         f"{kind.upper()}'s pooled text embedding but the folder has no "
                         "text_encoder_2/ and tokenizer_2/")
    if kind == SD3:
        check_sd3_encoders(source)
    else:
        check_added_embedding(source.unet.config, int(source.text_encoder_2.config.projection_dim))
    networks = [text_encoder_network(source.text_encoder, penultimate=True),
                text_encoder_network(source.text_encoder_2, name="text_encoder_2", penultimate=True)]
    if kind == SD3 and source.text_encoder_3 is not None:
        networks.append(text_encoder_network(source.text_encoder_3, name=TEXT_ENCODER_3.model,
                                             tokens=T5_TOKENS))
    return networks


def check_sd3_encoders(source: Source) -> None:
    """The widths ``StableDiffusion3Pipeline`` relies on: both CLIPs projected, their pooled
    outputs making pooled_projection_dim, their states no wider than joint_attention_dim
    (they are zero-padded to it), T5's d_model equal to it."""
    config = dict(source.unet.config)
    clips = (source.text_encoder, source.text_encoder_2)
    for name, enc in zip(("text_encoder", "text_encoder_2"), clips):
        if not hasattr(enc, "text_projection"):
            raise ValueError(f"{source.name}: SD3's {name} must be a CLIPTextModelWithProjection "
                             "(its pooled output is half of pooled_projections)")
    pooled = sum(int(e.config.projection_dim) for e in clips)
    width = sum(int(e.config.hidden_size) for e in clips)
    joint = int(config["joint_attention_dim"])
    t5 = source.text_encoder_3
    if pooled != config["pooled_projection_dim"]:
        raise ValueError(f"{source.name}: the CLIPs' projection_dim add up to {pooled}, the "
                         f"transformer's pooled_projection_dim is {config['pooled_projection_dim']}")
    if width > joint:
        raise ValueError(f"{source.name}: the CLIPs' hidden_size add up to {width}, wider than "
                         f"the transformer's joint_attention_dim {joint}")
    if t5 is not None and int(t5.config.d_model) != joint:
        raise ValueError(f"{source.name}: text_encoder_3's d_model {t5.config.d_model} is not the "
                         f"transformer's joint_attention_dim {joint}")


def check_flux_encoders(source: Source, part) -> int:
    """The widths ``FluxPipeline`` relies on: CLIP's pooled output is pooled_projection_dim
    wide, T5's states joint_attention_dim; returns the T5 tokens the components take."""
    config = dict(source.unet.config)
    if source.text_encoder_2 is None or source.tokenizer_2_dir is None:
        raise ValueError(f"{source.name}: FLUX takes T5's states but the folder has no "
                         "text_encoder_2/ and tokenizer_2/")
    clip, t5 = int(source.text_encoder.config.hidden_size), int(source.text_encoder_2.config.d_model)
    if clip != config["pooled_projection_dim"]:
        raise ValueError(f"{source.name}: text_encoder's hidden_size {clip} (its pooled output) is "
                         f"not the transformer's pooled_projection_dim "
                         f"{config['pooled_projection_dim']}")
    if t5 != config["joint_attention_dim"]:
        raise ValueError(f"{source.name}: text_encoder_2's d_model {t5} is not the transformer's "
                         f"joint_attention_dim {config['joint_attention_dim']}")
    return next(t.shape[1] for t in denoiser_conditioning(part) if t.name == TEXT_STATES)


def conditioning_params(source: Source, part) -> dict:
    """The ``PipelineParams`` fields of the conditioning the BLS builds."""
    kind = conditioning_kind(part)
    if kind == SD:
        return {}
    if kind == FLUX:  # CLIP's pooled output, T5's last hidden state
        return dict(conditioning=FLUX,
                    text_encoder=NetworkNames(TEXT_ENCODER.model, TEXT_ENCODER.input, POOLED),
                    text_encoder_2=NetworkNames("text_encoder_2", TEXT_ENCODER.input, LAST_HIDDEN))
    clips = dict(text_encoder=NetworkNames(TEXT_ENCODER.model, TEXT_ENCODER.input, PENULTIMATE),
                 text_encoder_2=NetworkNames("text_encoder_2", TEXT_ENCODER.input, PENULTIMATE),
                 text_encoder_2_pooled=POOLED)
    if kind == SD3:
        return dict(conditioning=SD3, **clips, text_encoder_pooled=POOLED,
                    t5=source.text_encoder_3 is not None)
    return dict(conditioning=SDXL, **clips,
                force_zeros_for_empty_prompt=source.force_zeros_for_empty_prompt)


def more_tokenizer_files(source: Source, params: PipelineParams) -> dict[str, Path]:
    """SDXL, SD3 and FLUX: the second tokenizer's files (FLUX: T5's; SD3 with T5: the third's
    too), beside the first in the pipeline's version folder."""
    folders = {params.tokenizer_2_dir: source.tokenizer_2_dir} if params.conditioning != SD else {}
    if params.t5:
        folders[params.tokenizer_3_dir] = source.tokenizer_3_dir
    return {f"{name}/{p.relative_to(root)}": p for name, root in folders.items()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def latent_size(opts: ExportOptions, source: Source) -> tuple[int, int]:
    """The default size's latent (height, width)."""
    return latent_sizes(opts, source)[0]


def latent_sizes(opts: ExportOptions, source: Source) -> list[tuple[int, int]]:
    """Latent (height, width) of every exported resolution, the default first."""
    return [(h // source.vae_scale, w // source.vae_scale) for w, h in export_sizes(opts, source)]


def size_multiple(source: Source) -> int:
    """Pixels every side of a --resolutions size divides by: the VAE scale times the UNet's
    total downsampling (so every resolution level scales exactly; DiTs: their patch), and
    the request contract's SIZE_MULTIPLE (HEIGHT/WIDTH must be able to ask for it)."""
    from asyncdiff.stages import denoiser_kind

    config = source.unet.config
    kind = denoiser_kind(config)
    factor = (2 ** (len(config["block_out_channels"]) - 1) if kind == "unet"
              else 2 if kind == "flux" else int(config["patch_size"]))
    return math.lcm(source.vae_scale * factor, SIZE_MULTIPLE)


def export_sizes(opts: ExportOptions, source: Source) -> list[tuple[int, int]]:
    """Every exported (width, height) in pixels, the default first: ``--resolutions``, else
    the one size of --height/--width (default: the model's sample size)."""
    if not opts.resolutions:
        height, width = _single_latent_size(opts, source)
        return [(width * source.vae_scale, height * source.vae_scale)]
    if opts.height or opts.width:
        raise ValueError("give --resolutions or --height/--width, not both (the first of "
                         "--resolutions is the default size)")
    if len(set(opts.resolutions)) != len(opts.resolutions):
        raise ValueError(f"--resolutions lists a size twice: "
                         f"{','.join(format_size(*r) for r in opts.resolutions)}")
    if source.denoiser == FLUX and len(opts.resolutions) > 1:
        raise ValueError("--resolutions: a FLUX repository serves one size (its packed token "
                         "streams have a fixed length); export one repository per size")
    multiple = size_multiple(source)
    for width, height in opts.resolutions:
        if min(width, height) < multiple or width % multiple or height % multiple \
                or max(width, height) > MAX_SIDE:
            raise ValueError(
                f"--resolutions {format_size(width, height)}: width and height must be multiples "
                f"of {multiple} pixels in [{multiple}, {MAX_SIDE}] for this model (the VAE scale "
                f"{source.vae_scale} x the denoiser's downsampling, and the request contract's "
                f"{SIZE_MULTIPLE})")
        try:
            check_sample_size(source.unet.config, height // source.vae_scale,
                              width // source.vae_scale)
        except ValueError as e:
            raise ValueError(f"--resolutions {format_size(width, height)}: {e}") from None
    return list(opts.resolutions)


def _single_latent_size(opts: ExportOptions, source: Source) -> tuple[int, int]:
    from asyncdiff.configs import default_latent_size

    size = default_latent_size(source.unet.config)  # FLUX has no sample_size: 1024 px
    pixels = (opts.height or size * source.vae_scale, opts.width or size * source.vae_scale)
    for name, px in zip(("height", "width"), pixels):
        if px % source.vae_scale:
            raise ValueError(f"--{name} {px} must be a multiple of the VAE scale {source.vae_scale}")
    return pixels[0] // source.vae_scale, pixels[1] // source.vae_scale


def run_export(opts: ExportOptions) -> ExportResult:
    """Everything but the printing: returns what was written and checked. A failure
    removes what this run wrote in ``opts.out`` (and nothing else)."""
    start = time.perf_counter()
    _check_options(opts)
    place = placement(opts)  # bad --gpus fail here, before any export
    out = _prepare_out(Path(opts.out), opts.overwrite)
    try:
        return _export_into(opts, out, place, start)
    except BaseException:
        repo_mod.clear(out)  # a half-written repository would load, or block the next run
        raise


def _export_into(opts: ExportOptions, out: Path, place: Placement, start: float) -> ExportResult:
    from asyncdiff.components import build_components
    from asyncdiff.partition import partition_unet
    from asyncdiff.stages import build_stage_graph

    source = load_source(opts.model)
    fused_loras = fuse_into(source, opts.loras)  # before cutting: every model carries them
    h, w = latent_size(opts, source)
    sizes = latent_sizes(opts, source)  # every resolution's, the default (h, w) first
    part = partition_unet(source.unet, opts.components, model=opts.model, batch=opts.batch,
                          height=h, width=w, metric=opts.cost, stride=opts.stride,
                          batched_stride=opts.batched_stride, cuts=opts.cuts,
                          layout=opts.layout.replace("-", "_"))
    graph = build_stage_graph(source.unet)
    sampler = InterfaceSampler(graph, h, w)
    components = build_components(graph, part)
    networks = [component_network(c, sampler) for c in components]
    notes: list[str] = [f.note() for f in fused_loras]
    if source.denoiser != "unet":
        notes += dit_notes(opts, source)
    if source.full_pipeline:
        opts = dataclasses.replace(opts, defaults=folder_defaults(opts, source, part, notes))
        check_default_scheduler(opts.defaults, source)
        px = 2 ** (len(source.vae.config.block_out_channels) - 1)  # pixels per latent cell
        # img2img (a UNet's only): the encoder first, so the decoder's "image" dtype is the
        # one served_dtypes keeps.
        networks += [*text_encoder_networks(source, part),
                     *([vae_encoder_network(source.vae, h * px, w * px)] if img2img(source) else []),
                     vae_decoder_network(source.vae, h, w)]
    elif source.denoiser == "unet":
        notes.append(f"{opts.model!r} is not a diffusers pipeline folder: only the UNet components "
                     "are exported (no text_encoder, vae_decoder or asyncdiff pipeline model)")
    artifacts = _export_all(opts, out, networks, part, dict(source.unet.config), sizes)
    _write_configs(opts, out, artifacts, place)
    if source.full_pipeline:
        _write_pipeline(opts, out, _served_partition(part, artifacts), source, h, w, artifacts,
                        place)
    deployment.write(out, place.gpus, part.cross_bytes(interface_bytes(part, artifacts)),
                     opts.batch, opts.limit, export_sizes(opts, source))
    engines, commands = _engines(opts, out, artifacts, notes)
    return ExportResult(opts, part, artifacts, engines, commands, notes, time.perf_counter() - start,
                        source.denoiser)


def img2img(source: Source) -> bool:
    """Whether the VAE encoder is served (INIT_IMAGE): UNet pipelines only; SD3's img2img
    (flow matching noises with ``scale_noise``) is not served."""
    return source.denoiser == "unet"


def check_default_scheduler(defaults: Request, source: Source) -> None:
    """The served default SCHEDULER must fit the folder's scheduler (flowmatch-euler for SD3
    and FLUX, the others for a UNet); a flow-matching config with dynamic shifting is served
    for FLUX only."""
    from asyncdiff.generation import check_scheduler_fits

    config = json.loads(Path(source.scheduler_config).read_text())
    try:  # FLUX passes mu (the dynamic shift) to the scheduler
        check_scheduler_fits(defaults.scheduler, config, dynamic_shift=source.denoiser == FLUX)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"pipeline default: {e}") from None


def dit_notes(opts: ExportOptions, source: Source) -> list[str]:
    """What a DiT repository holds, and lacks: an SD3 or FLUX pipeline folder is served whole
    (text-to-image); a transformer without its pipeline, as components only."""
    from asyncdiff.configs import default_batch

    what = (f"a {source.pipeline_class} folder" if source.pipeline_class
            else f"{source.denoiser.upper()} transformer {opts.model!r}")
    not_served = ("prompts over a tokenizer's limit are refused, not truncated; one served "
                  "size per FLUX repository (its token streams do not rescale)"
                  if source.denoiser == FLUX else
                  "prompts over a tokenizer's limit are refused, not truncated")
    if source.full_pipeline and source.denoiser == FLUX:
        guidance = ("GUIDANCE_SCALE goes to the transformer's guidance embedding (dev)"
                    if source.unet.config.get("guidance_embeds") else
                    "no guidance embedding (schnell-like: GUIDANCE_SCALE is ignored, as diffusers "
                    "does)")
        notes = [f"{what}: served text-to-image through the asyncdiff BLS: the FLUX transformer's "
                 "components (one row per image, packed 2x2 latents, dynamic shift from the "
                 f"image size), text_encoder (CLIP: pooled output), text_encoder_2 (T5, "
                 f"{FLUX_T5_TOKENS} tokens), vae_decoder (latents / "
                 f"scaling_factor + shift_factor); {guidance}; SCHEDULER flowmatch-euler only. "
                 "Not served: FLUX img2img (no vae_encoder, no INIT_IMAGE), true CFG "
                 "(NEGATIVE_PROMPT is refused), a separate T5 prompt (prompt_2); " + not_served]
    elif source.full_pipeline:
        t5 = ("text_encoder_3 (T5, 256 tokens)" if source.text_encoder_3 is not None
              else "no T5 (the folder has none: its slot is zeros, as diffusers fills it)")
        notes = [f"{what}: served text-to-image through the asyncdiff BLS: the SD3 transformer's "
                 f"components, text_encoder / text_encoder_2 (CLIP-L/G: penultimate states + "
                 f"pooled), {t5}, vae_decoder (latents / scaling_factor + shift_factor); "
                 "SCHEDULER flowmatch-euler only. Not served: SD3 img2img (no vae_encoder, no "
                 "INIT_IMAGE), skip-layer guidance, a separate prompt per encoder; " + not_served]
    else:
        notes = [f"{what}: only the {source.denoiser.upper()} transformer's components are "
                 "exported (unet_part_<k>): no text encoders, no VAE and no asyncdiff BLS, so "
                 "this repository serves the components alone (a pipeline model is served for "
                 "an SD3 or FLUX pipeline folder with its text encoders, tokenizers, VAE and "
                 "scheduler)"]
    if default_batch(source.unet.config) == 1 and opts.batch != 1:
        notes.append("guidance_embeds: this transformer embeds the guidance scale, so one prompt "
                     f"is batch 1 (no CFG pair); exported and checked at --batch {opts.batch} "
                     "(the batch dim stays dynamic; --batch 1 to size for one prompt)")
    return notes


def interface_bytes(part, artifacts: list[Artifact]) -> int:
    """Bytes per element of the hidden/skip tensors as served: 2 when every UNet component
    is fp16, else 4 (an upper bound for mixed repositories)."""
    comps = {c.name for c in part.components}
    return 2 if all(a.fp16 for a in artifacts if a.name in comps) else 4


def _check_options(opts: ExportOptions) -> None:
    if opts.backend not in repo_mod.BACKENDS:
        raise ValueError(f"--backend must be one of {repo_mod.BACKENDS}, got {opts.backend!r}")
    if opts.batch < 1 or opts.limit < opts.batch:
        raise ValueError(f"need 1 <= --batch ({opts.batch}) <= --max-batch ({opts.limit})")
    if opts.build_engines and opts.backend != "tensorrt":
        raise ValueError("--build-engines only applies to --backend tensorrt")
    if opts.cuts is not None and opts.components != len(opts.cuts) + 1:
        raise ValueError(f"--components {opts.components} disagrees with --cuts "
                         f"{','.join(opts.cuts)} ({len(opts.cuts)} cuts = {len(opts.cuts) + 1} "
                         "components)")
    if not opts.component_timeout_s > 0:
        raise ValueError(f"--component-timeout-s must be > 0, got {opts.component_timeout_s}")
    if opts.max_queue_size < 0:
        raise ValueError(f"--max-queue-size must be >= 0, got {opts.max_queue_size}")
    check_loras(opts.loras, opts.model)  # missing paths, a model that is no pipeline folder
    try:  # the defaults must be a valid request once a prompt is given
        dataclasses.replace(opts.defaults, prompt=opts.defaults.prompt or "x").validate()
    except ValueError as e:
        raise ValueError(f"pipeline default: {e}") from None


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        repo_mod.clear(out)
    leftovers = repo_mod.our_models(out)
    if leftovers:
        raise FileExistsError(f"{out} already holds {[p.name for p in leftovers]}; pass --overwrite "
                              "to replace them (nothing else in the folder is touched)")
    return out


def placement(opts: ExportOptions) -> Placement:
    """``--gpus`` as given; tensorrt without ``--gpus``: GPUs 0..world_size-1; else the CPU."""
    gpus = opts.gpus
    if gpus is None and opts.backend == "tensorrt":
        gpus = range(Placement(opts.components, opts.stride, opts.batched_stride).world_size)
    return Placement.for_devices(opts.components, opts.stride, opts.batched_stride, gpus)


def _export_all(opts, out: Path, networks: list[Network], part, unet_config: dict,
                sizes: list[tuple[int, int]] = ()) -> list[Artifact]:
    """``sizes``: every resolution's latent (h, w), the default first (several: the networks
    with spatial dims get dynamic ones, validated at each size)."""
    from tqdm import tqdm

    artifacts = []
    bar = tqdm(networks, desc="export", unit="model", disable=not opts.progress, file=sys.stderr)
    for net in bar:
        bar.set_postfix_str(net.name)
        version = out / net.name / "1"
        if opts.backend == "torch" and net.name.startswith("unet_part_"):
            spec = part.components[int(net.name.rsplit("_", 1)[1])]
            artifacts.append(save_torch_component(net, unet_config, spec, version, opts.batch,
                                                  opts.fp16, opts.validate, sizes))
        else:
            artifacts.append(export_network(net, version / ONNX_FILE, _batch_of(opts, net.name),
                                            opts.fp16, opts.validate, sizes))
    return artifacts


def _batch_of(opts: ExportOptions, name: str) -> int:
    # The VAE decodes (and encodes) one image per prompt: half the CFG batch.
    return max(1, opts.batch // 2) if name in (VAE_DECODER.model, VAE_ENCODER.model) else opts.batch


def static_engines(opts) -> bool:
    """TensorRT with ``--max-batch`` = ``--batch`` and one resolution: one shape per engine,
    run with CUDA graphs."""
    return opts.backend == "tensorrt" and opts.limit == opts.batch and len(opts.resolutions) <= 1


def _max_batch_of(opts, name: str) -> int:
    return _batch_of(opts, name) if static_engines(opts) else opts.limit


def _write_configs(opts, out: Path, artifacts: list[Artifact], place: Placement) -> None:
    for art in artifacts:
        gpus, count = repo_mod.model_placement(art.name, place)
        config = repo_mod.network_config(art.name, art.inputs, art.outputs, opts.backend,
                                         art.runtime, art.path.name, _max_batch_of(opts, art.name),
                                         gpus, count, cuda_graphs=static_engines(opts),
                                         profiles=max(1, len(art.size_shapes)))
        repo_mod.write(out, config)


def _served_partition(part, artifacts: list[Artifact]):
    """The partition with the dtypes actually served (fp16 export changes them)."""
    served = copy.deepcopy(part)
    dtypes = {(a.name, s.name): str(s.dtype) for a in artifacts for s in [*a.inputs, *a.outputs]}
    for comp in served.components:
        for spec in [*comp.inputs, *comp.outputs]:
            spec.dtype = dtypes.get((comp.name, spec.name), spec.dtype)
    return served


def served_dtypes(part, artifacts: list[Artifact]) -> dict[str, str]:
    """Tensor name -> served dtype of every tensor the BLS sends or receives: the components'
    pipeline inputs (latent, timestep, conditioning), the noise prediction, the text encoders'
    and VAE's IO."""
    by_name = {a.name: a for a in artifacts}
    # Pipeline inputs (latent, timestep, conditioning) and noise_pred, wherever they sit: with
    # the outer ring the latent enters the last component.
    comps = [by_name[c.name] for c in part.components]
    produced = {s.name for a in comps for s in a.outputs}
    specs = [s for a in comps for s in a.inputs if s.name not in produced]
    specs += [s for a in comps for s in a.outputs if s.name == "noise_pred"]
    for art in artifacts:
        if not art.name.startswith("unet_part_"):
            specs += [*art.inputs, *art.outputs]
    return {s.name: str(s.dtype) for s in specs}


def _write_pipeline(opts, out: Path, part, source: Source, h: int, w: int,
                    artifacts: list[Artifact], place: Placement) -> None:
    resolutions = tuple(export_sizes(opts, source))
    width, height = resolutions[0]
    # [C, h, w] of one latent: FLUX's components take it packed (2x2 patches per token)
    channels = (int(source.vae.config.latent_channels) if source.denoiser == FLUX
                else source.unet.config.in_channels)
    params = PipelineParams(
        component_models=tuple(c.name for c in part.components),
        latent_shape=(channels, h, w), image_shape=(height, width, 3),
        vae_scaling_factor=float(source.vae.config.scaling_factor), defaults=opts.defaults,
        component_timeout_s=opts.component_timeout_s, device=place.device(place.pipeline_rank),
        dtypes=served_dtypes(part, artifacts), gpus=place.gpus,
        max_batch_requests=opts.max_batch_requests, max_queue_size=opts.max_queue_size,
        max_batch_sizes={a.name: _max_batch_of(opts, a.name) for a in artifacts},
        resolutions=resolutions)
    params = dataclasses.replace(params, **conditioning_params(source, part),
                                 img2img=img2img(source), vae_encoder=VAE_ENCODER,
                                 vae_shift_factor=float(source.vae.config.shift_factor or 0.0))
    files = repo_mod.pipeline_files(part, params, source.scheduler_config, source.tokenizer_dir)
    files.update(more_tokenizer_files(source, params))
    repo_mod.write_pipeline(out, params, files)


def _profile(opts, art: Artifact, onnx_path: Path) -> list[trt_mod.Profile]:
    """The engine's optimization profiles: one per resolution for a network with spatial dims
    exported at several (``Artifact.size_shapes``), else one."""
    opt = _batch_of(opts, art.name)
    return trt_mod.graph_profiles(onnx_path, opt if static_engines(opts) else 1, opt,
                                  _max_batch_of(opts, art.name), list(art.size_shapes.values()))


def _fp16(art: Artifact) -> bool:
    return trt_mod.is_fp16(s.dtype for s in [*art.inputs, *art.outputs])


def _engines(opts, out: Path, artifacts: list[Artifact], notes: list[str]):
    """Build engines where TensorRT is importable, else write the trtexec commands."""
    if opts.backend != "tensorrt":
        return [], []
    rel = [(Path(a.name) / "1" / ONNX_FILE, Path(a.name) / "1" / PLAN_FILE) for a in artifacts]
    commands = [trt_mod.trtexec_command(str(o), str(p), _profile(opts, a, out / o), _fp16(a))
                for a, (o, p) in zip(artifacts, rel)]
    script = out / BUILD_SCRIPT
    script.write_text("#!/usr/bin/env bash\n# Build the TensorRT engines of this repository "
                      "(GPU host with TensorRT 10).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                      + "\n".join(commands) + "\n")
    script.chmod(0o755)
    if not trt_mod.available():
        notes.append("TensorRT is not importable here: the ONNX files and tensorrt_plan configs are "
                     f"written, but no model.plan. Build the engines on a GPU host: bash {script}")
        return [], commands
    from tqdm import tqdm

    engines = []
    for art, (onnx_rel, plan_rel) in tqdm(list(zip(artifacts, rel)), desc="tensorrt",
                                          disable=not opts.progress, file=sys.stderr):
        engines.append(trt_mod.build_engine(out / onnx_rel, out / plan_rel,
                                            _profile(opts, art, out / onnx_rel), _fp16(art)))
    return engines, commands


# -- reporting ----------------------------------------------------------------

def summary(result: ExportResult) -> str:
    part, opts = result.partition, result.options
    bpe = 2 if opts.fp16 else 4
    dit = "" if result.denoiser == "unet" else f" ({result.denoiser.upper()} transformer)"
    lines = [f"AsyncDiff export: model={opts.model}{dit} N={part.num_components} S={part.stride}"
             f"{' batched-stride' if part.batched_stride else ''} layout={part.layout} "
             f"backend={opts.backend} batch={opts.batch} (max {opts.limit}) "
             f"latent={part.latent_height}x{part.latent_width} {'fp16' if opts.fp16 else 'fp32'}",
             "", f"{'model':14s} {'stages':22s} {'cost':>6s} {'in/step':>10s} {'out/step':>10s} "
             f"{'max|err|':>9s} {'time':>6s}"]
    if len(opts.resolutions) > 1:
        lines.insert(1, "resolutions (WIDTHxHEIGHT, the default first): "
                     + ", ".join(format_size(*r) for r in opts.resolutions)
                     + " (one partition at the default; dynamic spatial dims)")
    by_name = {a.name: a for a in result.artifacts}
    for comp in part.components:
        art = by_name[comp.name]
        cin = sum(t.numel for t in comp.inputs if t.role in ACTIVATION_ROLES) * bpe
        cout = sum(t.numel for t in comp.outputs if t.role in ACTIVATION_ROLES) * bpe
        lines.append(f"{comp.name:14s} {comp.stages[0] + '..' + comp.stages[-1]:22s} "
                     f"{100 * part.cost_share(comp.index):5.1f}% {_size(cin):>10s} {_size(cout):>10s} "
                     f"{_err(art)} {art.seconds:5.1f}s")
    for art in result.artifacts:
        if not art.name.startswith("unet_part_"):
            lines.append(f"{art.name:14s} {'':22s} {'':6s} {'':10s} {'':10s} "
                         f"{_err(art)} {art.seconds:5.1f}s")
    crossing = ("hidden/skip tensors" if result.denoiser == "unet"
                else "image/text token streams")
    lines.append(f"\ninterface traffic per step (cross-component {crossing}): "
                 f"{_size(part.cross_bytes(bpe))}")
    info = deployment.read(opts.out)
    if info and info["gpus"]:
        lines.append(f"CUDA memory pool per GPU: {_size(info['cuda_memory_pool_bytes'])} "
                     f"(GPUs {info['gpus']}; {deployment.FILE}, used by python -m serve and the "
                     "Docker entrypoint; tritonserver --cuda-memory-pool-byte-size=<gpu>:<bytes>)")
    lines.append(f"\nfiles in {opts.out}:")
    for path in sorted(p for p in Path(opts.out).rglob("*") if p.is_file()):
        lines.append(f"  {_size(path.stat().st_size):>10s}  {path.relative_to(opts.out)}")
    lines += [f"\nnote: {a.name} stays fp32 under --fp16: {a.fp32_reason}"
              for a in result.artifacts if opts.fp16 and a.fp32_reason]
    lines += [f"\nnote: {n}" for n in result.notes]
    if result.build_commands and not result.engines:
        lines.append("\nEngines must be built on a GPU host with TensorRT 10 (trtexec), from the "
                     f"repository folder ({BUILD_SCRIPT} holds the same lines):")
        lines += [f"  {c}" for c in result.build_commands]
    lines.append(f"\ndone in {result.seconds:.1f} s")
    return "\n".join(lines)


def _err(art: Artifact) -> str:
    return f"{art.max_abs_err:9.2e}" if art.checks else f"{'skipped':>9s}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# -- argument parsing ---------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> ExportOptions:
    from asyncdiff.configs import builtin_names

    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny",
                   help=f"diffusers pipeline folder, UNet or transformer folder, or one of "
                   f"{builtin_names()}")
    p.add_argument("--components", type=int, help="N: denoiser components (default: cuts + 1)")
    p.add_argument("--cuts", help="comma-separated stage names where components 1..N-1 start, "
                   "e.g. mid,up2_0 (default: the balanced cut)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2), help="S: AsyncDiff stride")
    p.add_argument("--batched-stride", action="store_true",
                   help="S=2 on N GPUs: the last component runs both timesteps as one batch")
    p.add_argument("--backend", default="onnxruntime", choices=repo_mod.BACKENDS)
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--resolutions", metavar="WxH,...",
                   help="every size served, WIDTHxHEIGHT pixels, comma-separated, the default "
                   "first, e.g. 512x512,768x512 (instead of --height/--width)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one prompt with CFG)")
    p.add_argument("--max-batch", type=int, help="dynamic batching / engine max (default 4*batch)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and interface tensors")
    p.add_argument("--gpus", help="comma-separated GPU ids, component k on the k-th "
                   "(+1 for the last component's second instance with plain S=2; "
                   "default: the CPU, or GPUs 0.. for tensorrt)")
    p.add_argument("--build-engines", action="store_true",
                   help="tensorrt: fail (exit 4) when the engines cannot be built here")
    p.add_argument("--out", type=Path, default=Path("model_repository"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace models a previous export left in --out")
    p.add_argument("--cost", default="flops", choices=("flops", "time"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the onnxruntime-vs-torch parity checks (quick iteration only)")
    p.add_argument("--component-timeout-s", type=float, default=PARAM_DEFAULTS["component_timeout_s"],
                   help="seconds the pipeline waits for one component call (default: %(default)s)")
    p.add_argument("--max-queue-size", type=int, default=16,
                   help="requests that may wait beyond those in flight; more are rejected "
                   "as UNAVAILABLE (server busy) (default: %(default)s)")
    p.add_argument("--layout", default="sequential", choices=("sequential", "outer-ring"),
                   help="outer-ring: the last component holds the first and the last stages "
                   "(the paper's SDXL split)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="diffusers/PEFT LoRA weights (folder or .safetensors) fused into the UNet "
                   "and text encoders at SCALE (default 1.0); repeatable")
    # The pipeline's defaults for omitted inputs; HEIGHT/WIDTH default to the deployment's
    # default size (the first of --resolutions), so their request options are left out: here
    # --height/--width are the export size.
    add_request_arguments(_Without(p, SIZE_FLAGS), Request())
    # Left out: taken from the pipeline folder (its scheduler, its family's guidance).
    p.set_defaults(**{f: None for f in FOLDER_DEFAULTS})
    a = p.parse_args(argv)
    from_folder = frozenset(f for f in FOLDER_DEFAULTS if getattr(a, f) is None)
    for f in from_folder:
        setattr(a, f, getattr(Request(), f))
    resolutions = _parse_resolutions(p, a)
    cuts = [c.strip() for c in a.cuts.split(",") if c.strip()] if a.cuts else None
    components = a.components or (len(cuts) + 1 if cuts else None)
    if components is None:
        p.error("give --components or --cuts")
    try:
        gpus = [int(g) for g in a.gpus.split(",") if g.strip()] if a.gpus else None
    except ValueError:
        p.error(f"--gpus must be comma-separated integers, got {a.gpus!r}")
    return ExportOptions(
        model=a.model, components=components, stride=a.stride, backend=a.backend, out=a.out,
        height=a.height, width=a.width, batch=a.batch, max_batch=a.max_batch, fp16=a.fp16,
        resolutions=resolutions,
        gpus=gpus, batched_stride=a.batched_stride, cuts=cuts, cost=a.cost,
        build_engines=a.build_engines, overwrite=a.overwrite, progress=not a.no_progress,
        validate=not a.no_validate, component_timeout_s=a.component_timeout_s,
        max_queue_size=a.max_queue_size, layout=a.layout, folder_defaults=from_folder,
        loras=tuple(LoraSpec.parse(x) for x in a.lora),
        defaults=Request(**{f.field: getattr(a, f.field) for f in INPUTS
                            if not f.required and f"--{f.field}" not in SIZE_FLAGS}),
    )


SIZE_FLAGS = ("--height", "--width")


class _Without:
    """``parser`` without some of the options ``add_request_arguments`` would add to it."""

    def __init__(self, parser: argparse.ArgumentParser, flags: tuple[str, ...]):
        self.parser, self.flags = parser, flags

    def add_argument(self, flag: str, **kwargs):
        if flag not in self.flags:
            self.parser.add_argument(flag, **kwargs)


def _parse_resolutions(p: argparse.ArgumentParser, a) -> tuple[tuple[int, int], ...]:
    """``--resolutions 512x512,768x512`` -> ((512, 512), (768, 512)); usage errors exit 2.
    Whether the model can take them is checked at export (``export_sizes``)."""
    if a.resolutions is None:
        return ()
    if a.height is not None or a.width is not None:
        p.error("give --resolutions or --height/--width, not both (the first of --resolutions "
                "is the default size)")
    try:
        sizes = tuple(parse_size(s.strip()) for s in a.resolutions.split(",") if s.strip())
    except ValueError as e:
        p.error(f"--resolutions: {e}")
    if not sizes:
        p.error("--resolutions needs at least one WIDTHxHEIGHT size, e.g. 512x512")
    if len(set(sizes)) != len(sizes):
        p.error(f"--resolutions lists a size twice: {a.resolutions}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    torch.set_grad_enabled(False)
    try:
        opts = parse_args(argv)
        if not opts.progress:  # also the libraries' own "Loading weights" bars
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as transformers_logging

            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
        result = run_export(opts)
    except ParityError as e:
        print(f"error: parity check failed: {e}", file=sys.stderr)
        return EXIT_PARITY
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    if opts.build_engines and not result.engines:
        print("error: --build-engines given but TensorRT is not importable here", file=sys.stderr)
        return EXIT_NO_TENSORRT
    return 0
