"""The AsyncDiff step schedule: which component runs when, on what, with which timestep.

Pure Python (no torch): every executor -- the in-process ``LocalRunner``, the
torch.distributed runner and the Triton BLS model -- executes the same
``Plan``.  Notation: steps ``i = 0..T-1`` in sampling order, ``tau_i`` the
scheduler's i-th timestep, ``x_i`` the latent entering step i, ``N``
components, warm-up ``w``.

Stride 1 (paper Fig. 3; N=4, w=1)::

    step  comp0          comp1            comp2            comp3 (-> eps)
    0     warm-up: all components in sequence on x_0, tau_0
    1     c0(x_1, tau_1)  c1(h0@0, tau_1)  c2(h1@0, tau_1)  c3(h2@0, tau_1) -> eps_1
    2     c0(x_2, tau_2)  c1(h0@1, tau_2)  c2(h1@1, tau_2)  c3(h2@1, tau_2) -> eps_2

``hk@m`` is component k's output produced at step m (the value a component
"reads"); skip tensors crossing a cut are also one step stale.

Stride 2 (N+1 devices; N=2, w=1)::

    step  comp0              comp1                 comp1 copy         eps
    1     c0(x_1, tau_2)     c1(h0@0, tau_2)       c1(h0@0, tau_1)    copy
    2     -- communication only: no component runs --                  c1 @ step 1 (tau_2)
    3     c0(x_3, tau_4)     c1(h0@1, tau_4)       c1(h0@1, tau_3)    copy

A compute round at step i runs components ``0..N-1`` with ``tau_{i+1}`` and
a second copy of the last component with ``tau_i``; the copy yields
``eps_i`` and the main call ``eps_{i+1}``.  At the last step ``tau_{T-1}`` is
used because ``tau_T`` does not exist.

Difference from the official code: it places compute rounds at odd steps
whatever ``w`` is, so an even ``w`` makes the first asynchronous step a
communication-only step that reuses the last warm-up output (computed at
``tau_{w-1}``).  Here rounds start at the first asynchronous step ``w``
(identical for odd ``w``, the paper's values).

Outer ring (``ring=True``, the paper's SDXL layout): component N-1 holds the first
and the last stages.  A warm-up step runs it twice: its front (``section="front"``)
before component 0 and the whole ring (``section="back"``, its noise
prediction) after component N-2.  In a compute round component 0 reads the
ring's outputs of the previous round, so every call's ``reads_step`` is the
previous round (the latent is always the step's own).

Time shift (paper App. A, off by default): asynchronous calls use the
previous step's timestep; with stride 2 the main calls use ``tau_i`` and
the copy ``tau_{i-1}``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Mode = Literal["warmup", "compute", "comm"]


@dataclass(frozen=True)
class Call:
    """One component invocation.

    ``reads_step``: for component 0 the index of the latent it consumes; for
    k > 0 the step at which the inputs it consumes (component k-1's output and
    skip tensors from other components) were produced.
    """

    component: int
    timestep_index: int
    reads_step: int
    section: str = "all"  # outer-ring warm-up: "front" (no noise prediction) or "back"


@dataclass(frozen=True)
class EpsSource:
    """Which call's output is the noise prediction of a step."""

    component: int
    timestep_index: int
    computed_at_step: int


@dataclass(frozen=True)
class Step:
    step: int
    mode: Mode
    calls: tuple[Call, ...]
    eps: EpsSource
    stride_copy: bool = False  # the last call re-runs the last component (S=2)

    @property
    def main_calls(self) -> tuple[Call, ...]:
        """The calls whose outputs feed the next round; a stride copy never does."""
        return self.calls[:-1] if self.stride_copy else self.calls


@dataclass(frozen=True)
class Plan:
    steps_total: int
    components: int
    stride: int
    warmup: int
    time_shift: bool
    steps: tuple[Step, ...] = field(repr=False)
    ring: bool = False  # outer-ring layout: component N-1 holds the first and the last stages

    def to_json(self) -> dict:
        return {"steps": [_step_json(s) for s in self.steps]}

    @property
    def component_calls(self) -> int:
        return sum(len(s.calls) for s in self.steps)

    @property
    def parallel_rounds(self) -> int:
        """Rounds whose calls run concurrently (one wall-clock component time each)."""
        return sum(1 for s in self.steps if s.mode == "compute")


