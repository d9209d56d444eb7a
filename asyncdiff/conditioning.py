"""The conditioning a denoiser takes, built from text encoder outputs as diffusers builds it.

Torch only (no Triton, no diffusers at run time), so the in-process pipeline
and the Triton BLS build the same tensors from the same encoder outputs.

Two families:

* ``sd`` (SD 1.x / 2.x): one CLIP text encoder; the denoiser takes its
  ``last_hidden_state`` as ``encoder_hidden_states``.
* ``sdxl``: two text encoders (CLIP ViT-L and OpenCLIP bigG with a
  projection).  As ``StableDiffusionXLPipeline.encode_prompt`` and
  ``_get_add_time_ids`` do: ``encoder_hidden_states`` is the concatenation
  (last dim) of both encoders' penultimate hidden states; ``text_embeds`` is
  the second encoder's projected pooled output; ``time_ids`` is
  ``original_size + crops_coords_top_left + target_size``.  With
  ``force_zeros_for_empty_prompt`` an empty negative prompt gives zero
  negative text states and zero negative pooled embeddings (diffusers does so
  when ``negative_prompt`` is None; an empty NEGATIVE_PROMPT is how a request
  leaves it out).
* ``sd3``: CLIP-L, CLIP-G (both projected) and T5, as
  ``StableDiffusion3Pipeline.encode_prompt``: ``encoder_hidden_states`` is both CLIP
  penultimate states (concatenated, zero-padded to T5's width) followed on the sequence by
  T5's states (zeros without T5); ``pooled_projections`` is both pooled outputs.
* ``flux``: CLIP (pooled output only) and T5, as ``FluxPipeline.encode_prompt``: one row per
  image, no guidance pair (``flux_conditioning``); ``img_ids`` / ``txt_ids`` place the packed
  image tokens and the text tokens (``flux_ids``); a guidance-distilled model (dev) also takes
  GUIDANCE_SCALE as its ``guidance`` input.

Which tensors a partition's components need is read from their input roles
(``denoiser_conditioning``), so one code path serves both families.

Every SD / SDXL / SD3 batch here is a classifier-free guidance pair ``[negative; prompt]``
(batch 2); ``asyncdiff.generation.cfg_batch`` lays out B such pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asyncdiff.configs import TEXT_TOKENS
from asyncdiff.contract import (  # noqa: F401  (the size inputs are re-exported)
    CROPS_COORDS_TOP_LEFT, INPUT_BY_FIELD, ORIGINAL_SIZE, SIZE_INPUTS, Request, token_limit_message,
)
from asyncdiff.partition import CONDITIONING_ROLES, Partition

SD, SDXL, SD3, FLUX = "sd", "sdxl", "sd3", "flux"
KINDS = (SD, SDXL, SD3, FLUX)
# Component input names of the conditioning (asyncdiff.stages / asyncdiff.partition).
TEXT_STATES, TEXT_EMBEDS, TIME_IDS = "encoder_hidden_states", "text_embeds", "time_ids"
POOLED_PROJECTIONS = "pooled_projections"  # SD3's pooled text input
T5_TOKENS = 256  # SD3: diffusers' max_sequence_length default (77 CLIP + 256 T5 text tokens)
IMG_IDS, TXT_IDS = "img_ids", "txt_ids"  # FLUX's position ids (asyncdiff.dit)
FLUX_T5_TOKENS = TEXT_TOKENS[FLUX]  # FLUX: diffusers' max_sequence_length default (512)
FLUX_PATCH = 2  # FLUX packs 2x2 latent patches into one token
# Graph output names of the exported text encoders (export/onnx_export.py uses these).
LAST_HIDDEN, PENULTIMATE, POOLED = "last_hidden_state", "penultimate_hidden_state", "text_embeds"

ROLE_DESCRIPTIONS = {
    "text": "text states [2B, 77, D]: SD: the text encoder's last_hidden_state; SDXL: both "
            "encoders' penultimate hidden states concatenated on the last dim; FLUX: [B, 512, W] "
            "T5's last hidden state",
    "text_embeds": "pooled text embedding [2B, P]: text_encoder_2's projected pooled output "
                   "(SDXL added conditioning)",
    "time_ids": "[2B, 6] original_size + crops_coords_top_left + target_size, pixels as floats "
                "(SDXL added conditioning)",
    "pooled": "[2B, P] SD3: CLIP-L and CLIP-G projected pooled outputs concatenated; "
              "FLUX: [B, P] CLIP's pooled output",
    "guidance": "[B] FLUX dev: GUIDANCE_SCALE, embedded by the transformer (no CFG rows)",
    "img_ids": "[B, (h/2)(w/2), 3] FLUX: (0, row, column) of each packed image token",
    "txt_ids": "[B, T, 3] FLUX: zeros, one per text token",
}
FLUX_ROLES = {"text", "pooled", "img_ids", "txt_ids"}  # + "guidance" with guidance_embeds


@dataclass(frozen=True)
class ConditioningTensor:
    """One conditioning input of the denoiser's components: what the pipeline must supply."""

    name: str  # component input name
    role: str  # asyncdiff.partition.CONDITIONING_ROLES
    shape: tuple[int, ...]  # batch first, at the partition's batch
    description: str


