"""Per-generation activation cache: turns plan steps into waves of component calls.

Framework-neutral (tensors are opaque values), so the in-process runner, the
torch.distributed runner and the Triton BLS model route activations with the
same code.  A *wave* is a set of calls that may run concurrently: a warm-up
step is N waves of one call (each reads the previous call's fresh output), a
compute step is one wave of all its calls, a communication-only step has no
wave.

Values are versioned by the step that produced them, and every call reads the
version its plan names (``Call.reads_step``), so an executor may record a
call's outputs as soon as it finishes, before the other calls of its round have
read the previous version (dataflow dispatch, ``asyncdiff.dataflow``). A
producer runs at most N rounds ahead of the slowest reader of its outputs: a
component's call needs its upstream neighbour's output of the previous round,
and component 0 needs the latents, which wait for the last component. So the
newest ``N + 1`` versions of a tensor are kept and older ones dropped.
"""

from __future__ import annotations

from typing import Any

from asyncdiff.partition import NOISE_PRED, Partition
from asyncdiff.schedule import Call, Plan


class ActivationCache:
    def __init__(self, partition: Partition, plan: Plan):
        if plan.components != partition.num_components:
            raise ValueError(
                f"plan has {plan.components} components but the partition has {partition.num_components}"
            )
        if plan.ring != (partition.layout == "outer_ring"):
            raise ValueError(f"a {'ring' if plan.ring else 'sequential'} plan cannot run a "
                             f"{partition.layout!r} partition (make_plan(..., ring=...))")
        self.partition = partition
        self.plan = plan
        self.values: dict[str, dict[int, Any]] = {}  # tensor name -> {step produced: value}
        self.keep = plan.components + 1  # versions kept per tensor (see the module docstring)
        self.eps: dict[tuple[int, int, int], Any] = {}  # (component, timestep index, step) -> noise_pred

    def waves(self, step: int) -> list[list[tuple[int, Call]]]:
        """Waves of (position in the step's call list, call)."""
        st = self.plan.steps[step]
        calls = list(enumerate(st.calls))
        if st.mode == "warmup":
            return [[c] for c in calls]
        return [calls] if calls else []

    def inputs(self, step: int, call: Call, latent: Any) -> dict[str, Any]:
        """Dataflow inputs of ``call``: the latent and cross-component activations.

        Conditioning inputs (timestep, text) are the executor's to add.  An outer-ring front
        call reads only the latent (its back stages' inputs are not computed yet).
        """
        spec = self.partition.components[call.component]
        out = {}
        for t in spec.inputs:
            if t.role == "latent":
                out[t.name] = latent
            elif t.producer is not None and call.section != "front":
                versions = self.values.get(t.name, {})
                if call.reads_step not in versions:
                    raise RuntimeError(
                        f"step {step}: {spec.name} must read {t.name} from step {call.reads_step}, "
                        f"cache holds steps {sorted(versions)}"
                    )
                out[t.name] = versions[call.reads_step]
        return out

    def has_inputs(self, call: Call) -> bool:
        """Whether every activation ``call`` reads is recorded (the latent and the
        conditioning are the executor's to check)."""
        if call.section == "front":
            return True
        spec = self.partition.components[call.component]
        return all(call.reads_step in self.values.get(t.name, ())
                   for t in spec.inputs if t.producer is not None and t.role != "latent")

    def record(self, step: int, position: int, outputs: dict[str, Any]) -> None:
        """Store a finished call's outputs; a stride copy only contributes its noise prediction."""
        st = self.plan.steps[step]
        call = st.calls[position]
        if NOISE_PRED in outputs and call.section != "front":  # a front's is not a prediction
            self.eps[(call.component, call.timestep_index, step)] = outputs[NOISE_PRED]
        if position < len(st.main_calls):
            for name, value in outputs.items():
                if name != NOISE_PRED:
                    self._store(name, step, value)

    def receive(self, name: str, produced_step: int, value: Any) -> None:
        """Hand over an activation computed elsewhere (another rank) at ``produced_step``."""
        self._store(name, produced_step, value)

    def has_noise_pred(self, step: int) -> bool:
        src = self.plan.steps[step].eps
        return (src.component, src.timestep_index, src.computed_at_step) in self.eps

    def _store(self, name: str, step: int, value: Any) -> None:
        versions = self.values.setdefault(name, {})
        versions[step] = value
        if len(versions) > self.keep:
            del versions[min(versions)]

    def receive_noise_pred(self, step: int, value: Any) -> None:
        """Hand over ``step``'s noise prediction computed elsewhere."""
        src = self.plan.steps[step].eps
        self.eps[(src.component, src.timestep_index, src.computed_at_step)] = value

    def drop_noise_preds(self) -> None:
        """Forget every noise prediction (an executor that sent them away keeps none)."""
        self.eps.clear()

    def noise_pred(self, step: int) -> Any:
        """The noise prediction of ``step``; older predictions are dropped."""
        src = self.plan.steps[step].eps
        value = self.eps[(src.component, src.timestep_index, src.computed_at_step)]
        self.eps = {k: v for k, v in self.eps.items() if k[2] >= step}
        return value
