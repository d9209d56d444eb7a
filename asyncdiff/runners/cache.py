"""Per-generation activation cache: turns plan steps into waves of component calls.

Framework-neutral (tensors are opaque values), so the in-process runner, the
torch.distributed runner and the Triton BLS model route activations with the
same code.  A *wave* is a set of calls that may run concurrently: a warm-up
step is N waves of one call (each reads the previous call's fresh output), a
compute step is one wave of all its calls, a communication-only step has no
wave.  Outputs of a wave are published only after the whole wave, so every
call of an asynchronous step reads the previous round's values.
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
        self.values: dict[str, tuple[int, Any]] = {}  # tensor name -> (step produced, value)
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
                produced, value = self.values[t.name]
                if produced != call.reads_step:
                    raise RuntimeError(
                        f"step {step}: {spec.name} must read {t.name} from step {call.reads_step}, "
                        f"cache holds step {produced}"
                    )
                out[t.name] = value
        return out

    def record(self, step: int, position: int, outputs: dict[str, Any]) -> None:
        """Store a finished call's outputs; a stride copy only contributes its noise prediction."""
        st = self.plan.steps[step]
        call = st.calls[position]
        if NOISE_PRED in outputs and call.section != "front":  # a front's is not a prediction
            self.eps[(call.component, call.timestep_index, step)] = outputs[NOISE_PRED]
        if position < len(st.main_calls):
            for name, value in outputs.items():
                if name != NOISE_PRED:
                    self.values[name] = (step, value)

    def receive(self, name: str, produced_step: int, value: Any) -> None:
        """Hand over an activation computed elsewhere (another rank) at ``produced_step``."""
        self.values[name] = (produced_step, value)

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