def denoiser_conditioning(partition: Partition) -> tuple[ConditioningTensor, ...]:
    """The conditioning inputs of the partition's components (each once, first-use order)."""
    seen: dict[str, ConditioningTensor] = {}
    for comp in partition.components:
        for t in comp.inputs:
            if t.role in CONDITIONING_ROLES and t.name not in seen:
                seen[t.name] = ConditioningTensor(t.name, t.role, tuple(t.shape),
                                                  ROLE_DESCRIPTIONS.get(t.role, t.role))
    return tuple(seen.values())


def conditioning_kind(partition: Partition) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux`` from the component input roles; other denoisers
    are not served."""
    roles = {t.role for t in denoiser_conditioning(partition)}
    if roles <= {"text"}:
        return SD
    if roles == {"text", "text_embeds", "time_ids"}:
        return SDXL
    if roles == {"text", "pooled"}:
        return SD3
    if roles - {"guidance"} == FLUX_ROLES:
        return FLUX
    raise ValueError(f"no text-to-image conditioning builds the roles {sorted(roles)} "
                     f"(served: {{text}} for SD, {{text, text_embeds, time_ids}} for SDXL, "
                     f"{{text, pooled}} for SD3, {sorted(FLUX_ROLES)} (+ guidance) for FLUX)")


# -- tokenization -------------------------------------------------------------------------

def token_ids(tokenizer, prompt: str, name: str = INPUT_BY_FIELD["prompt"].name,
              max_length: int | None = None) -> np.ndarray:
    """Padded token ids [1, max_length]; a prompt over the limit is rejected, not truncated.

    Padded with the tokenizer's own pad token, as ``padding="max_length"`` does (SDXL's
    second tokenizer pads with ``!``, the first with the end token).  ``max_length``:
    default the tokenizer's model_max_length (SD3's T5 takes diffusers' 256 instead).
    """
    limit = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt).input_ids
    if len(ids) > limit:
        raise ValueError(token_limit_message(name, len(ids), limit))
    return np.asarray([ids + [tokenizer.pad_token_id] * (limit - len(ids))], dtype=np.int64)


def cfg_token_ids(tokenizer, req: Request, max_length: int | None = None) -> np.ndarray:
    """[negative; prompt] token ids [2, max_length], the classifier-free guidance pair."""
    return np.concatenate([token_ids(tokenizer, getattr(req, f), INPUT_BY_FIELD[f].name,
                                     max_length) for f in ("negative_prompt", "prompt")])


def cfg_token_ids_each(tokenizers: Sequence, req: Request) -> list[np.ndarray]:
    """``cfg_token_ids`` for every tokenizer (SDXL: one per text encoder, the same prompt)."""
    return [cfg_token_ids(tok, req) for tok in tokenizers]


# -- SDXL added conditioning --------------------------------------------------------------

@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, in pixels as (height, width) / (top, left).

    diffusers' defaults: ``original_size`` = ``target_size`` = the image size,
    ``crops_coords_top_left`` = (0, 0).
    """

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int] = (0, 0)

    @classmethod
    def default(cls, height: int, width: int) -> "SizeConditioning":
        return cls((height, width), (height, width))

    def validate(self) -> "SizeConditioning":
        for name, pair, low in ((ORIGINAL_SIZE.name, self.original_size, 1),
                                (CROPS_COORDS_TOP_LEFT.name, self.crops_coords_top_left, 0)):
            if len(pair) != 2 or not all(low <= int(v) <= 16384 for v in pair):
                raise ValueError(f"{name} must be two integers in [{low}, 16384], got {list(pair)}")
        return self

    def time_ids(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, 6] as ``_get_add_time_ids`` builds it."""
        values = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        return torch.tensor([values], dtype=dtype)


# The optional request inputs ORIGINAL_SIZE and CROPS_COORDS_TOP_LEFT are asyncdiff.contract's.
def parse_size_inputs(get, height: int, width: int) -> SizeConditioning:
    """The size conditioning of a request: ``get(name)`` returns an input's array or None;
    missing inputs take diffusers' defaults for an image of ``height`` x ``width``."""
    values = {}
    for f, key in ((ORIGINAL_SIZE, "original_size"), (CROPS_COORDS_TOP_LEFT, "crops_coords_top_left")):
        array = get(f.name)
        if array is None:
            continue
        flat = np.asarray(array).reshape(-1)
        if flat.size != 2:
            raise ValueError(f"{f.name} must hold exactly 2 integers, got shape "
                             f"{list(np.asarray(array).shape)}")
        values[key] = (int(flat[0]), int(flat[1]))
    default = SizeConditioning.default(height, width)
    return SizeConditioning(values.get("original_size", default.original_size), default.target_size,
                            values.get("crops_coords_top_left", (0, 0))).validate()