def _step_json(step: Step) -> dict:
    return {
        "step": step.step,
        "mode": step.mode,
        "calls": [_call_json(c) for c in step.calls],
        "eps": asdict(step.eps),
    }


def _call_json(call: Call) -> dict:
    out = asdict(call)
    if call.section == "all":  # only outer-ring warm-up calls name a section
        del out["section"]
    return out


def validate(steps: int, components: int, stride: int, warmup: int) -> None:
    """Raise ValueError naming the field and its allowed range."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if not 1 <= warmup <= steps:
        raise ValueError(f"warmup must be in [1, steps={steps}], got {warmup}")


def make_plan(
    steps: int, components: int, stride: int = 1, warmup: int = 1, time_shift: bool = False,
    ring: bool = False,
) -> Plan:
    """Build the exact per-step plan for (T, N, S, w, time_shift); ``ring``: the outer-ring
    layout (component N-1 holds the first and the last stages)."""
    validate(steps, components, stride, warmup)
    if ring and components < 2:
        raise ValueError(f"the outer ring needs components >= 2, got {components}")
    out: list[Step] = [_warmup_step(i, components, ring) for i in range(warmup)]
    if components == 1:
        # One component has nothing to overlap: every step is sequential.
        out += [_warmup_step(i, components) for i in range(warmup, steps)]
    elif stride == 1:
        out += [_stride1_step(i, components, time_shift, ring) for i in range(warmup, steps)]
    else:
        out += _stride2_steps(steps, components, warmup, time_shift, ring)
    return Plan(steps, components, stride, warmup, time_shift, tuple(out), ring)


def _warmup_step(i: int, n: int, ring: bool = False) -> Step:
    calls = tuple(Call(k, i, i) for k in range(n - 1 if ring else n))
    if ring:  # the ring's front feeds component 0; the whole ring runs last, after N-2
        calls = (Call(n - 1, i, i, "front"), *calls, Call(n - 1, i, i, "back"))
    return Step(i, "warmup", calls, EpsSource(n - 1, i, i))


def _stride1_step(i: int, n: int, time_shift: bool, ring: bool = False) -> Step:
    t = i - 1 if time_shift else i
    calls = tuple(Call(k, t, i if k == 0 and not ring else i - 1) for k in range(n))
    return Step(i, "compute", calls, EpsSource(n - 1, t, i))


def _stride2_steps(steps: int, n: int, warmup: int, time_shift: bool,
                   ring: bool = False) -> list[Step]:
    out: list[Step] = []
    prev_round = warmup - 1  # the first round reads the last warm-up outputs
    for i in range(warmup, steps):
        if (i - warmup) % 2 == 0:
            main_t, copy_t = _stride2_timesteps(i, steps, time_shift)
            calls = tuple(Call(k, main_t, i if k == 0 and not ring else prev_round)
                          for k in range(n))
            copy = Call(n - 1, copy_t, prev_round)
            eps = EpsSource(n - 1, copy_t, i)
            out.append(Step(i, "compute", calls + (copy,), eps, stride_copy=True))
            prev_round = i
        else:
            main_t = out[-1].main_calls[-1].timestep_index
            out.append(Step(i, "comm", (), EpsSource(n - 1, main_t, i - 1)))
    return out


def _stride2_timesteps(i: int, steps: int, time_shift: bool) -> tuple[int, int]:
    """(main calls' timestep index, stride copy's timestep index) of a round at step i."""
    if time_shift:
        return i, i - 1
    return min(i + 1, steps - 1), i


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m asyncdiff.schedule", description="Print the AsyncDiff step plan as JSON."
    )
    p.add_argument("--steps", type=int, required=True, help="denoising steps T")
    p.add_argument("--components", type=int, required=True, help="components N")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--warmup", type=int, default=1, help="sequential warm-up steps w (1..T)")
    p.add_argument("--time-shift", action="store_true")
    p.add_argument("--layout", default="sequential", choices=("sequential", "outer-ring"))
    a = p.parse_args(argv)
    try:
        plan = make_plan(a.steps, a.components, a.stride, a.warmup, a.time_shift,
                         ring=a.layout == "outer-ring")
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(plan.to_json()))


if __name__ == "__main__":
    main()
