"""One generation: B requests denoised in lockstep by an AsyncDiff plan.

``Generation`` owns what every executor needs and none should rebuild: the
scheduler, the plan, the ``ActivationCache``, the latents and classifier-free
guidance.  It hands out each step's component calls, wave by wave, and takes
their outputs.  An executor (``LocalRunner``, the distributed runner, the
Triton BLS, the benchmarks) only decides how a wave of calls is executed.

Batch layout: the B requests share steps, warm-up and scheduler; seeds,
guidance scales and prompts may differ.  The model batch is
``[uncond x B; cond x B]`` (2B rows), so ``chunk(2)`` separates the guidance
halves and row b of each half is request b.  Request b's latents are seeded
as when it runs alone, so it gets the same image in a batch as alone.

Size: ``latent_size`` (h, w) makes the latents at another size than the
partition's (whose TensorSpec shapes stay those of its default size).
img2img: ``init_latents`` and ``noise`` (``asyncdiff.img2img.init_latents``)
make the generation start from an image: the requests' shared STRENGTH cuts
the scheduler's timesteps, the plan covers only the steps that remain, and
the starting latents are the init latents noised to the first of them.

Values: the latent, timestep, conditioning and noise prediction are torch
tensors.  They cross into the executor through ``to_executor(name, tensor)``
(the BLS makes Triton tensors of them), once per step, timestep index or
generation, and come back through ``from_executor``.  Activations between
components are opaque: they pass through the cache unconverted.  Guidance
and the scheduler step run in fp32 whatever dtype the components serve.

Flow matching (SD3, SCHEDULER ``flowmatch-euler``): the scheduler has no
``init_noise_sigma`` and no ``scale_model_input``; the latents start as plain
seeded Gaussians and enter the denoiser unscaled, as diffusers does.

Other denoiser families (``Denoising``; FLUX: ``asyncdiff.flux.FLUX_DENOISING``): without
classifier-free guidance the model batch is one row per request (GUIDANCE_SCALE then goes
to a component input of role ``guidance``, a guidance-distilled model's embedding); packed
latents enter as patch tokens while the latents, the scheduler step and the result stay
[B, C, h, w]; the components may take the timestep divided by a scale (FLUX: sigmas), and
the scheduler's ``set_timesteps`` may take more keywords (FLUX: sigmas and the dynamic
shift ``mu`` from the number of image tokens).
"""

from __future__ import annotations

import collections
import copy
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asyncdiff.contract import FLOW_MATCH_EULER, INPUT_BY_FIELD, MAX_STEPS, SCHEDULERS, Request
from asyncdiff.img2img import img2img_timesteps, noised_latents, steps_to_run
from asyncdiff.partition import Partition
from asyncdiff.runners.cache import ActivationCache
from asyncdiff.schedule import Call, make_plan

SHARED_FIELDS = ("steps", "warmup", "scheduler")  # one value for every request of a batch
IMG2IMG_SHARED_FIELDS = SHARED_FIELDS + ("strength",)  # strength cuts the shared timesteps


def is_flow_matching(config: Mapping) -> bool:
    """A flow-matching scheduler config (SD3's FlowMatchEulerDiscreteScheduler: sigmas from a
    shift, no betas) rather than a DDPM-family one."""
    config = dict(config)
    if "_class_name" in config:
        return str(config["_class_name"]).startswith("FlowMatch")
    return "shift" in config and "beta_start" not in config


def check_scheduler_fits(name: str, config: Mapping, *, dynamic_shift: bool = False) -> None:
    """A flow-matching model takes only ``flowmatch-euler``, a DDPM-family one only the
    others; ValueError naming what it takes.  (``make_scheduler`` itself builds any name from
    any config: the BLS sizes every scheduler's step limit at load.)  ``dynamic_shift``: the
    caller passes ``mu`` to ``set_timesteps`` (FLUX), which a scheduler with
    ``use_dynamic_shifting`` needs."""
    flow = is_flow_matching(config)
    if (name == FLOW_MATCH_EULER) != flow and name in SCHEDULERS:
        takes = [FLOW_MATCH_EULER] if flow else [s for s in SCHEDULERS if s != FLOW_MATCH_EULER]
        raise ValueError(f"SCHEDULER {name!r} does not fit this model's "
                         f"{'flow-matching' if flow else 'noise'} schedule; it takes {takes}")
    if flow and dict(config).get("use_dynamic_shifting") and not dynamic_shift:
        raise NotImplementedError("flow-matching schedulers with use_dynamic_shifting need mu "
                                  "from the image size: only FLUX pipelines pass it")