def check_added_embedding(unet_config: Mapping, text_embeds_dim: int, time_ids: int = 6) -> None:
    """The check ``_get_add_time_ids`` makes: the UNet's added embedding takes the pooled
    embedding plus one ``addition_time_embed_dim`` projection per time id."""
    cfg = dict(unet_config)
    expected = cfg.get("projection_class_embeddings_input_dim")
    passed = cfg["addition_time_embed_dim"] * time_ids + text_embeds_dim
    if expected != passed:
        raise ValueError(f"the UNet's added embedding takes {expected} features, but the pooled "
                         f"embedding ({text_embeds_dim}) and {time_ids} time ids make {passed}: "
                         "the UNet and text_encoder_2 configs disagree")


def sdxl_conditioning(hidden_states: Sequence[torch.Tensor], pooled: torch.Tensor,
                      sizes: SizeConditioning | tuple[SizeConditioning, SizeConditioning],
                      zero_negative: bool) -> dict[str, torch.Tensor]:
    """The denoiser's conditioning of one [negative; prompt] pair.

    ``hidden_states``: each encoder's penultimate hidden states [2, L, D_k];
    ``pooled``: text_encoder_2's projected pooled output [2, P];
    ``sizes``: one for both rows, or (negative, prompt);
    ``zero_negative``: ``force_zeros_for_empty_prompt`` and an empty negative prompt.
    """
    text = torch.cat(list(hidden_states), dim=-1)
    pooled = pooled.to(text.dtype)
    if zero_negative:  # zeros_like of the whole negative embedding, as diffusers does
        text = torch.cat([torch.zeros_like(text[:1]), text[1:]])
        pooled = torch.cat([torch.zeros_like(pooled[:1]), pooled[1:]])
    neg, pos = sizes if isinstance(sizes, tuple) else (sizes, sizes)
    time_ids = torch.cat([neg.time_ids(text.dtype), pos.time_ids(text.dtype)]).to(text.device)
    return {TEXT_STATES: text, TEXT_EMBEDS: pooled, TIME_IDS: time_ids}


