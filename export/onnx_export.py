"""ONNX export of the networks a deployment needs, each checked against torch.

A ``Network`` is anything with a fixed named interface: one UNet component
(``asyncdiff.components.Component``), the text encoder (``input_ids`` ->
``last_hidden_state``; SDXL's two encoders: ``input_ids`` ->
``penultimate_hidden_state`` (+ ``text_embeds``, the second encoder's projected
pooled output)), the VAE decoder (``latents`` -> ``image``) or img2img's VAE
encoder (``image`` -> ``latent_moments``).
``export_network`` writes one self-contained ``.onnx`` file (opset 17,
TorchScript exporter, dim 0 dynamic), runs ``onnx.checker`` on it and
compares onnxruntime (CPU) with the fp32 torch module at the export batch
and at a different batch, raising ``ParityError`` above the tolerance.

Several resolutions (``sizes``): a network with spatial dims (``Network.sized_inputs``:
the UNet components, the VAE) is traced once at the default size, with every dim that
differs between the sizes dynamic, and validated at each other size too; a graph that
bakes its export size in (a reshape or upsample to a traced constant) fails there.

Under fp16 a network whose fp16 graph is not type-consistent, or that says it
overflows (an upcast VAE), is exported fp32 and its ``Artifact.fp32_reason``
says why; every artifact's IO dtypes are the ones its graph declares.

Tolerances: fp32 graphs must match to ``FP32_TOL`` (absolute). fp16 graphs
are compared with the fp32 module, i.e. the check measures what the fp16
deployment loses, so they get ``FP16_REL_TOL`` times the reference's
largest magnitude (at least 1).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
# Tensor names of the text encoder and VAE decoder graphs (the pipeline config repeats them).
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "last_hidden_state"
VAE_INPUT, VAE_OUTPUT = "latents", "image"
FP32_TOL = 1e-4
FP16_REL_TOL = 1e-2


class ParityError(RuntimeError):
    """onnxruntime's result differs from torch's by more than the tolerance."""


@dataclass(frozen=True)
class IOSpec:
    """A tensor of a network interface; ``shape`` excludes the batch dim."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass
class Network:
    """A torch module with a named interface and a source of example inputs."""

    name: str  # the Triton model name
    module: nn.Module  # fp32 reference
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]]  # fp32 inputs at a batch size
    keep_fp32: frozenset[str] = frozenset()  # float inputs never cast to fp16 (timestep)
    fp32_reason: str | None = None  # set: export fp32 even under --fp16 (e.g. VAEs that overflow)
    # Networks with spatial dims: fp32 inputs at a batch and a latent (height, width), the
    # default size giving what ``make_inputs`` gives. None: no dim follows the image size.
    sized_inputs: Callable[[int, tuple[int, int]], tuple[torch.Tensor, ...]] | None = None

    def inputs(self, batch: int, fp16: bool) -> tuple[torch.Tensor, ...]:
        return self.cast(self.make_inputs(batch), fp16)

    def cast(self, tensors: tuple[torch.Tensor, ...], fp16: bool) -> tuple[torch.Tensor, ...]:
        if not fp16:
            return tensors
        return tuple(
            t.half() if t.is_floating_point() and n not in self.keep_fp32 else t
            for n, t in zip(self.input_names, tensors)
        )


@dataclass
class Check:
    batch: int
    max_abs_err: float
    tolerance: float
    size: tuple[int, int] | None = None  # latent (height, width); None: the default size

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tolerance  # False for NaN too


@dataclass
class Artifact:
    name: str
    path: Path  # the file the runtime loads
    runtime: str  # onnxruntime | torch
    fp16: bool
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    seconds: float  # export + checker + validation
    checks: list[Check] = field(default_factory=list)
    fp32_reason: str | None = None  # why fp16 was asked for but this network stayed fp32
    # Exported at several sizes: latent (height, width) -> input name -> shape without the
    # batch dim, the default size first (TensorRT builds one profile per size). Else empty.
    size_shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def max_abs_err(self) -> float:
        return max((c.max_abs_err for c in self.checks), default=float("nan"))


