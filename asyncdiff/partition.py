"""Balanced partition of a denoiser's stage graph (UNet, SD3, FLUX) into N components, with
each component's interface.

Components are contiguous runs of stages chosen to minimise the largest
component cost (exact dynamic programme).  Options:

* ``layout="outer_ring"``: the paper's SDXL layout -- the last component holds
  the first and the last stages (the high-resolution ring), the others split
  the deep middle sequentially.  Executable: its plan (``make_plan(ring=True)``)
  runs the ring's front before component 0 in warm-up; ``ring_balance`` compares
  it with the sequential cut of the same stages.
* ``batched_stride=True`` (stride 2 on N devices): the last component runs
  both timesteps of a round on its device, so it is balanced at twice its cost.

A component's interface lists only tensors that cross a cut: its inputs are
the latent ``sample`` (if it holds ``conv_in``), the hidden state and skip
tensors produced by other components, and ``timestep`` /
``encoder_hidden_states`` / ``text_embeds`` / ``time_ids`` where its stages
need them; its outputs are the stage outputs other components consume, and
``noise_pred`` for the component holding ``conv_out``.  Tensor names are the
names of the stages that produce them (see ``asyncdiff.stages``).  A DiT's
components pass image and text tokens instead (roles ``image_tokens`` /
``text_tokens``, see ``asyncdiff.dit``) and take ``pooled_projections`` (+ FLUX's
``guidance``, ``img_ids``, ``txt_ids``) where the UNet takes text_embeds/time_ids.

``cuts`` (stage names) replace the balancer to reproduce a given split.

CLI::

    python -m asyncdiff.partition --model sd21-full --components 3 --height 768 --width 768
    python -m asyncdiff.partition --model sd21-full --cuts mid,up3_0   # the AsyncDiff N=3 split
    python -m asyncdiff.partition --model flux-dev --components 2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asyncdiff.profile import StageProfile

LAYOUTS = ("sequential", "outer_ring")
NOISE_PRED = "noise_pred"
# Roles of the activations that cross cuts (the rest are pipeline inputs and noise_pred).
ACTIVATION_ROLES = ("hidden", "skip", "image_tokens", "text_tokens")
# Roles of the per-request conditioning a component may take besides latent and timestep.
CONDITIONING_ROLES = ("text", "text_embeds", "time_ids", "pooled", "guidance", "img_ids", "txt_ids")


@dataclass
class TensorSpec:
    name: str
    shape: list[int]  # batch first
    role: str  # latent | timestep | CONDITIONING_ROLES | ACTIVATION_ROLES | noise_pred
    producer: int | None = None  # component index, None for pipeline inputs
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ComponentSpec:
    index: int
    stages: list[str]
    cost: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_json(cls, data: dict) -> "ComponentSpec":
        return cls(
            data["index"], data["stages"], data["cost"],
            [TensorSpec(**t) for t in data["inputs"]], [TensorSpec(**t) for t in data["outputs"]],
        )

    @property
    def name(self) -> str:
        """The Triton model name of this component."""
        return f"unet_part_{self.index}"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Partition:
    model: str
    num_components: int
    stride: int
    layout: str
    batched_stride: bool
    batch: int
    latent_height: int
    latent_width: int
    cost_metric: str
    stage_names: list[str]
    stage_costs: list[float]
    skips: dict[str, str]  # consumer stage -> producer stage
    components: list[ComponentSpec] = field(default_factory=list)

    # -- queries -----------------------------------------------------------
    @property
    def total_cost(self) -> float:
        return sum(self.stage_costs)

    @property
    def cuts(self) -> list[str]:
        """The ``cuts`` that rebuild this partition (see ``assign_cuts``)."""
        return [self.stage_names[i] for i in range(1, len(self.stage_names))
                if self._owner(i) != self._owner(i - 1)]

    def _owner(self, i: int) -> int:
        return next(c.index for c in self.components if self.stage_names[i] in c.stages)

    def cost_share(self, k: int) -> float:
        return self.components[k].cost / self.total_cost if self.total_cost else 0.0

    def cross_bytes(self, bytes_per_element: int = 4) -> int:
        """Bytes of stage outputs crossing cuts per compute round (each consumer counted)."""
        total = 0
        for comp in self.components:
            total += sum(t.numel for t in comp.inputs if t.role in ACTIVATION_ROLES)
        return total * bytes_per_element

    # -- (de)serialisation ------------------------------------------------
    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Partition":
        comps = [ComponentSpec.from_json(c) for c in data["components"]]
        return cls(**{**data, "components": comps})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Partition":
        return cls.from_json(json.loads(Path(path).read_text()))


# -- balancing --------------------------------------------------------------

def split_contiguous(costs: list[float], n: int, last_weight: float = 1.0) -> list[int]:
    """Cut points ``[0, c1, ..., len(costs)]`` of n non-empty contiguous parts minimising the
    maximum part cost, the last part's cost multiplied by ``last_weight``."""
    s = len(costs)
    if not 1 <= n <= s:
        raise ValueError(f"components must be in [1, {s}] (the number of stages), got {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max cost of splitting stages [0, j) into k parts (weight 1).
    best = [[inf] * (s + 1) for _ in range(n + 1)]
    cut = [[0] * (s + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        weight = last_weight if k == n else 1.0
        for j in range(k, s - (n - k) + 1):
            for i in range(k - 1, j):
                cand = max(best[k - 1][i], weight * (prefix[j] - prefix[i]))
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    cuts, j = [s], s
    for k in range(n, 0, -1):
        j = cut[k][j]
        cuts.append(j)
    return cuts[::-1]


def assign_sequential(costs: list[float], n: int, last_weight: float = 1.0) -> list[list[int]]:
    cuts = split_contiguous(costs, n, last_weight)
    return [list(range(cuts[k], cuts[k + 1])) for k in range(n)]


def assign_outer_ring(costs: list[float], n: int, last_weight: float = 1.0) -> list[list[int]]:
    """Components 0..n-2 split a middle run [a, b); component n-1 holds [0, a) and [b, S)."""
    s = len(costs)
    if not 2 <= n <= s - 1:
        raise ValueError(f"outer_ring needs components in [2, {s - 1}], got {n}")
    best, best_parts = float("inf"), None
    for a in range(1, s - n + 1):
        for b in range(a + n - 1, s):
            ring = last_weight * (sum(costs[:a]) + sum(costs[b:]))
            if ring >= best:
                continue
            middle = split_contiguous(costs[a:b], n - 1)
            worst = max(ring, *(sum(costs[a + middle[k]:a + middle[k + 1]]) for k in range(n - 1)))
            if worst < best:
                best = worst
                best_parts = [list(range(a + middle[k], a + middle[k + 1])) for k in range(n - 1)]
                best_parts.append(list(range(a)) + list(range(b, s)))
    return best_parts


def assign_cuts(names: list[str], cuts: list[str], layout: str = "sequential") -> list[list[int]]:
    """Stage indices per component from explicit cut points.

    ``cuts`` name the stages where a new run of stages starts, in stage order; they split the
    stages into ``len(cuts) + 1`` runs. ``sequential``: run k is component k (N = len(cuts) + 1).
    ``outer_ring``: the first and the last run form the last component and the runs between are
    components 0..N-2 (N = len(cuts)).
    """
    where = {n: i for i, n in enumerate(names)}
    unknown = [c for c in cuts if c not in where]
    if unknown:
        raise ValueError(f"cuts: {', '.join(map(repr, unknown))} is not a stage; stages: "
                         f"{', '.join(names)}")
    idx = [where[c] for c in cuts]
    if idx and idx[0] == 0:
        raise ValueError(f"cuts: {names[0]!r} is the first stage; a cut starts the second or a "
                         f"later run, so it must be one of {', '.join(names[1:])}")
    for a, b in zip(cuts, cuts[1:]):
        if where[b] <= where[a]:
            raise ValueError(f"cuts must be strictly increasing in stage order: {b!r} comes at or "
                             f"before {a!r} (order: {', '.join(names)})")
    bounds = [0, *idx, len(names)]
    runs = [list(range(bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1)]
    if layout == "sequential":
        return runs
    if len(runs) < 3:
        raise ValueError(f"outer_ring needs at least 2 cuts (where the middle starts and where "
                         f"the ring resumes), got {len(cuts)}")
    return [*runs[1:-1], runs[0] + runs[-1]]


# -- interfaces -------------------------------------------------------------

def build_partition(
    profile: StageProfile,
    skips: dict[str, str],
    needs: dict[str, tuple[bool, bool]],
    num_components: int | None,
    *,
    model: str,
    stride: int = 1,
    layout: str = "sequential",
    batched_stride: bool = False,
    text_time: bool = False,
    assignment: list[list[int]] | None = None,
    cuts: list[str] | None = None,
    reads: dict[str, list[tuple[str, str]]] | None = None,
    writes: dict[str, list[str]] | None = None,
    cond_inputs: list[tuple[str, str]] | None = None,
) -> Partition:
    """Balance ``profile``'s stages into components and derive every component's interface.

    ``needs[stage] = (needs_temb, needs_text)``.  ``cuts`` (stage names, see ``assign_cuts``)
    or ``assignment`` (stage indices per component) override the balancer, e.g. to reproduce
    a published split.  ``reads`` / ``writes`` (per stage: (tensor, role) read, tensors
    written) and ``cond_inputs`` ((name, role) the time embedding needs) come from the stage
    graph (``graph_interface``); without them the UNet's chain + ``skips`` and ``text_time``
    give them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    weight = 2.0 if (stride == 2 and batched_stride) else 1.0
    if cuts is not None:
        assignment = assign_cuts(profile.names, list(cuts), layout)
        if num_components is not None and num_components != len(assignment):
            raise ValueError(
                f"components={num_components} disagrees with cuts {','.join(cuts)}: "
                f"{len(cuts)} cuts make {len(assignment)} components with layout {layout}")
    if assignment is None:
        if num_components is None:
            raise ValueError("give the number of components or cuts")
        assign = assign_outer_ring if layout == "outer_ring" else assign_sequential
        assignment = assign(profile.costs, num_components, weight)
    names = profile.names
    owner = {names[i]: k for k, idx in enumerate(assignment) for i in idx}
    if reads is None:
        reads = {st: [(prev, "hidden")] + ([(skips[st], "skip")] if st in skips else [])
                 for prev, st in zip(["sample", *names], names)}
        reads[names[0]] = [("sample", "latent")]
    writes = writes or {st: [st] for st in names}
    if cond_inputs is None:
        cond_inputs = [("timestep", "timestep")]
        if text_time:
            cond_inputs += [("text_embeds", "text_embeds"), ("time_ids", "time_ids")]
    # tensor -> owning component, for every stage output
    where = {t: owner[st] for st in names for t in writes[st]}
    batch = profile.input_shapes["sample"][0]
    height, width = profile.latent or profile.input_shapes["sample"][2:]
    part = Partition(
        model, len(assignment), stride, layout, batched_stride, batch, height, width,
        profile.metric, names, profile.costs, dict(skips),
    )
    for k, idx in enumerate(assignment):
        stages = [names[i] for i in idx]
        cost = sum(profile.costs[i] for i in idx)
        inputs = _inputs(k, stages, reads, where, needs, profile, cond_inputs)
        outputs = _outputs(k, stages, names, reads, writes, owner, profile)
        part.components.append(ComponentSpec(k, stages, cost, inputs, outputs))
    return part


def _inputs(k, stages, reads, where, needs, profile, cond_inputs) -> list[TensorSpec]:
    """The latent first, then foreign activations in stage order, then conditioning."""
    shapes, inp = profile.shapes, profile.input_shapes
    read = [(src, role) for st in stages for src, role in reads[st]]
    specs = [TensorSpec(src, inp[src], role) for src, role in read if src not in where]
    seen = set()
    for src, role in read:
        if src in where and where[src] != k and src not in seen:
            seen.add(src)
            specs.append(TensorSpec(src, shapes[src], role, producer=where[src]))
    if any(needs[s][0] for s in stages):
        specs += [TensorSpec(name, inp[name], role) for name, role in cond_inputs]
    if any(needs[s][1] for s in stages):
        specs.append(TensorSpec("encoder_hidden_states", inp["encoder_hidden_states"], "text"))
    return specs


def _outputs(k, stages, names, reads, writes, owner, profile) -> list[TensorSpec]:
    mine = {t for st in stages for t in writes[st]}
    consumers: dict[str, str] = {}  # tensor -> role of its first foreign consumer
    for st in names:
        for src, role in reads[st]:
            if src in mine and owner[st] != k:
                consumers.setdefault(src, role)
    specs = [TensorSpec(t, profile.shapes[t], consumers[t], producer=k)
             for st in stages for t in writes[st] if t in consumers]
    if names[-1] in stages:
        specs.append(TensorSpec(NOISE_PRED, profile.shapes[names[-1]], NOISE_PRED, producer=k))
    return specs


def graph_interface(graph) -> dict:
    """``build_partition``'s keywords that a stage graph determines."""
    return dict(
        needs={s.name: (s.needs_temb, s.needs_text) for s in graph.stages},
        skips=graph.skips(), text_time=graph.text_time,
        reads={s.name: s.reads() for s in graph.stages},
        writes={s.name: list(s.writes) for s in graph.stages},
        cond_inputs=list(graph.time_embedding.inputs),
    )


def partition_denoiser(
    unet,
    num_components: int | None,
    *,
    model: str,
    batch: int = 2,
    height: int | None = None,
    width: int | None = None,
    metric: str = "flops",
    stride: int = 1,
    layout: str = "sequential",
    batched_stride: bool = False,
    cuts: list[str] | None = None,
) -> Partition:
    """Profile the denoiser ``unet`` (a UNet, SD3 or FLUX transformer) at the latent size
    (default: its sample_size) and partition it: balanced, or at the stage names ``cuts``
    (``num_components`` may then be None)."""
    import torch

    from asyncdiff.configs import default_latent_size
    from asyncdiff.profile import profile_stages
    from asyncdiff.stages import build_stage_graph

    if metric == "flops":
        # Count on a weightless copy: FLOPs then do not depend on where the weights live
        # (attention kernels differ between devices), so every caller gets the same cuts.
        with torch.device("meta"):
            unet = type(unet).from_config(unet.config)
    graph = build_stage_graph(unet)
    height = height or default_latent_size(unet.config)
    width = width or default_latent_size(unet.config)
    profile = profile_stages(graph, batch, height, width, metric)
    return build_partition(
        profile, num_components=num_components, model=model, stride=stride, layout=layout,
        batched_stride=batched_stride, cuts=cuts, **graph_interface(graph),
    )


partition_unet = partition_denoiser  # the name the UNet-only callers use


# -- CLI --------------------------------------------------------------------

def projection(part: Partition, steps: int = 50, warmup: int = 1):
    """The cost model's ideal for this cut: its cost shares, free communication."""
    from asyncdiff.cost import project
    from asyncdiff.placement import Placement
    from asyncdiff.schedule import make_plan

    plan = make_plan(steps, part.num_components, part.stride, warmup,
                     ring=part.layout == "outer_ring")
    place = Placement(part.num_components, part.stride, part.batched_stride)
    return project(plan, place, [c.cost for c in part.components])


def describe(part: Partition, steps: int = 50, warmup: int = 1) -> str:
    """A human-readable table: cost share and interface tensors per component, the traffic per
    round and the projected speedup of ``steps`` steps with ``warmup`` warm-up steps."""
    unit = "GFLOP" if part.cost_metric == "flops" else "ms"
    scale = 1e-9 if part.cost_metric == "flops" else 1e3
    lines = [
        f"model={part.model} N={part.num_components} S={part.stride} layout={part.layout} "
        f"batch={part.batch} latent={part.latent_height}x{part.latent_width} "
        f"cost={part.cost_metric} cuts={','.join(part.cuts)}",
    ]
    for c in part.components:
        lines.append(
            f"\n[{c.name}] {len(c.stages)} stages {c.stages[0]}..{c.stages[-1]}  "
            f"cost {c.cost * scale:.2f} {unit} ({100 * part.cost_share(c.index):.1f}%)"
        )
        for direction, specs in (("in ", c.inputs), ("out", c.outputs)):
            for t in specs:
                src = f" from part {t.producer}" if direction == "in " and t.producer is not None else ""
                lines.append(
                    f"  {direction} {t.name:24s} {str(t.shape):22s} {t.role:12s} "
                    f"{t.numel * 4 / 1e6:8.3f} MB fp32{src}"
                )
    ideal = max(part.cost_share(k) for k in range(part.num_components))
    proj = projection(part, steps, warmup)
    if part.layout == "outer_ring":
        lines.append(ring_balance(part, steps, warmup))
    lines.append(
        f"\nlargest component {100 * ideal:.1f}% of the denoiser; "
        f"cross-cut traffic per round {part.cross_bytes() / 1e6:.3f} MB fp32"
        f"\nprojected speedup {proj.speedup:.2f}x for T={steps} w={warmup} "
        f"({proj.warmup_steps} warm-up steps, {proj.rounds} rounds): the ideal with this cut's "
        f"{part.cost_metric} shares and free communication (asyncdiff.cost)"
    )
    return "\n".join(lines)


def sequential_counterpart(part: Partition) -> Partition:
    """The balanced sequential cut of the same stages, costs and options."""
    weight = 2.0 if (part.stride == 2 and part.batched_stride) else 1.0
    assignment = assign_sequential(part.stage_costs, part.num_components, weight)
    out = Partition(part.model, part.num_components, part.stride, "sequential",
                    part.batched_stride, part.batch, part.latent_height, part.latent_width,
                    part.cost_metric, part.stage_names, part.stage_costs, part.skips)
    for k, idx in enumerate(assignment):
        stages = [part.stage_names[i] for i in idx]
        out.components.append(ComponentSpec(k, stages, sum(part.stage_costs[i] for i in idx),
                                            [], []))
    return out


def ring_balance(part: Partition, steps: int = 50, warmup: int = 1) -> str:
    """The outer ring's balance beside the balanced sequential cut of the same stages."""
    seq = sequential_counterpart(part)
    shares = lambda p: [100 * p.cost_share(k) for k in range(p.num_components)]  # noqa: E731
    fmt = lambda xs: "/".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return (f"\nouter ring vs sequential cut: largest component {max(shares(part)):.1f}% vs "
            f"{max(shares(seq)):.1f}% (shares {fmt(shares(part))} vs {fmt(shares(seq))}, "
            f"sequential cuts {','.join(seq.cuts)}); projected "
            f"{projection(part, steps, warmup).speedup:.2f}x vs "
            f"{projection(seq, steps, warmup).speedup:.2f}x for T={steps} w={warmup}")


def main(argv: list[str] | None = None) -> None:
    from asyncdiff.configs import (
        builtin_names, default_batch, default_latent_size, load_denoiser, resolve,
    )

    p = argparse.ArgumentParser(prog="python -m asyncdiff.partition", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help=f"denoiser/pipeline folder or one of {builtin_names()}")
    p.add_argument("--components", type=int, help="N (required unless --cuts gives it)")
    p.add_argument("--cuts", type=lambda v: [c for c in v.split(",") if c],
                   help="comma-separated stage names where components 1..N-1 start "
                        "(outer_ring: where the middle starts, ..., where the ring resumes)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--batched-stride", action="store_true", help="S=2 on N devices (balance last x2)")
    p.add_argument("--layout", default="sequential", choices=(*LAYOUTS, "outer-ring"),
                   help="outer-ring (= outer_ring): component N-1 holds the first and the last "
                   "stages, the paper's SDXL split")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--batch", type=int, help="denoiser batch (default: one prompt, i.e. 2 with "
                                              "CFG, 1 for a guidance-distilled FLUX)")
    p.add_argument("--cost", default="flops", choices=("flops", "time"))
    p.add_argument("--steps", type=int, default=50, help="denoising steps T of the projection")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps w of the projection")
    p.add_argument("--json", help="also write the partition JSON here")
    a = p.parse_args(argv)
    if a.components is None and a.cuts is None:
        p.error("give --components or --cuts")
    try:
        source = resolve(a.model)
        unet = load_denoiser(source, device="meta" if a.cost == "flops" else "cpu")
        size = default_latent_size(unet.config)
        h = a.height // source.vae_scale if a.height else size
        w = a.width // source.vae_scale if a.width else size
        part = partition_denoiser(
            unet, a.components, model=a.model, batch=a.batch or default_batch(unet.config),
            height=h, width=w, metric=a.cost, stride=a.stride, layout=a.layout.replace("-", "_"),
            batched_stride=a.batched_stride, cuts=a.cuts,
        )
        text = describe(part, a.steps, a.warmup)
    except ValueError as e:
        p.error(str(e))
    print(text)
    if a.json:
        part.save(a.json)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
