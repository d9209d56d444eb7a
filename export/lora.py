"""``--lora PATH[:SCALE]``: diffusers/PEFT LoRA weights fused into the denoiser and the text
encoders before the UNet is cut, so every exported model carries them and serving costs nothing.

The loading, the per-adapter scales and the fusion are diffusers' own (``load_lora_weights``,
``set_adapters``, ``fuse_lora``, ``unload_lora_weights``) on a pipeline built around the modules
export already loaded: the fused weights are what diffusers computes with the LoRA active.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

FLAG = "--lora"
# The first (down) matrix of one LoRA layer, in the key styles diffusers' lora_state_dict returns.
_DOWN_KEY = re.compile(
    r"\.(lora_A|lora\.down|lora_linear_layer\.down|lora_down)(\.[^.]+)?\.weight$")
LORA_MODULES = ("unet", "text_encoder", "text_encoder_2")  # what export loads and fuses into


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: a folder or file as ``save_lora_weights`` writes it, and its scale."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH`` or ``PATH:SCALE``; an existing path that contains ``:`` is kept whole."""
        path, sep, tail = text.rpartition(":")
        if not sep or Path(text).exists():
            return cls(Path(text))
        try:
            scale = float(tail)
        except ValueError:
            raise ValueError(f"{FLAG} {text!r}: the scale after ':' must be a number, got {tail!r}")
        if not math.isfinite(scale):
            raise ValueError(f"{FLAG} {text!r}: the scale must be finite, got {tail!r}")
        return cls(Path(path), scale)


@dataclass(frozen=True)
class FusedLora:
    spec: LoraSpec
    layers: dict[str, int]  # module name -> LoRA layers fused into it

    def note(self) -> str:
        where = ", ".join(f"{name} ({n} layers)" for name, n in self.layers.items())
        return f"LoRA {self.spec.path} fused at scale {self.spec.scale:g} into {where}"


def check_loras(specs, model: str) -> None:
    """What can be checked before loading anything: the paths exist and ``model`` is a diffusers
    pipeline folder whose pipeline class loads LoRAs."""
    if not specs:
        return
    for spec in specs:
        if not spec.path.exists():
            raise ValueError(f"{FLAG} {spec.path}: no such file or folder")
        if spec.path.is_dir() and not any(spec.path.glob("*.safetensors")) \
                and not any(spec.path.glob("*.bin")):
            raise ValueError(f"{FLAG} {spec.path}: the folder has no .safetensors or .bin weights "
                             "(expected what save_lora_weights writes, e.g. "
                             "pytorch_lora_weights.safetensors)")
    pipeline_class(model)


def pipeline_folder(model: str) -> Path:
    from asyncdiff.configs import resolve

    src = resolve(model)
    folder = Path(src.name)
    if src.unet_dir is not None and src.unet_dir.name == "transformer":
        raise ValueError(f"{FLAG} is not supported for a DiT (SD3 / FLUX transformer) yet")
    if src.unet_dir is None or src.unet_dir != folder / "unet" \
            or not (folder / "model_index.json").is_file():
        raise ValueError(f"{FLAG} needs --model to be a diffusers pipeline folder (with "
                         f"model_index.json and unet/); {model!r} is not one")
    return folder


def pipeline_class(model: str):
    """The folder's diffusers pipeline class; it must have diffusers' LoRA loader."""
    import diffusers

    folder = pipeline_folder(model)
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        raise ValueError(f"{FLAG}: {model!r} is a {name} pipeline, which diffusers cannot load "
                         "LoRA weights into")
    return cls


def fuse_into(source, specs) -> list[FusedLora]:
    """Fuse ``specs`` into the modules of ``source`` (an ``export.cli.Source``) in place."""
    if not specs:
        return []
    modules = {name: getattr(source, name) for name in LORA_MODULES
               if getattr(source, name, None) is not None}
    return fuse_loras(source.name, modules, specs)