def export_network(net: Network, path: Path, batch: int, fp16: bool = False,
                   validate: bool = True, sizes: Sequence[tuple[int, int]] = ()) -> Artifact:
    """Export ``net`` to ``path`` and (by default) validate it; raises ``ParityError``.

    Under ``fp16`` a network stays fp32 when it says why (``Network.fp32_reason``) or when its
    fp16 graph mixes float types (strict ONNX type inference rejects it; onnxruntime would
    refuse to load it); ``Artifact.fp32_reason`` records which. IO dtypes are the graph's.

    ``sizes``: latent (height, width) of every exported resolution, the default first. With
    more than one, a network with ``sized_inputs`` gets dynamic spatial dims (``-1`` in its
    IO specs) and is validated at each size (at the export batch).
    """
    start = time.perf_counter()
    reason = net.fp32_reason if fp16 else None
    half = fp16 and reason is None
    path.parent.mkdir(parents=True, exist_ok=True)
    refs, axes = sized_references(net, batch, sizes)
    example, outputs = _export(net, path, batch, half, axes)
    if half and (conflict := type_conflict(path)):
        reason, half = f"its fp16 graph mixes float types ({conflict})", False
        example, outputs = _export(net, path, batch, half, axes)
    check_graph(path)
    artifact = Artifact(
        net.name, path, "onnxruntime", half, graph_io_specs(path, net.input_names, example, axes),
        graph_io_specs(path, net.output_names, outputs, axes), 0.0, fp32_reason=reason,
        size_shapes=_size_shapes(net, refs),
    )
    if validate:
        artifact.checks = [validate_onnx(net, path, b, half) for b in (batch, batch + 1)]
        artifact.checks += [validate_onnx(net, path, batch, half, size, refs[size])
                            for size in list(refs)[1:]]
    artifact.seconds = time.perf_counter() - start
    raise_on_failure(artifact)
    return artifact


Tensors = tuple[torch.Tensor, ...]
Reference = tuple[Tensors, Tensors]  # fp32 inputs, torch's fp32 outputs


def sized_references(net: Network, batch: int, sizes: Sequence[tuple[int, int]]
                     ) -> tuple[dict[tuple[int, int], Reference], dict[str, tuple[int, ...]]]:
    """Torch's inputs and outputs at each of ``sizes`` (latent (h, w), the default first), and
    the dynamic dims beside the batch: those whose size differs between ``sizes``, by tensor
    name. Nothing for a single size or a network without spatial dims."""
    if net.sized_inputs is None or len(sizes) < 2:
        return {}, {}
    refs = {}
    for size in dict.fromkeys(tuple(s) for s in sizes):
        inputs = net.sized_inputs(batch, size)
        with torch.no_grad():
            refs[size] = inputs, _as_tuple(net.module(*inputs))
    names = [*net.input_names, *net.output_names]
    shapes = [[t.shape for t in (*ins, *outs)] for ins, outs in refs.values()]
    axes = {}
    for i, name in enumerate(names):
        dims = {len(s[i]) for s in shapes}
        if len(dims) != 1:
            raise ParityError(f"{net.name}: {name} changes rank between sizes {list(refs)}")
        moving = tuple(d for d in range(1, dims.pop()) if len({s[i][d] for s in shapes}) > 1)
        if moving:
            axes[name] = moving
    return refs, axes


def _size_shapes(net: Network, refs: dict) -> dict[tuple[int, int], dict[str, tuple[int, ...]]]:
    return {size: {n: tuple(t.shape[1:]) for n, t in zip(net.input_names, inputs)}
            for size, (inputs, _) in refs.items()}


def _export(net: Network, path: Path, batch: int, fp16: bool, axes=None):
    """Write the graph; returns the example inputs and torch's outputs (their shapes)."""
    module = _half_copy(net.module) if fp16 else net.module
    example = net.inputs(batch, fp16)
    with torch.no_grad():
        outputs = _as_tuple(module(*example))
        _torch_export(module, example, path, net.input_names, net.output_names, axes)
    return example, outputs


def type_conflict(path: Path) -> str | None:
    """The first type conflict strict ONNX type inference finds in the graph, or None."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # types only: skip the weights
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        return str(e).strip().splitlines()[0]
    return None


def graph_io_specs(path: Path, names, tensors, axes=None) -> list[IOSpec]:
    """IO specs with the dtype the ONNX graph declares (torch's dtypes can differ: an fp16
    module may still emit fp32) and the shape of the example ``tensors``, -1 where ``axes``
    (name -> dynamic dims, batch = 0) makes a dim dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    declared = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                for v in [*graph.input, *graph.output]}
    return [IOSpec(n, np.dtype(declared[n]), _dynamic_shape(t.shape, (axes or {}).get(n, ())))
            for n, t in zip(names, tensors)]