def max_steps(scheduler: str, config: Mapping) -> int:
    """The most STEPS the scheduler takes on this model: with ``leading`` spacing and a
    ``steps_offset``, near 1000 steps its first timestep is num_train_timesteps itself, out
    of the noise schedule (DDIM fails, DPM-Solver++ diverges); DPM-Solver++ at 1000 repeats
    one timestep."""
    trained, steps = config.get("num_train_timesteps", MAX_STEPS), MAX_STEPS
    if is_flow_matching(config):  # sigmas from 1 down: its first timestep IS num_train_timesteps
        return steps
    while steps > 1:
        s = make_scheduler(scheduler, config)
        s.set_timesteps(steps)
        t = s.timesteps
        if float(t.max()) < trained and len(set(t.tolist())) == len(t):  # distinct, in range
            break
        steps -= 1
    return steps


def scheduler_fits(scheduler: str, config: Mapping, *, dynamic_shift: bool = False) -> bool:
    try:
        check_scheduler_fits(scheduler, config, dynamic_shift=dynamic_shift)
    except (ValueError, NotImplementedError):
        return False
    return True


def make_scheduler(name: str, config: Mapping):
    """A fresh diffusers scheduler (they are stateful: one per generation): a deep copy of one
    built per (name, config). ``from_config`` inspects signatures and rebuilds the beta
    schedule, ~4 ms a request; the copy takes a tenth of that and starts in the same state."""
    key = (name, json.dumps(dict(config), sort_keys=True, default=repr))
    if key not in _SCHEDULERS:
        _SCHEDULERS[key] = _build_scheduler(name, config)
    return copy.deepcopy(_SCHEDULERS[key])


_SCHEDULERS: dict[tuple[str, str], Any] = {}  # never stepped: only copied


def _build_scheduler(name: str, config: Mapping):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == FLOW_MATCH_EULER:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"SCHEDULER must be one of {list(SCHEDULERS)}, got {name!r}")


def initial_latents(seed: int, shape: tuple[int, ...], init_noise_sigma: float) -> torch.Tensor:
    """Seeded Gaussian latents (CPU generator: the same seed gives the same image anywhere)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32) * init_noise_sigma


def guide(noise_pred: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch (``scale``: a number or per-row tensor)."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + scale * (cond - uncond)


def cfg_batch(pairs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-request [uncond; cond] tensors (batch 2 each) -> one [uncond x B; cond x B] batch."""
    return torch.cat([p[:1] for p in pairs] + [p[1:] for p in pairs])


@dataclass(frozen=True)
class Denoising:
    """How a denoiser family's loop differs from SD / SDXL / SD3's (the defaults).

    ``cfg``: model rows ``[uncond x B; cond x B]`` and classifier-free guidance; False: one
    row per request and the noise prediction used as it is.
    ``timestep_scale``: the components take the scheduler's timestep divided by this.
    ``patch``: the denoiser takes the latents [B, C, h, w] as patch x patch tokens
    [B, (h/p)(w/p), C p p] and returns its prediction so; None: as they are.
    ``timestep_kwargs``: (scheduler config, steps, image tokens) -> more ``set_timesteps``
    keywords.
    """

    cfg: bool = True
    timestep_scale: float = 1.0
    patch: int | None = None
    timestep_kwargs: Callable[[Mapping, int, int], Mapping[str, Any]] | None = None


def pack_latents(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/p)(w/p), C p p]: each p x p patch, channel-major, one token (row
    by row), as diffusers packs FLUX latents."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