def fuse_loras(model: str, modules: dict[str, torch.nn.Module], specs) -> list[FusedLora]:
    """Load every LoRA as its own adapter, weight them by their scales, fuse them into the
    weights of ``modules`` and remove the adapter layers: the modules stay plain diffusers /
    transformers models with changed weights (unchanged when this raises)."""
    check_loras(specs, model)
    with _quiet():
        pipe = _pipeline(model, modules)
        try:
            return _fuse(pipe, model, modules, specs)
        finally:
            pipe.unload_lora_weights()  # keeps fused weights, drops the adapter layers


@contextlib.contextmanager
def _quiet():
    """No loading bars or per-module warnings (e.g. "no LoRA keys for the text encoder"): the
    export summary says what was fused where, and errors are raised."""
    from diffusers.utils import logging as dlog

    verbosity, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        dlog.set_verbosity(verbosity)
        if bars:
            dlog.enable_progress_bar()


def _fuse(pipe, model: str, modules: dict, specs) -> list[FusedLora]:
    names = [f"lora_{i}" for i in range(len(specs))]
    fused = []
    for name, spec in zip(names, specs):
        expected = _expected_layers(pipe, spec)
        try:
            where, kwargs = _location(spec)
            pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise ValueError(f"{FLAG} {spec.path}: diffusers could not load it into "
                             f"{model}: {e}") from e
        layers = {c: n for c in pipe._lora_loadable_modules
                  if (n := _adapter_layers(getattr(pipe, c, None), name))}
        if not layers:
            raise ValueError(f"{FLAG} {spec.path}: its keys match no module of "
                             f"{', '.join(modules)} (is it a LoRA for another model family?)")
        for c, n in expected.items():
            if layers.get(c, 0) != n:
                raise ValueError(f"{FLAG} {spec.path}: only {layers.get(c, 0)} of its {n} LoRA "
                                 f"layers for {c} match a module of the model")
        fused.append(FusedLora(spec, layers))
    with torch.no_grad():
        pipe.set_adapters(names, [s.scale for s in specs])
        order = pipe._lora_loadable_modules
        touched = sorted({c for f in fused for c in f.layers}, key=order.index)
        pipe.fuse_lora(components=touched, lora_scale=1.0, adapter_names=names)
    return fused


def _pipeline(model: str, modules: dict):
    """The folder's pipeline around ``modules``; nothing else is loaded (LoRA loading needs only
    the denoiser and the text encoders)."""
    cls = pipeline_class(model)
    folder = pipeline_folder(model)
    index = json.loads((folder / "model_index.json").read_text())
    skipped = {k: None for k, v in index.items()
               if not k.startswith("_") and isinstance(v, list) and k not in modules}
    pipe = cls.from_pretrained(folder, **modules, **skipped)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _location(spec: LoraSpec) -> tuple[str, dict]:
    """diffusers' (folder, kwargs) for a LoRA folder or a weights file."""
    if spec.path.is_dir():
        return str(spec.path), {}
    return str(spec.path.parent), {"weight_name": spec.path.name}


def _expected_layers(pipe, spec: LoraSpec) -> dict[str, int]:
    """Module name -> LoRA layers the file holds for it; weights for a module the pipeline does
    not have are an error (diffusers would skip them silently)."""
    where, kwargs = _location(spec)
    try:
        state_dict, _ = pipe.lora_state_dict(where, **kwargs)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ValueError(f"{FLAG} {spec.path}: not a LoRA diffusers can read: {e}") from e
    counts: dict[str, int] = {}
    for key in state_dict:
        if _DOWN_KEY.search(key):
            prefix = key.split(".", 1)[0]
            counts[prefix] = counts.get(prefix, 0) + 1
    unknown = sorted(set(counts) - set(pipe._lora_loadable_modules))
    if unknown:
        raise ValueError(f"{FLAG} {spec.path}: it has weights for {', '.join(unknown)}, which a "
                         f"{type(pipe).__name__} does not have")
    if not counts:
        raise ValueError(f"{FLAG} {spec.path}: no LoRA layers found in it")
    return counts


def _adapter_layers(module, adapter: str) -> int:
    """How many layers of ``module`` carry the adapter ``adapter``."""
    if module is None:
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules()
               if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
