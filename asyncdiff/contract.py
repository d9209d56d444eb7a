"""The serving contract of the ``asyncdiff`` Triton model: its inputs, outputs and parameters.

Torch-free (numpy only), so the client imports it without torch. Export writes
the model config from it, the BLS parses requests and reads its parameters
with it, the client builds requests from it. No other file spells an input
name, a default or an allowed range.

* ``INPUTS`` / ``OUTPUTS``: name, Triton dtype, dims; an input also has its
  ``Request`` field, default and the check that names the allowed range.
* ``Request``: one generation's values, parsed from the inputs and validated
  before any expensive work.
* ``PipelineParams``: everything export writes into the pipeline model's
  ``parameters`` and the BLS reads back (model and tensor names of the
  networks it calls, files in its version folder, request defaults, the
  component timeout, the served dtype of the tensors it sends and receives).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL_NAME = "asyncdiff"  # unary: plain HTTP / gRPC infer, perf_analyzer
STREAM_MODEL_NAME = "asyncdiff_stream"  # decoupled: per-step progress, then the image
PIPELINE_BACKEND = "asyncdiff_pipeline"  # the engine, behind STREAM_MODEL_NAME
UNARY_BACKEND = "asyncdiff_unary"  # MODEL_NAME: forwards one request to the engine
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
MAX_GUIDANCE_SCALE = 100.0  # far above any useful scale; 3e38 overflowed to NaN latents
# Checked on the raw bytes, before decoding or tokenizing: a prompt within the token limit is
# at most a few hundred bytes, and a 16 MiB one used to block the server while it was tokenized.
MAX_TEXT_BYTES = 4096
FLOW_MATCH_EULER = "flowmatch-euler"  # SD3's and FLUX's FlowMatchEulerDiscreteScheduler
SCHEDULERS = ("ddim", "euler", "dpmsolver++", FLOW_MATCH_EULER)
MAX_NUM_IMAGES = 64  # the contract's bound; a deployment allows up to its max_batch_requests
MAX_SIDE = 16384  # pixels; a deployment serves only the sizes it was exported for
SIZE_MULTIPLE = 8  # pixels per latent cell of every supported VAE

# Triton wire dtype (tritonclient's names) -> numpy dtype
NUMPY_DTYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32,
                "FP16": np.float16, "UINT8": np.uint8}


@dataclass(frozen=True)
class IOField:
    """One input or output of the ``asyncdiff`` model (dims without a batch dim)."""

    name: str
    dtype: str  # Triton wire dtype: BYTES, INT64, INT32, FP32, UINT8
    dims: tuple[int, ...]
    field: str | None = None  # the Request attribute an input fills
    required: bool = False
    allowed: str = ""  # human text of the allowed values, used in errors and docs
    max_bytes: int | None = None  # BYTES inputs: limit on the encoded value

    @property
    def numpy_dtype(self):
        return NUMPY_DTYPES[self.dtype]

    def parse(self, array: np.ndarray) -> Any:
        """The Python value of a [1]-shaped input; ValueError names the field."""
        array = np.asarray(array)
        if array.size != 1:
            raise ValueError(f"{self.name} must hold exactly one element, got shape {list(array.shape)}")
        value = array.reshape(-1)[0]
        if self.dtype == "BYTES":
            size = len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8"))
            if self.max_bytes is not None and size > self.max_bytes:
                raise ValueError(f"{self.name} is {size} bytes; the limit is {self.max_bytes} bytes")
            if isinstance(value, bytes):
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{self.name} must be valid UTF-8") from None
            return str(value)
        if self.dtype == "FP32":  # the shortest decimal of the fp32 value: 0.8, not 0.800000011920929
            return float(np.format_float_positional(np.float32(value), unique=True))
        return int(value)

    def encode(self, value: Any) -> np.ndarray:
        """A Python value -> the [1]-shaped array a client sends (BYTES as UTF-8)."""
        if self.dtype == "BYTES":
            return np.array([str(value).encode("utf-8")], dtype=np.object_)
        return np.array([value], dtype=self.numpy_dtype)


INPUTS: tuple[IOField, ...] = (
    IOField("PROMPT", "BYTES", (1,), "prompt", True,
            f"non-empty UTF-8, at most {MAX_TEXT_BYTES} bytes and the text encoder's token limit "
            "incl. start/end", MAX_TEXT_BYTES),
    IOField("NEGATIVE_PROMPT", "BYTES", (1,), "negative_prompt",
            allowed=f"UTF-8, may be empty, at most {MAX_TEXT_BYTES} bytes", max_bytes=MAX_TEXT_BYTES),
    IOField("SEED", "INT64", (1,), "seed", allowed=f"0 ... {MAX_SEED}"),
    IOField("STEPS", "INT32", (1,), "steps", allowed=f"1 ... {MAX_STEPS}"),
    IOField("GUIDANCE_SCALE", "FP32", (1,), "guidance_scale", allowed=f"0 ... {MAX_GUIDANCE_SCALE:g}"),
    IOField("WARMUP", "INT32", (1,), "warmup", allowed="1 ... STEPS-1 (1 when STEPS = 1)"),
    IOField("SCHEDULER", "BYTES", (1,), "scheduler", allowed=" | ".join(SCHEDULERS), max_bytes=64),
    IOField("NUM_IMAGES", "INT32", (1,), "num_images",
            allowed="1 ... the deployment's max_batch_requests: images with seeds SEED, SEED+1, ..."),
    IOField("HEIGHT", "INT32", (1,), "height",
            allowed="pixels; one of the deployment's sizes (export --resolutions)"),
    IOField("WIDTH", "INT32", (1,), "width",
            allowed="pixels; one of the deployment's sizes (export --resolutions)"),
    IOField("STRENGTH", "FP32", (1,), "strength",
            allowed="(0, 1]: with INIT_IMAGE, how much of it is re-noised (1 = all)"),
)
OUTPUTS: tuple[IOField, ...] = (
    IOField("IMAGE", "UINT8", (-1, -1, -1, 3), allowed="[NUM_IMAGES, H, W, 3]"),
    IOField("LATENTS", "FP32", (-1, -1, -1, -1),
            allowed="[NUM_IMAGES, C, h, w] final latents, before the VAE"),
)
# img2img: an optional input of both pipeline models of a deployment with a VAE encoder
# (``model_inputs``). Not a Request field: it is an image, not a scalar.
INIT_IMAGE = IOField("INIT_IMAGE", "UINT8", (-1, -1, 3),
                     allowed="[HEIGHT, WIDTH, 3] uint8 RGB, the request's size")
IMAGE_INPUTS = (INIT_IMAGE,)
# The stream model takes every input above plus these, and answers with progress responses
# (STEP, and PREVIEW when asked) before the final one (IMAGE, LATENTS, STEP).
PREVIEW_EVERY = IOField("PREVIEW_EVERY", "INT32", (1,),
                        allowed="0 (no previews) ... STEPS: a preview image every k steps")
STREAM_INPUTS = INPUTS + (PREVIEW_EVERY,)
# SDXL's size conditioning ([height, width] / [top, left] pixels, two elements each): optional
# inputs of both pipeline models of an SDXL deployment only (``model_inputs``). Not Request
# fields: they are not scalars and only one family has them (asyncdiff.conditioning parses them).
# An SD deployment does not declare them, so Triton refuses them (INVALID_ARG, "unexpected input").
ORIGINAL_SIZE = IOField("ORIGINAL_SIZE", "INT32", (2,),
                        allowed="[height, width] pixels, 1 ... 16384 each (default: the image size)")
CROPS_COORDS_TOP_LEFT = IOField("CROPS_COORDS_TOP_LEFT", "INT32", (2,),
                                allowed="[top, left] pixels, 0 ... 16384 each (default: [0, 0])")
SIZE_INPUTS = (ORIGINAL_SIZE, CROPS_COORDS_TOP_LEFT)
STEP = IOField("STEP", "INT32", (2,), allowed="[steps done, steps in all]")
PREVIEW = IOField("PREVIEW", "UINT8", (-1, -1, 3), allowed="[H, W, 3] the current denoised estimate")
# To a forwarding BLS (request parameter ``error_output``) an error comes as this output:
# Triton 2.51 does not deliver an error response that follows a progress response to a BLS.
ERROR = IOField("ERROR", "BYTES", (1,), allowed="the error message (forwarded requests only)")
STREAM_OUTPUTS = OUTPUTS + (STEP, PREVIEW, ERROR)
INPUT_BY_NAME = {f.name: f for f in INPUTS}
INPUT_BY_FIELD = {f.field: f for f in INPUTS}


@dataclass(frozen=True)
class Request:
    """One generation's values. Defaults here are the contract's; export may override them."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 3.0
    warmup: int = 1
    scheduler: str = "ddim"
    num_images: int = 1
    height: int = 0  # pixels; 0: the deployment's default size (export writes it)
    width: int = 0
    strength: float = 0.8  # img2img only (diffusers' default)

    def validate(self) -> "Request":
        """Raise ValueError naming the field and its allowed range; returns self."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("PROMPT must be a non-empty UTF-8 string")
        if not isinstance(self.negative_prompt, str):
            raise ValueError("NEGATIVE_PROMPT must be a UTF-8 string")
        for f in ("prompt", "negative_prompt"):
            size, field_ = len(getattr(self, f).encode("utf-8")), INPUT_BY_FIELD[f]
            if size > field_.max_bytes:
                raise ValueError(f"{field_.name} is {size} bytes; the limit is {field_.max_bytes} bytes")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"SEED must be in [0, {MAX_SEED}], got {self.seed}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"STEPS must be in [1, {MAX_STEPS}], got {self.steps}")
        top = max(1, self.steps - 1)
        if not 1 <= self.warmup <= top:
            raise ValueError(f"WARMUP must be in [1, {top}] (1 <= WARMUP < STEPS), got {self.warmup}")
        if not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE):
            raise ValueError(f"GUIDANCE_SCALE must be a finite number in [0, {MAX_GUIDANCE_SCALE:g}], "
                             f"got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SCHEDULER must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:  # a deployment's own bound is lower
            raise ValueError(f"NUM_IMAGES must be in [1, max_batch_requests] (the deployment's, "
                             f"at most {MAX_NUM_IMAGES}), got {self.num_images}")
        for name, px in (("HEIGHT", self.height), ("WIDTH", self.width)):
            if px != 0 and not (SIZE_MULTIPLE <= px <= MAX_SIDE and px % SIZE_MULTIPLE == 0):
                raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE} in "
                                 f"[{SIZE_MULTIPLE}, {MAX_SIDE}], got {px}")
        if not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise ValueError(f"STRENGTH must be in (0, 1], got {self.strength}")
        return self

    def seeds(self) -> list[int]:
        """The seed of each image: SEED, SEED+1, ... (each image is the single-image request
        with its seed)."""
        return [self.seed + i for i in range(self.num_images)]

    @classmethod
    def from_inputs(cls, get: Callable[[str], np.ndarray | None], defaults: "Request") -> "Request":
        """Parse and validate a request; ``get(name)`` returns an input's array or None."""
        values = {}
        for f in INPUTS:
            array = get(f.name)
            if array is None:
                if f.required:
                    raise ValueError(f"{f.name} is required")
                continue
            values[f.field] = f.parse(array)
        return dataclasses.replace(defaults, **values).validate()

    def to_inputs(self, only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Input name -> array, for the fields in ``only`` (default: all)."""
        names = only if only is not None else tuple(f.field for f in INPUTS)
        return {INPUT_BY_FIELD[n].name: INPUT_BY_FIELD[n].encode(getattr(self, n)) for n in names}


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> (width, height) = (768, 512). One convention everywhere: WIDTHxHEIGHT,
    as OpenAI's ``size`` and most image tools write it."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is WIDTHxHEIGHT in pixels, e.g. 768x512; got {text!r}") from None
    return width, height


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def add_request_arguments(parser: argparse.ArgumentParser, defaults: Request | None) -> None:
    """One ``--<field>`` option per optional input (``--guidance-scale`` for GUIDANCE_SCALE).

    ``defaults=None`` (client): an option left out stays None and is not sent.
    Values are checked by ``Request.validate`` (or the server), which names the range.
    """
    for f in INPUTS:
        if f.required:
            continue
        parser.add_argument(f"--{f.field.replace('_', '-')}", dest=f.field,
                            type={"BYTES": str, "FP32": float}.get(f.dtype, int),
                            default=None if defaults is None else getattr(defaults, f.field),
                            help=f"{f.name}: {f.allowed}"
                            + ("" if defaults is None else " (default: %(default)r)"))


BUSY_MESSAGE = "server busy"
CANCELLED_MESSAGE = "cancelled"


def error_kind(message: str) -> str:
    """The status of a pipeline error, from its message: INVALID_ARG when it names an input
    (every request error starts with the input's name), UNAVAILABLE when busy, CANCELLED,
    else INTERNAL. Needed because a BLS caller of a decoupled model gets every error as
    INTERNAL (Triton 2.51), so the unary model restores the engine's status from this."""
    if message.split(" ", 1)[0] in {f.name for f in STREAM_INPUTS + SIZE_INPUTS + IMAGE_INPUTS}:
        return "INVALID_ARG"
    if message.startswith(BUSY_MESSAGE):
        return "UNAVAILABLE"
    if message.startswith(CANCELLED_MESSAGE):
        return "CANCELLED"
    return "INTERNAL"


def token_limit_message(name: str, tokens: int, limit: int) -> str:
    return f"{name} is {tokens} tokens including start/end; the limit is {limit}: shorten it"


# -- pipeline model parameters ------------------------------------------------------------

@dataclass(frozen=True)
class NetworkNames:
    """A network model the BLS calls: its Triton model name and tensor names."""

    model: str
    input: str
    output: str


# The networks the BLS calls besides the components (export names the models and graph tensors so).
TEXT_ENCODER = NetworkNames("text_encoder", "input_ids", "last_hidden_state")
TEXT_ENCODER_2 = NetworkNames("text_encoder_2", "input_ids", "penultimate_hidden_state")  # SDXL
VAE_DECODER = NetworkNames("vae_decoder", "latents", "image")
VAE_ENCODER = NetworkNames("vae_encoder", "image", "latent_moments")  # img2img
TEXT_ENCODER_3 = NetworkNames("text_encoder_3", "input_ids", "last_hidden_state")  # SD3's T5

# Parameters of the pipeline config that Triton's python backend reads itself (not ours).
TRITON_PARAMETERS = ("FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH")


@dataclass(frozen=True)
class PipelineParams:
    """What export writes into the ``asyncdiff`` model's parameters and the BLS reads.

    Every field is written and every field is read; ``to_parameters`` /
    ``from_parameters`` round-trip exactly.
    """

    component_models: tuple[str, ...]
    latent_shape: tuple[int, int, int]  # [C, h, w] of one latent
    image_shape: tuple[int, int, int]  # [H, W, 3]
    vae_scaling_factor: float
    text_encoder: NetworkNames = TEXT_ENCODER
    vae_decoder: NetworkNames = VAE_DECODER
    defaults: Request = field(default_factory=Request)
    partition_file: str = "partition.json"
    scheduler_config_file: str = "scheduler/scheduler_config.json"
    tokenizer_dir: str = "tokenizer"
    component_timeout_s: float = 120.0
    device: str = "cpu"  # where the BLS keeps latents and runs the scheduler
    # Served dtype of every tensor the BLS sends or receives, by tensor name.
    dtypes: Mapping[str, str] = field(default_factory=lambda: {
        "sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32",
        "noise_pred": "float32", "input_ids": "int64", "last_hidden_state": "float32",
        "latents": "float32", "image": "float32", "latent_moments": "float32"})
    # CUDA id of every placement rank (``Placement.gpus``); None: a CPU deployment. With the
    # partition's N, S and batched stride it rebuilds the placement that says where each
    # call's outputs are consumed.
    gpus: tuple[int, ...] | None = None
    # Requests in flight at once, their component calls batched (continuous batching per
    # model, ``asyncdiff.batching``); the components' max batch holds their rows.
    max_batch_requests: int = 1
    # Requests that may wait for a batch slot; beyond that a request is refused as busy.
    max_queue_size: int = 16
    # max_batch_size of every model the pipeline calls: a batched call is split to fit.
    max_batch_sizes: Mapping[str, int] = field(default_factory=dict)
    # -- SDXL (asyncdiff.conditioning); an SD deployment leaves these at their defaults --------
    # "sd": text_encoder -> encoder_hidden_states. "sdxl": text_encoder and text_encoder_2 give
    # penultimate hidden states (concatenated on the last dim), text_encoder_2 also the pooled
    # text_embeds; time_ids from the size conditioning.
    conditioning: str = "sd"
    text_encoder_2: NetworkNames = TEXT_ENCODER_2
    text_encoder_2_pooled: str = "text_embeds"  # text_encoder_2's second output
    tokenizer_2_dir: str = "tokenizer_2"
    force_zeros_for_empty_prompt: bool = False  # empty NEGATIVE_PROMPT -> zero negative embeddings
    # Every served (width, height) in pixels; the first is the default (``image_shape``'s).
    # Empty: only ``image_shape``. Components take any of them (dynamic spatial dims).
    resolutions: tuple[tuple[int, int], ...] = ()
    # img2img: the VAE encoder (image in [-1, 1] -> the latent distribution's moments, mean and
    # log-variance concatenated on the channels, as diffusers' DiagonalGaussianDistribution).
    img2img: bool = False
    vae_encoder: NetworkNames = VAE_ENCODER
    # -- SD3 (conditioning "sd3"): text_encoder and text_encoder_2 (CLIP-L, CLIP-G) give
    # penultimate states and projected pooled outputs (``text_encoder_pooled``,
    # ``text_encoder_2_pooled``); ``t5``: text_encoder_3 (T5) is served, else its slot is zeros.
    # The VAE decodes latents / vae_scaling_factor + vae_shift_factor.
    text_encoder_pooled: str = "text_embeds"
    text_encoder_3: NetworkNames = TEXT_ENCODER_3
    tokenizer_3_dir: str = "tokenizer_3"
    t5: bool = False
    vae_shift_factor: float = 0.0
    # -- FLUX (conditioning "flux"): text_encoder (CLIP) gives its pooled output
    # (``text_encoder.output``), text_encoder_2 (T5, tokenizer_2_dir) its last hidden state;
    # one row per image, no CFG (GUIDANCE_SCALE goes to a guidance embedding); the scheduler
    # config's dynamic shift is applied from the image size; the VAE decodes as SD3's.

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every served size, the default first."""
        height, width, _ = self.image_shape
        return [tuple(s) for s in self.resolutions] or [(width, height)]

    def request_size(self, req: Request) -> tuple[int, int]:
        """The (width, height) a request asks for (0: the default); ValueError unless served."""
        sizes = self.sizes()
        width, height = req.width or sizes[0][0], req.height or sizes[0][1]
        if (width, height) not in sizes:
            raise ValueError(f"WIDTH x HEIGHT {format_size(width, height)} is not served; this "
                             f"deployment serves {', '.join(format_size(*s) for s in sizes)} "
                             "(WIDTHxHEIGHT, export --resolutions)")
        return width, height

    def request_images(self, req: Request) -> int:
        if not 1 <= req.num_images <= self.max_batch_requests:
            raise ValueError(f"NUM_IMAGES must be in [1, {self.max_batch_requests}] on this "
                             f"deployment (its max_batch_requests), got {req.num_images}")
        return req.num_images

    def to_parameters(self) -> dict[str, str]:
        """Flat string parameters for ``config.pbtxt`` (JSON values, plain strings as is)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "defaults":
                for k, v in dataclasses.asdict(value).items():
                    if k != "prompt":
                        out[f"default_{k}"] = v if isinstance(v, str) else json.dumps(v)
            elif isinstance(value, NetworkNames):
                out[f.name] = json.dumps(dataclasses.asdict(value))
            elif isinstance(value, str):
                out[f.name] = value
            else:
                out[f.name] = json.dumps(value if not isinstance(value, Mapping) else dict(value))
        return out

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "PipelineParams":
        """Inverse of ``to_parameters``; an unknown or missing key is an error."""
        params = {k: v for k, v in params.items() if k not in TRITON_PARAMETERS}
        defaults, values = {}, {}
        request_fields = {f.name: f for f in dataclasses.fields(Request)}
        for key, raw in params.items():
            if key.startswith("default_") and key[8:] in request_fields:
                name = key[8:]
                defaults[name] = raw if request_fields[name].type in ("str", str) else json.loads(raw)
                continue
            f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
            if f is None or f.name == "defaults":
                raise ValueError(f"pipeline parameter {key!r} is not part of the contract")
            if f.type in ("str", str):
                values[key] = raw
            elif f.type in ("NetworkNames", NetworkNames):
                values[key] = NetworkNames(**json.loads(raw))
            else:
                value = json.loads(raw)
                values[key] = _tuples(value) if isinstance(value, list) else value
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.name != "defaults"
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"pipeline parameters missing: {missing}")
        return cls(defaults=Request(**defaults), **values)


def _tuples(value: list):
    return tuple(_tuples(v) if isinstance(v, list) else v for v in value)


def model_inputs(params: PipelineParams, stream: bool) -> tuple[IOField, ...]:
    """The inputs of the unary (``stream=False``) or stream model of a deployment: the
    contract's, PREVIEW_EVERY on the stream model, the size conditioning on SDXL's,
    INIT_IMAGE where a VAE encoder is served."""
    return ((STREAM_INPUTS if stream else INPUTS)
            + (SIZE_INPUTS if params.conditioning == "sdxl" else ())
            + (IMAGE_INPUTS if params.img2img else ()))