def _dynamic_shape(shape, axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its batch dim, -1 at ``axes`` (counted with the batch dim)."""
    return tuple(-1 if d in axes else int(n) for d, n in enumerate(shape) if d > 0)


def raise_on_failure(artifact: "Artifact") -> None:
    failed = [c for c in artifact.checks if not c.ok]
    if failed:
        raise ParityError(
            f"{artifact.name}: {artifact.runtime} differs from torch by {failed[0].max_abs_err:.3g} "
            f"at batch {failed[0].batch}"
            + (f", latent {failed[0].size[0]}x{failed[0].size[1]}" if failed[0].size else "")
            + f" (tolerance {failed[0].tolerance:.3g}); {artifact.path}"
        )


def save_torch_component(net: Network, unet_config: dict, spec, version_dir: Path, batch: int,
                         fp16: bool = False, validate: bool = True,
                         sizes: Sequence[tuple[int, int]] = ()) -> Artifact:
    """The torch runtime's artifact: ``save_component`` output, reloaded and checked (at each
    of ``sizes`` too, as ``export_network``)."""
    from asyncdiff.components import WEIGHTS_FILE, load_component, save_component

    start = time.perf_counter()
    module = _half_copy(net.module) if fp16 else net.module
    save_component(module, unet_config, spec, version_dir)
    refs, axes = sized_references(net, batch, sizes)
    example = net.inputs(batch, fp16)
    with torch.no_grad():
        outputs = _as_tuple(module(*example))
    artifact = Artifact(net.name, Path(version_dir) / WEIGHTS_FILE, "torch", fp16,
                        _io_specs(net.input_names, example, axes),
                        _io_specs(net.output_names, outputs, axes), 0.0,
                        size_shapes=_size_shapes(net, refs))
    if validate:
        loaded = load_component(version_dir)

        def run(feeds):
            with torch.no_grad():
                return [t.numpy() for t in loaded(*(torch.from_numpy(feeds[n]) for n in net.input_names))]

        artifact.checks = [compare(net, b, fp16, run) for b in (batch, batch + 1)]
        artifact.checks += [compare(net, batch, fp16, run, size, refs[size])
                            for size in list(refs)[1:]]
    artifact.seconds = time.perf_counter() - start
    raise_on_failure(artifact)
    return artifact


def check_graph(path: Path) -> None:
    import onnx

    # Path form: the checker then also handles models over the 2 GB protobuf limit.
    onnx.checker.check_model(str(path))


def validate_onnx(net: Network, path: Path, batch: int, fp16: bool,
                  size: tuple[int, int] | None = None, reference: Reference | None = None) -> Check:
    """Max abs difference between onnxruntime on ``path`` and the fp32 torch module (at latent
    ``size``: ``reference`` holds torch's inputs and outputs there)."""
    sess = session(str(path))
    return compare(net, batch, fp16, lambda feeds: sess.run(net.output_names, feeds), size,
                   reference)


def compare(net: Network, batch: int, fp16: bool, run: Callable[[dict], list],
            size: tuple[int, int] | None = None, reference: Reference | None = None) -> Check:
    """Run ``run`` (numpy feeds by name -> outputs in order) against the fp32 torch module, at
    the default size or at latent ``size`` (``reference``: torch's inputs and outputs there)."""
    if reference is None:
        inputs = net.make_inputs(batch)  # drawn once: the same values feed both sides
        with torch.no_grad():
            reference = inputs, _as_tuple(net.module(*inputs))
    inputs, expected = reference
    feeds = {n: t.numpy() for n, t in zip(net.input_names, net.cast(inputs, fp16))}
    try:
        outputs = run(feeds)
    except Exception as e:  # e.g. a Reshape to the export size's constant shape
        if size is None:
            raise
        raise ParityError(f"{net.name} does not run at latent {size[0]}x{size[1]} (height x "
                          f"width), a size it was exported for: its graph bakes in the export "
                          f"size ({str(e).strip().splitlines()[0][:300]})") from None
    err, scale = 0.0, 1.0
    for name, ref, out in zip(net.output_names, expected, outputs, strict=True):
        ref, out = ref.float().numpy(), np.asarray(out, dtype=np.float32)
        if out.shape != ref.shape:
            raise ParityError(f"{net.name}: output {name} has shape {list(out.shape)} where torch "
                              f"gives {list(ref.shape)}"
                              + (f" at latent {size[0]}x{size[1]}: its graph bakes in the export "
                                 "size" if size else ""))
        err = max(err, float(np.abs(out - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return Check(batch, err, FP16_REL_TOL * scale if fp16 else FP32_TOL, size)


@lru_cache(maxsize=4)
def session(path: str):
    """A single-threaded CPU onnxruntime session (cached: validation runs it twice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _rms_norm(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (torch.nn.RMSNorm: FLUX's q/k norms) in opset-17 ops; ONNX has
    RMSNormalization only from opset 23. Computed in fp32 like torch does for fp16 inputs."""
    from torch.onnx import symbolic_helper as sh

    dims = len(sh._get_const(normalized_shape, "is", "normalized_shape"))
    eps = torch.finfo(torch.float32).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    xf = g.op("Cast", x, to_i=1)  # TensorProto.FLOAT
    mean = g.op("ReduceMean", g.op("Mul", xf, xf), axes_i=list(range(-dims, 0)), keepdims_i=1)
    eps = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    y = g.op("CastLike", g.op("Div", xf, g.op("Sqrt", g.op("Add", mean, eps))), x)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


@contextlib.contextmanager
def _traceable_unflatten():
    """``Tensor.unflatten`` traces into a Reshape to the example's constant shape, baking the
    export batch into the graph (FLUX's attention splits heads with it); a reshape built from
    the traced sizes keeps dim 0 dynamic."""
    original = torch.Tensor.unflatten

    def unflatten(self, dim, sizes):
        dim = dim % self.dim()
        return self.reshape(*self.shape[:dim], *sizes, *self.shape[dim + 1:])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


def _torch_export(module, example, path, input_names, output_names, dynamic=None) -> None:
    """``dynamic``: tensor name -> dims beside the batch that stay dynamic (spatial dims)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
    axes = {name: {0: "batch", **{d: f"{name}_{d}" for d in (dynamic or {}).get(name, ())}}
            for name in [*input_names, *output_names]}
    with warnings.catch_warnings(), _traceable_unflatten():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer warnings
        torch.onnx.export(
            module, tuple(example), str(path), opset_version=OPSET, dynamo=False,
            input_names=list(input_names), output_names=list(output_names), dynamic_axes=axes,
        )
    session.cache_clear()  # a file at the same path may have been cached before


def _half_copy(module: nn.Module) -> nn.Module:
    # Components share their modules with the UNet: cast a copy, never the original.
    return copy.deepcopy(module).half().eval()


def _io_specs(names, tensors, axes=None) -> list[IOSpec]:
    return [IOSpec(n, np.dtype(str(t.dtype).removeprefix("torch.")),
                   _dynamic_shape(t.shape, (axes or {}).get(n, ())))
            for n, t in zip(names, tensors)]


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


# -- the networks of a Stable Diffusion deployment ---------------------------

class InterfaceSampler:
    """Realistic tensors for every name of a partition interface, at any batch size and
    latent size (default: the one given here).

    One pass of the whole stage graph on seeded inputs gives each stage's
    output, so a component is validated on activations of the right scale
    rather than on noise.
    """

    def __init__(self, graph, latent_height: int, latent_width: int, seed: int = 0):
        self.graph, self.height, self.width, self.seed = graph, latent_height, latent_width, seed
        self._cache: dict[tuple[int, tuple[int, int]], dict[str, torch.Tensor]] = {}

    def inputs(self, names: list[str], batch: int,
               size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        key = batch, tuple(size or (self.height, self.width))
        if key not in self._cache:
            self._cache[key] = self._run(*key)
        return tuple(self._cache[key][n] for n in names)

    @torch.no_grad()
    def _run(self, batch: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        from asyncdiff.profile import stage_inputs

        inputs = stage_inputs(self.graph, batch, *size, seed=self.seed)
        return self.graph.run(dict(inputs))


def component_network(component, sampler: InterfaceSampler) -> Network:
    names = list(component.input_names)
    return Network(
        f"unet_part_{component.index}", component, names, list(component.output_names),
        lambda batch: sampler.inputs(names, batch),
        # The timestep feeds a sinusoidal embedding computed in fp32 anyway.
        keep_fp32=frozenset({"timestep"}),
        sized_inputs=lambda batch, size: sampler.inputs(names, batch, size),
    )


class _TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids).last_hidden_state


class _PenultimateTextEncoder(nn.Module):
    """SDXL's text encoder outputs: the penultimate hidden states (before the final layer norm),
    and with a projection (``CLIPTextModelWithProjection``) the projected pooled embedding."""

    def __init__(self, encoder: nn.Module, pooled: bool):
        super().__init__()
        self.encoder, self.pooled = encoder, pooled

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class _PooledTextEncoder(nn.Module):
    """FLUX's CLIP: only the (unprojected) pooled output, ``pooler_output``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, output_hidden_states=False).pooler_output


class _VaeDecoder(nn.Module):
    """``vae.decode(z).sample`` only: the 1/scaling_factor step stays in the pipeline (BLS),
    so this graph is the plain decoder and the factor is a visible config parameter."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def text_encoder_network(encoder: nn.Module, seed: int = 0, *, name: str = "text_encoder",
                         penultimate: bool = False, tokens: int | None = None,
                         pooled_only: bool = False) -> Network:
    """SD (and SD3's T5): ``input_ids`` -> ``last_hidden_state``. ``penultimate`` (SDXL, SD3's
    CLIPs): ``input_ids`` -> ``penultimate_hidden_state``, plus ``text_embeds`` when the encoder
    has a projection (text_encoder_2; both of SD3's). ``tokens``: the padded sequence length
    (default CLIP's max_position_embeddings; T5 has no such limit: SD3 pads it to 256).
    ``pooled_only`` (FLUX's CLIP): ``input_ids`` -> the pooled output ``text_embeds``."""
    from asyncdiff.conditioning import PENULTIMATE, POOLED

    vocab = int(encoder.config.vocab_size)
    # 77 for CLIP: the tokenizer pads to it
    seq_len = int(tokens or encoder.config.max_position_embeddings)

    def make(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed + batch)
        return (torch.randint(0, vocab, (batch, seq_len), generator=g, dtype=torch.int64),)

    if pooled_only:
        return Network(name, _PooledTextEncoder(encoder).eval(), [TEXT_INPUT], [POOLED], make)
    if not penultimate:
        return Network(name, _TextEncoder(encoder).eval(), [TEXT_INPUT], [TEXT_OUTPUT], make)
    pooled = hasattr(encoder, "text_projection")
    outputs = [PENULTIMATE, POOLED] if pooled else [PENULTIMATE]
    return Network(name, _PenultimateTextEncoder(encoder, pooled).eval(), [TEXT_INPUT], outputs,
                   make)


def vae_decoder_network(vae: nn.Module, latent_height: int, latent_width: int,
                        seed: int = 0) -> Network:
    channels = int(vae.config.latent_channels)

    def make(batch: int, size: tuple[int, int] = (latent_height, latent_width)):
        g = torch.Generator().manual_seed(seed + batch)
        return (torch.randn(batch, channels, *size, generator=g),)

    # force_upcast marks VAEs known to overflow in fp16 (SD-XL's): keep those fp32.
    upcast = bool(getattr(vae.config, "force_upcast", False))
    return Network("vae_decoder", _VaeDecoder(vae).eval(), [VAE_INPUT], [VAE_OUTPUT], make,
                   fp32_reason="its config sets force_upcast (it overflows in fp16)" if upcast
                   else None, sized_inputs=make)


class _VaeEncoder(nn.Module):
    """``asyncdiff.img2img.encode_moments``: image [B, 3, H, W] in [-1, 1] -> the posterior's
    moments (mean and log-variance on the channels). Sampling and the scaling factor stay in
    the pipeline (BLS): they need the request's seeds."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from asyncdiff.img2img import encode_moments

        return encode_moments(self.vae, image)


def vae_encoder_network(vae: nn.Module, height: int, width: int, seed: int = 0) -> Network:
    """img2img's VAE encoder at ``height`` x ``width`` pixels: ``image`` -> ``latent_moments``
    (names: ``asyncdiff.contract.VAE_ENCODER``); always 3 channels in (a one-channel VAE
    takes their luma inside the graph)."""
    from asyncdiff.contract import VAE_ENCODER

    px = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell

    def make(batch: int, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        # size: latent (h, w) of another exported resolution (Network.sized_inputs)
        pixels = (height, width) if size is None else (size[0] * px, size[1] * px)
        g = torch.Generator().manual_seed(seed + batch)
        return (torch.rand(batch, 3, *pixels, generator=g) * 2 - 1,)

    upcast = bool(getattr(vae.config, "force_upcast", False))  # as vae_decoder_network
    return Network(VAE_ENCODER.model, _VaeEncoder(vae).eval(), [VAE_ENCODER.input],
                   [VAE_ENCODER.output], make,
                   fp32_reason="its config sets force_upcast (it overflows in fp16)" if upcast
                   else None, sized_inputs=make)