def sd_conditioning(last_hidden_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """SD 1.x / 2.x: the text encoder's last hidden state is the only conditioning."""
    return {TEXT_STATES: last_hidden_state}


def zero_negative(req: Request, force_zeros_for_empty_prompt: bool) -> bool:
    return bool(force_zeros_for_empty_prompt) and req.negative_prompt == ""


# -- from torch text encoders (in-process) --------------------------------------------------

@torch.no_grad()
def encode_penultimate(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(penultimate hidden states, projected pooled output or None) of a transformers CLIP
    text encoder: what the exported SDXL text encoder graphs return."""
    out = encoder(ids, output_hidden_states=True)
    pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection only
    return out.hidden_states[-2], pooled


@torch.no_grad()
def encode_request(kind: str, encoders: Sequence, tokenizers: Sequence, req: Request, *,
                   sizes: SizeConditioning | None = None,
                   force_zeros_for_empty_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The conditioning of one request ([negative; prompt], batch 2) with torch encoders.
    SD3: ``encode_sd3_request`` (three encoders, T5 optional)."""
    ids = [torch.from_numpy(a) for a in cfg_token_ids_each(tokenizers, req)]
    if kind == SD:
        return sd_conditioning(encoders[0](ids[0])[0])
    if kind != SDXL:
        raise ValueError(f"conditioning kind must be one of {KINDS}, got {kind!r}")
    if sizes is None:
        raise ValueError("SDXL conditioning needs the size conditioning (time ids)")
    outs = [encode_penultimate(enc, i) for enc, i in zip(encoders, ids, strict=True)]
    return sdxl_conditioning([h for h, _ in outs], outs[-1][1], sizes,
                             zero_negative(req, force_zeros_for_empty_prompt))


# -- SD3 (MMDiT) ----------------------------------------------------------------------------

def sd3_conditioning(clip_states: Sequence[torch.Tensor], clip_pooled: Sequence[torch.Tensor],
                     t5_states: torch.Tensor | None, *, t5_width: int,
                     t5_tokens: int = T5_TOKENS) -> dict[str, torch.Tensor]:
    """The SD3 transformer's conditioning of one [negative; prompt] pair, as
    ``StableDiffusion3Pipeline.encode_prompt`` builds it from the encoders' outputs (the
    in-process pipeline and the BLS both call this).

    ``clip_states``: CLIP-L's and CLIP-G's penultimate hidden states [2, 77, D_k];
    ``clip_pooled``: their projected pooled outputs [2, P_k];
    ``t5_states``: T5's last hidden state [2, T, W], or None without a T5 encoder: then zeros
    [2, t5_tokens, t5_width], as diffusers fills the slot (``t5_width``: the transformer's
    joint_attention_dim).
    The CLIP states, concatenated on the last dim, are zero-padded to T5's width W and put
    before the T5 tokens: text [2, 77 + T, W]; pooled [2, P_L + P_G].
    """
    clip = torch.cat(list(clip_states), dim=-1)
    if t5_states is None:
        t5_states = torch.zeros((clip.shape[0], t5_tokens, t5_width), dtype=clip.dtype,
                                device=clip.device)
    width = t5_states.shape[-1]
    if width != t5_width:
        raise ValueError(f"T5's states are {width} wide; the transformer's joint_attention_dim "
                         f"is {t5_width}")
    if clip.shape[-1] > width:
        raise ValueError(f"the CLIP states ({clip.shape[-1]} wide) are wider than T5's ({width})")
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    text = torch.cat([clip, t5_states.to(clip.device, clip.dtype)], dim=-2)
    pooled = torch.cat([p.to(clip.device, clip.dtype) for p in clip_pooled], dim=-1)
    return {TEXT_STATES: text, POOLED_PROJECTIONS: pooled}


def sd3_token_ids(tokenizers: Sequence, req: Request,
                  t5_tokens: int = T5_TOKENS) -> list[np.ndarray]:
    """[negative; prompt] token ids of CLIP-L and CLIP-G [2, 77] and, when the third tokenizer
    is not None, T5's [2, t5_tokens] (diffusers' max_sequence_length). A prompt over a
    tokenizer's limit is rejected, not truncated as diffusers does (the CLIP rule here too)."""
    ids = [cfg_token_ids(tok, req) for tok in tokenizers[:2]]
    if len(tokenizers) > 2 and tokenizers[2] is not None:
        ids.append(cfg_token_ids(tokenizers[2], req, t5_tokens))
    return ids


@torch.no_grad()
def encode_t5(encoder, ids: torch.Tensor) -> torch.Tensor:
    """T5's last hidden state (what diffusers takes as ``text_encoder_3(ids)[0]``)."""
    return encoder(ids.to(encoder.device))[0]


@torch.no_grad()
def encode_sd3_request(encoders: Sequence, tokenizers: Sequence, req: Request, *,
                       t5_width: int, t5_tokens: int = T5_TOKENS) -> dict[str, torch.Tensor]:
    """SD3 conditioning of one request ([negative; prompt], batch 2) with torch encoders.

    ``encoders`` / ``tokenizers``: CLIP-L, CLIP-G, T5 (the T5 pair may be None: its slot is
    then zeros, see ``sd3_conditioning``).  Tokenized by ``sd3_token_ids``.
    """
    ids = [torch.from_numpy(i) for i in sd3_token_ids(tokenizers, req, t5_tokens)]
    outs = [encode_penultimate(enc, i.to(enc.device)) for enc, i in zip(encoders[:2], ids)]
    t5 = encode_t5(encoders[2], ids[2]) if len(ids) > 2 else None
    return sd3_conditioning([h for h, _ in outs], [p for _, p in outs], t5,
                            t5_width=t5_width, t5_tokens=t5_tokens)


# -- FLUX -----------------------------------------------------------------------------------

def flux_ids(rows: int, height: int, width: int, text_tokens: int = FLUX_T5_TOKENS,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``img_ids`` [rows, (h/2)(w/2), 3]: (0, row, column) of each packed token of latents
    ``height`` x ``width``; ``txt_ids`` zeros [rows, text_tokens, 3].  Batch first like every
    component input (the components read row 0)."""
    rows_, cols = height // FLUX_PATCH, width // FLUX_PATCH
    grid = torch.zeros(rows_, cols, 3)
    grid[..., 1] += torch.arange(rows_)[:, None]
    grid[..., 2] += torch.arange(cols)[None, :]
    img = grid.reshape(rows_ * cols, 3).to(dtype)
    return {IMG_IDS: img.expand(rows, -1, -1),
            TXT_IDS: torch.zeros(rows, text_tokens, 3, dtype=dtype)}


def flux_conditioning(clip_pooled: torch.Tensor,
                      t5_states: torch.Tensor) -> dict[str, torch.Tensor]:
    """The text conditioning of one prompt (batch 1), as ``FluxPipeline.encode_prompt``: T5's
    states as the text tokens, CLIP's pooled output as ``pooled_projections`` (the in-process
    pipeline and the BLS both call this)."""
    return {TEXT_STATES: t5_states, POOLED_PROJECTIONS: clip_pooled.to(t5_states.dtype)}


def check_no_negative_prompt(req: Request) -> None:
    """FLUX takes no NEGATIVE_PROMPT (no true CFG): refused, named, rather than ignored."""
    if req.negative_prompt:
        raise ValueError(f"{INPUT_BY_FIELD['negative_prompt'].name} must be empty: FLUX runs "
                         "without classifier-free guidance (GUIDANCE_SCALE goes to the "
                         "guidance embedding)")


def flux_token_ids(tokenizers: Sequence, req: Request,
                   t5_tokens: int = FLUX_T5_TOKENS) -> list[np.ndarray]:
    """The prompt's token ids (batch 1): CLIP's [1, 77] and T5's [1, t5_tokens].  Prompts over
    a limit are rejected, not truncated as diffusers does."""
    return [token_ids(tokenizers[0], req.prompt),
            token_ids(tokenizers[1], req.prompt, max_length=t5_tokens)]


@torch.no_grad()
def encode_flux_request(encoders: Sequence, tokenizers: Sequence, req: Request,
                        t5_tokens: int = FLUX_T5_TOKENS) -> dict[str, torch.Tensor]:
    """FLUX conditioning of one prompt (batch 1) with torch encoders (CLIP, T5)."""
    clip, t5 = encoders
    clip_ids, t5_ids = (torch.from_numpy(i) for i in flux_token_ids(tokenizers, req, t5_tokens))
    pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
    return flux_conditioning(pooled, encode_t5(t5, t5_ids))
