"""Component modules: one share of the denoiser (UNet, SD3, FLUX) with a named tensor interface.

``Component.forward(*inputs)`` takes tensors in ``input_names`` order and
returns a tuple in ``output_names`` order, so it exports to ONNX with those
names and serves as a Triton model unchanged.  A component holds only its own
stages (plus the small time embedding when its stages need it): its
``state_dict`` is its share of the denoiser.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from asyncdiff.partition import NOISE_PRED, ComponentSpec, Partition
from asyncdiff.stages import StageGraph, build_stage_graph, run_stages

WEIGHTS_FILE = "component.safetensors"
SPEC_FILE = "component.json"


class Component(nn.Module):
    def __init__(self, graph: StageGraph, spec: ComponentSpec):
        super().__init__()
        self.index = spec.index
        self.input_names = spec.input_names
        self.output_names = spec.output_names
        self.stages = nn.ModuleList([graph.stages[graph.index(n)] for n in spec.stages])
        needs_temb = any(s.needs_temb for s in self.stages)
        self.time_embedding = graph.time_embedding if needs_temb else None
        self.final = graph.stages[-1].name  # its output is the noise prediction
        # The outer ring's front: its stages before the gap in stage order (all when none).
        idx = [graph.index(n) for n in spec.stages]
        self.front = next((j for j in range(1, len(idx)) if idx[j] != idx[j - 1] + 1), len(idx))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = run_stages(self.stages, self.time_embedding, dict(zip(self.input_names, inputs)))
        return tuple(env[self.final if n == NOISE_PRED else n] for n in self.output_names)

    def run(self, tensors: dict[str, torch.Tensor], section: str = "all") -> dict[str, torch.Tensor]:
        """Named-in, named-out convenience for executors. ``section="front"``: only the outer
        ring's front stages, and only the outputs they produce."""
        if section != "front":
            outs = self(*(tensors[n] for n in self.input_names))
            return dict(zip(self.output_names, outs))
        env = run_stages(self.stages[:self.front], self.time_embedding, dict(tensors))
        return {n: env[n] for n in self.output_names if n != NOISE_PRED}


def build_components(unet_or_graph, partition: Partition) -> list[Component]:
    graph = unet_or_graph if isinstance(unet_or_graph, StageGraph) else build_stage_graph(unet_or_graph)
    return [Component(graph, spec).eval() for spec in partition.components]


def save_component(component: Component, unet_config: dict, spec: ComponentSpec, out_dir: Path) -> None:
    """Write what ``load_component`` needs: the spec, the denoiser config and this share's
    weights (``denoiser_kind`` tells from the config which model to rebuild)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"unet_config": _jsonable(unet_config), "spec": asdict(spec)}
    (out_dir / SPEC_FILE).write_text(json.dumps(meta, indent=1))
    state = {k: v.contiguous() for k, v in component.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))


def load_component(version_dir: str | Path, device: str = "cpu") -> Component:
    """Rebuild one component from ``save_component`` output, loading only its own weights."""
    from safetensors.torch import load_file

    from asyncdiff.configs import denoiser_class

    version_dir = Path(version_dir)
    meta = json.loads((version_dir / SPEC_FILE).read_text())
    with torch.device("meta"):
        unet = denoiser_class(meta["unet_config"]).from_config(meta["unet_config"])
    spec = ComponentSpec.from_json(meta["spec"])
    component = Component(build_stage_graph(unet), spec)
    component.load_state_dict(load_file(str(version_dir / WEIGHTS_FILE), device=device), assign=True)
    return component.eval()


def _jsonable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if not k.startswith("_") or k == "_class_name"}