@dataclass
class ComponentCall:
    """One call an executor runs: ``model`` on ``inputs`` (in the component's input order).

    ``positions`` are the call's places in the plan step: one, or two when
    batched stride merged the last component's pair into one doubled batch
    (``split`` rows belong to the first).
    """

    step: int
    positions: tuple[int, ...]
    component: int
    model: str  # the Triton model name
    inputs: dict[str, Any]
    output_names: list[str]
    split: int | None = None
    # Outer-ring warm-up: "front" (only the ring's first stages matter: its other inputs are
    # zeros and its noise prediction is not one; an executor may skip the back) or "back".
    section: str = "all"
    lane: int = 0  # 1: the stride copy of the last component (its second instance with S=2)


def latent_input(partition: Partition):
    """The TensorSpec of the latent a partition takes ([batch, C, h, w]): component 0's, or the
    ring's (N-1) with the outer-ring layout."""
    return next(t for c in partition.components for t in c.inputs if t.role == "latent")


def latent_component(partition: Partition) -> int:
    return next(c.index for c in partition.components
                if any(t.role == "latent" for t in c.inputs))


class Generation:
    """A batch of requests advancing through one plan.

    Wave driver: ``gen.run(execute)`` with ``execute(wave) -> [outputs per call]``: every
    call of a step, then the scheduler step.  Dataflow driver (``asyncdiff.dataflow``):
    ``ready_calls()`` hands out each call as soon as its inputs exist, ``complete`` takes one
    call's outputs, ``advance_ready`` runs the scheduler steps whose noise predictions are
    in; both give the same latents.  An executor that runs only some calls (a rank of the
    distributed runner) drives the steps itself with ``calls``, ``record``,
    ``cache.receive*`` and ``advance`` (see ``run``).

    Without ``scheduler_config`` the generation only routes calls (no latents,
    no scheduler): pass ``timesteps`` and a ``sample`` to ``calls``.

    ``latent_size``: (h, w) of the latents (default: the partition's). ``init_latents`` and
    ``noise`` ([B, C, h, w], ``asyncdiff.img2img.init_latents``): img2img with the requests'
    STRENGTH; ``timesteps`` then holds the remaining timesteps and ``steps`` their number.
    ``denoising``: the family's rows, latent packing and timesteps (default: SD's).
    """

    def __init__(self, partition: Partition, requests: Sequence[Request],
                 conditioning: Mapping[str, Any], scheduler_config: Mapping | None = None, *,
                 time_shift: bool = False, batched_stride: bool = False, device="cpu",
                 timesteps: torch.Tensor | None = None,
                 to_executor: Callable[[str, torch.Tensor], Any] | None = None,
                 from_executor: Callable[[Any], torch.Tensor] | None = None,
                 latent_size: tuple[int, int] | None = None,
                 init_latents: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 denoising: Denoising = Denoising()):
        self.requests = list(requests)
        if not self.requests:
            raise ValueError("a generation needs at least one request")
        img2img = init_latents is not None
        if img2img != (noise is not None):
            raise ValueError("img2img needs both init_latents and noise")
        if img2img and scheduler_config is None:
            raise ValueError("img2img needs the scheduler (scheduler_config)")
        for name in IMG2IMG_SHARED_FIELDS if img2img else SHARED_FIELDS:
            values = [getattr(r, name) for r in self.requests]
            if len(set(values)) > 1:
                raise ValueError(f"{INPUT_BY_FIELD[name].name} must be the same for every request "
                                 f"of a batch, got {values}")
        first = self.requests[0]
        self.partition, self.batch = partition, len(self.requests)
        self.denoising = denoising
        self.rows = (2 if denoising.cfg else 1) * self.batch  # the model batch
        self.device = torch.device(device)
        self.batched_stride = batched_stride
        self.to_executor = to_executor or (lambda name, value: value)
        self.from_executor = from_executor or (lambda value: value)
        latent = latent_input(partition)
        self.latent_name, self.latent_shape = latent.name, self._unpacked_shape(latent)  # [C, h, w]
        self.default_latent_size = self.latent_shape[1:]  # the partition's (h, w)
        if latent_size is not None and tuple(latent_size) != self.default_latent_size:
            if len(self.latent_shape) != 3 or len(latent_size) != 2 or min(latent_size) < 1:
                raise ValueError(f"latent_size must be (h, w) >= 1 of a [C, h, w] latent; got "
                                 f"{latent_size} for {latent.name} {list(self.latent_shape)}")
            p = denoising.patch or 1
            if latent_size[0] % p or latent_size[1] % p:
                raise ValueError(f"latent_size {tuple(latent_size)} must be multiples of the "
                                 f"packing patch {p}")
            self.latent_shape = (self.latent_shape[0], *latent_size)
        self.latent_component = latent_component(partition)
        run = steps_to_run(first.steps, first.strength, first.warmup) if img2img else first.steps
        self.plan = make_plan(run, partition.num_components, partition.stride,
                              first.warmup, time_shift, ring=partition.layout == "outer_ring")
        self.cache = ActivationCache(partition, self.plan)
        self.scheduler = self.latents = None
        if scheduler_config is not None:
            kwargs = {}
            if denoising.timestep_kwargs is not None:
                kwargs = dict(denoising.timestep_kwargs(scheduler_config, first.steps,
                                                        self.image_tokens))
            check_scheduler_fits(first.scheduler, scheduler_config, dynamic_shift="mu" in kwargs)
            self.scheduler = make_scheduler(first.scheduler, scheduler_config)
            self.scheduler.set_timesteps(first.steps, device=self.device, **kwargs)
            if img2img:
                timesteps = img2img_timesteps(self.scheduler, first.steps, first.strength)
                self.latents = self._img2img_latents(init_latents, noise, timesteps)
            else:
                timesteps = self.scheduler.timesteps
                sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching: none
                self.latents = torch.cat([initial_latents(r.seed, (1, *self.latent_shape), sigma)
                                          for r in self.requests]).to(self.device)
        elif timesteps is None:
            raise ValueError("a generation without a scheduler needs the timesteps")
        # Every step reads its timestep here (img2img: the cut ones), never the scheduler's.
        self.timesteps = timesteps
        if len(self.timesteps) < self.steps:
            raise ValueError(f"{len(self.timesteps)} timesteps for {self.steps} steps")
        self.conditioning = {}
        for name, value in conditioning.items():  # converted once per generation
            if isinstance(value, torch.Tensor):
                if value.shape[0] != self.rows:
                    layout = ("[uncond x B; cond x B]" if denoising.cfg
                              else "one row per request")
                    raise ValueError(f"conditioning {name!r} has batch {value.shape[0]}; "
                                     f"{self.batch} requests need {self.rows} ({layout})")
                value = self.to_executor(name, value)
            self.conditioning[name] = value
        self._timestep: dict[tuple[str, int], Any] = {}
        self._guidance: dict[str, Any] = {}
        self._zeros: dict[str, Any] = {}
        self._input_step, self._input, self._sample = -1, None, None
        self._img2img = img2img
        self._advanced = 0  # scheduler steps taken: the latents are those entering this step
        self._lanes = _lanes(self.plan, batched_stride)
        self._issued = dict.fromkeys(self._lanes, 0)  # per lane: units handed out
        self._in_flight = dict.fromkeys(self._lanes, 0)
        self._reads_latent = {c.index for c in partition.components
                              if any(t.role == "latent" for t in c.inputs)}
        # per step: units reading its latents not handed out yet (the scheduler step waits)
        self._latent_readers = collections.Counter(
            step for (component, _), units in self._lanes.items()
            if component in self._reads_latent for step, _ in units)

    @property
    def steps(self) -> int:
        """The steps that run (img2img: those STRENGTH leaves)."""
        return self.plan.steps_total

    @property
    def img2img(self) -> bool:
        return self._img2img

    @property
    def image_tokens(self) -> int:
        """The latent's positions the denoiser sees: (h/p)(w/p) packed tokens, or h * w."""
        p = self.denoising.patch or 1
        return (self.latent_shape[1] // p) * (self.latent_shape[2] // p)

    # -- one step ------------------------------------------------------------
    def model_input(self, step: int) -> torch.Tensor | None:
        """The scheduler-scaled [x x 2] latent batch entering ``step`` ([x] without guidance,
        packed when the denoiser takes tokens; torch; None without latents)."""
        if self.scheduler is None:
            return None
        if self._input_step != step:
            t = self.timesteps[step]
            self._input = torch.cat([self.latents] * 2) if self.denoising.cfg else self.latents
            if hasattr(self.scheduler, "scale_model_input"):  # flow matching takes x as it is
                self._input = self.scheduler.scale_model_input(self._input, t)
            if self.denoising.patch:
                self._input = pack_latents(self._input, self.denoising.patch)
            self._input_step, self._sample = step, None
        return self._input

    def waves(self, step: int) -> Iterator[list[ComponentCall]]:
        """The calls of ``step``, wave by wave; record a wave's outputs before taking the next."""
        for wave in self.cache.waves(step):
            yield self.calls(step, wave)

    def calls(self, step: int, wave: list[tuple[int, Call]], sample: Any = None) -> list[ComponentCall]:
        """Inputs of the (position, call) pairs of a wave, or of the share of it an executor runs.

        ``sample``: the latent batch as received from elsewhere (executor value);
        default: this generation's own model input.
        """
        if sample is None and any(c.component == self.latent_component for _, c in wave):
            sample = self._own_sample(step)
        out = [self._call(step, pos, call, sample) for pos, call in wave]
        if self.batched_stride and len(out) > 1 and out[-1].component == out[-2].component:
            out[-2:] = [_merge(out[-2], out[-1])]
        return out

    def record(self, calls: Sequence[ComponentCall], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Hand a wave's outputs (one name -> value mapping per call) to the cache."""
        if len(calls) != len(outputs):
            raise ValueError(f"{len(calls)} calls but {len(outputs)} outputs")
        for call, out in zip(calls, outputs):
            if call.split is None:
                self.cache.record(call.step, call.positions[0], out)
                continue
            a = {n: v[:call.split] for n, v in out.items()}
            b = {n: v[call.split:] for n, v in out.items()}
            self.cache.record(call.step, call.positions[0], a)
            self.cache.record(call.step, call.positions[1], b)

    def advance(self, step: int) -> None:
        """Guidance and the scheduler step with ``step``'s noise prediction (taken from the cache)."""
        if self.scheduler is None:
            raise RuntimeError("this generation has no scheduler: it only routes calls")
        if step != self._advanced:
            raise RuntimeError(f"advance({step}): the latents are at step {self._advanced}")
        # fp32 whatever the components serve: some diffusers schedulers cast prev_sample to
        # the noise prediction's dtype, which would turn the latents fp16 for good.
        eps = self.from_executor(self.cache.noise_pred(step)).to(self.latents.dtype)
        if self.denoising.patch:  # the scheduler step is elementwise: unpacked, it is the same
            eps = unpack_latents(eps, self.denoising.patch, *self.latent_shape[1:])
        self.model_input(step)  # diffusers expects scale_model_input before step()
        t = self.timesteps[step]
        eps = self._guide(eps) if self.denoising.cfg else eps
        self.latents = self.scheduler.step(eps, t, self.latents).prev_sample
        if not torch.isfinite(self.latents).all():  # an overflow would only end in a black image
            raise FloatingPointError(f"the latents are not finite after step {step} of {self.steps}")
        self._advanced = step + 1

    # -- dataflow ------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Every scheduler step taken: ``latents`` are the result."""
        return self._advanced == self.steps

    def ready_calls(self, depth: int = 2) -> list[ComponentCall]:
        """The calls whose inputs exist now, each handed out once, in plan order per lane.

        A lane (a component, or the stride copy's instance) has at most ``depth`` calls out:
        with 2, a component's next call can wait in its model's queue while the current one
        runs, so the model goes from one to the next without a round trip through the
        executor.  Component 0's call of step i waits for the latents of step i (the
        scheduler step of i-1); every other call only for the activations it reads.
        """
        out = []
        for lane, units in self._lanes.items():
            while self._issued[lane] < len(units) and self._in_flight[lane] < depth:
                step, positions = units[self._issued[lane]]
                call = self.plan.steps[step].calls[positions[0]]
                if not self.cache.has_inputs(call) or (
                        call.component in self._reads_latent and step != self._advanced):
                    break
                self._issued[lane] += 1
                self._in_flight[lane] += 1
                if call.component in self._reads_latent:
                    self._latent_readers[step] -= 1
                st = self.plan.steps[step]
                [issued] = self.calls(step, [(p, st.calls[p]) for p in positions])
                issued.lane = lane[1]
                out.append(issued)
        return out

    def complete(self, call: ComponentCall, outputs: Mapping[str, Any]) -> None:
        """One call's outputs (a call from ``ready_calls``): its readers may go out next."""
        self.record([call], [outputs])
        self._in_flight[(call.component, call.lane)] -= 1

    def advance_ready(self) -> list[int]:
        """Every scheduler step whose noise prediction is in, in order; the steps taken.  A
        step also waits until every call reading its latents is out (the last component's
        prediction of step i does not depend on component 0's call of step i)."""
        taken = []
        while (self._advanced < self.steps and self.cache.has_noise_pred(self._advanced)
               and not self._latent_readers[self._advanced]):
            taken.append(self._advanced)
            self.advance(self._advanced)
        return taken

    # -- whole generation ----------------------------------------------------
    def run(self, execute: Callable[[list[ComponentCall]], Sequence[Mapping[str, Any]]]) -> torch.Tensor:
        """Every step with a synchronous wave executor; returns the final latents [B, C, h, w]."""
        for i in range(self.steps):
            for wave in self.waves(i):
                self.record(wave, execute(wave))
            self.advance(i)
        return self.latents

    async def run_async(self, execute: Callable[[list[ComponentCall]], Awaitable[Sequence[Mapping]]]):
        """``run`` with an awaitable wave executor."""
        for i in range(self.steps):
            for wave in self.waves(i):
                self.record(wave, await execute(wave))
            self.advance(i)
        return self.latents

    # -- internals -----------------------------------------------------------
    def _own_sample(self, step: int):
        x = self.model_input(step)
        if x is None:
            raise ValueError(f"step {step}: component 0 needs a sample and this generation has no latents")
        if self._sample is None:  # converted once per step, shared by the step's calls
            self._sample = self.to_executor(self.latent_name, x)
        return self._sample

    def _timestep_value(self, name: str, index: int):
        """[rows] timestep of ``index``, built and converted once per timestep index."""
        if (name, index) not in self._timestep:
            t = self.timesteps[index].float().reshape(1).expand(self.rows)
            if self.denoising.timestep_scale != 1.0:  # FLUX: sigma = t / 1000, as diffusers divides
                t = t / self.denoising.timestep_scale
            self._timestep[(name, index)] = self.to_executor(name, t)
        return self._timestep[(name, index)]

    def _guidance_value(self, name: str):
        """[rows] GUIDANCE_SCALE per request for a guidance embedding, built once."""
        if name not in self._guidance:
            if self.denoising.cfg:
                raise ValueError(f"{name!r} embeds the guidance scale: a guidance-distilled "
                                 "model runs without classifier-free guidance rows")
            scales = torch.tensor([r.guidance_scale for r in self.requests], dtype=torch.float32)
            self._guidance[name] = self.to_executor(name, scales.to(self.device))
        return self._guidance[name]

    def _call(self, step: int, pos: int, call: Call, sample) -> ComponentCall:
        spec = self.partition.components[call.component]
        cached = self.cache.inputs(step, call, sample)
        inputs = {}
        for t in spec.inputs:
            if t.name in cached:
                inputs[t.name] = cached[t.name]
            elif call.section == "front" and t.producer is not None:
                inputs[t.name] = self._placeholder(t)
            elif t.role == "timestep":
                inputs[t.name] = self._timestep_value(t.name, call.timestep_index)
            elif t.name in self.conditioning:
                inputs[t.name] = self.conditioning[t.name]
            elif t.role == "guidance":
                inputs[t.name] = self._guidance_value(t.name)
            else:
                raise ValueError(f"{spec.name} needs conditioning {t.name!r} ({t.role}); "
                                 f"given: {sorted(self.conditioning)}")
        # A front call keeps every output name (calls to one model then batch alike); its
        # noise_pred is not a prediction and the cache drops it.
        return ComponentCall(step, (pos,), call.component, spec.name, inputs,
                             spec.output_names, section=call.section)

    def _img2img_latents(self, init_latents, noise, timesteps) -> torch.Tensor:
        want = (self.batch, *self.latent_shape)
        for name, value in (("init_latents", init_latents), ("noise", noise)):
            if tuple(value.shape) != want:
                raise ValueError(f"{name} must be {list(want)} ([B, C, h, w] at the latent size), "
                                 f"got {list(value.shape)}")
        latents = init_latents.to(self.device, torch.float32)
        return noised_latents(self.scheduler, latents, noise, timesteps)

    def _placeholder(self, spec):
        """Zeros for an input of the ring's back stages during its front call (one model per
        component: an executor that cannot skip the back runs it on these and drops it)."""
        if spec.name not in self._zeros:
            shape = (self.rows, *self._scaled(spec))
            zeros = torch.zeros(shape, dtype=getattr(torch, spec.dtype), device=self.device)
            self._zeros[spec.name] = self.to_executor(spec.name, zeros)
        return self._zeros[spec.name]

    def _unpacked_shape(self, latent) -> tuple[int, ...]:
        """[C, h, w] of one latent: the partition's latent input, unpacked from [L, C p p]
        tokens when the denoiser takes packed latents."""
        p, dims = self.denoising.patch, tuple(latent.shape[1:])
        if not p:
            return dims
        h, w = self.partition.latent_height, self.partition.latent_width
        if len(dims) != 2 or dims[0] * p * p != h * w or dims[1] % (p * p):
            raise ValueError(f"{latent.name} {list(dims)} is not {h} x {w} latents packed in "
                             f"{p} x {p} patches")
        return (dims[1] // (p * p), h, w)

    def _scaled(self, spec) -> tuple[int, ...]:
        """An activation's shape (without batch) at this generation's latent size: a UNet
        activation [C, s_h, s_w] is the latent's spatial dims over a power of two, so it
        scales by the same ratio (exact: latent sides divide by 2**downsamplers)."""
        dims = tuple(spec.shape[1:])
        if self.latent_shape[1:] == self.default_latent_size:
            return dims
        if len(dims) != 3:
            raise ValueError(f"{spec.name} {list(dims)}: only a UNet's [C, h, w] activations "
                             f"scale with the latent size; this partition serves "
                             f"{list(self.default_latent_size)} only")
        out = [dims[0]]
        for side, new, default in zip(dims[1:], self.latent_shape[1:], self.default_latent_size):
            if (side * new) % default:
                raise ValueError(f"{spec.name} {list(dims)} at latent {list(self.default_latent_size)}"
                                 f" does not scale to latent {list(self.latent_shape[1:])}")
            out.append(side * new // default)
        return tuple(out)

    def _guide(self, eps: torch.Tensor) -> torch.Tensor:
        scales = [r.guidance_scale for r in self.requests]
        if len(set(scales)) == 1:
            return guide(eps, scales[0])
        scale = torch.tensor(scales, dtype=eps.dtype, device=eps.device)
        return guide(eps, scale.reshape(-1, *[1] * (eps.dim() - 1)))


def _lanes(plan, batched_stride: bool) -> dict[tuple[int, int], list[tuple[int, tuple[int, ...]]]]:
    """(component, lane) -> its units in plan order: (step, positions), one position, or the
    stride pair of a batched-stride round (one call on a doubled batch).  Lane 1 is the
    stride copy's (the last component's second instance); every other call is lane 0."""
    lanes: dict[tuple[int, int], list] = {}
    for st in plan.steps:
        positions = list(range(len(st.calls)))
        if st.stride_copy:
            copy = positions.pop()
            if batched_stride:
                positions[-1] = (positions[-1], copy)
            else:
                lanes.setdefault((st.calls[copy].component, 1), []).append((st.step, (copy,)))
        for p in positions:
            unit = p if isinstance(p, tuple) else (p,)
            lanes.setdefault((st.calls[unit[0]].component, 0), []).append((st.step, unit))
    return lanes


def _merge(a: ComponentCall, b: ComponentCall) -> ComponentCall:  # never a ring warm-up call
    """The stride pair of the last component as one call on a doubled batch (torch values)."""
    inputs = {n: torch.cat([a.inputs[n], b.inputs[n]]) for n in a.inputs}
    split = a.inputs[next(iter(a.inputs))].shape[0]
    return ComponentCall(a.step, a.positions + b.positions, a.component, a.model, inputs,
                         a.output_names, split)
