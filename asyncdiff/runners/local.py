"""LocalRunner: the reference semantics of a plan, executed in one process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asyncdiff.components import Component
from asyncdiff.runners.cache import ActivationCache
from asyncdiff.schedule import Call


class LocalRunner:
    """Runs every component call of a step in this process, one after another.

    ``batch_stride=True`` runs the two calls of the last component in an S=2
    round (timesteps i+1 and i, same inputs) as ONE call on a doubled batch,
    as a device would in the N-device stride variant.  Its outputs equal the
    two separate calls up to floating-point reassociation in batched kernels.
    """

    def __init__(self, components: Sequence[Component], batch_stride: bool = False):
        self.components = list(components)
        self.batch_stride = batch_stride

    @torch.no_grad()
    def noise_pred(self, cache: ActivationCache, step: int, latent, conditioning: dict, timesteps):
        """Execute step ``step`` of ``cache.plan`` and return its noise prediction.

        ``conditioning``: encoder_hidden_states (+ text_embeds, time_ids), batch first.
        ``timesteps``: the scheduler's timesteps; calls index into them.
        """
        for wave in cache.waves(step):
            calls = [self.call_inputs(cache, step, c, latent, conditioning, timesteps) for _, c in wave]
            outs = self.run_wave([c for _, c in wave], calls)
            for (pos, _), out in zip(wave, outs):
                cache.record(step, pos, out)
        return cache.noise_pred(step)

    def call_inputs(self, cache, step, call: Call, latent, conditioning, timesteps) -> dict:
        """Everything ``call`` consumes: cached activations, latent, timestep, conditioning."""
        tensors = cache.inputs(step, call, latent)
        batch = conditioning["encoder_hidden_states"].shape[0]
        tensors["timestep"] = timesteps[call.timestep_index].float().reshape(1).expand(batch)
        tensors.update(conditioning)
        return tensors

    def run_wave(self, calls: list[Call], inputs: list[dict]) -> list[dict]:
        """Outputs of each call of a wave (the stride pair batched when ``batch_stride``)."""
        if self.batch_stride and len(calls) > 1 and calls[-1].component == calls[-2].component:
            merged = self._run_batched(calls[-1].component, inputs[-2], inputs[-1])
            return [self._run(c, x) for c, x in zip(calls[:-2], inputs[:-2])] + merged
        return [self._run(c, x) for c, x in zip(calls, inputs)]

    def _run(self, call: Call, tensors: dict) -> dict:
        comp = self.components[call.component]
        return comp.run({n: tensors[n] for n in comp.input_names})

    def _run_batched(self, k: int, a: dict, b: dict) -> list[dict]:
        comp = self.components[k]
        both = comp.run({n: torch.cat([a[n], b[n]]) for n in comp.input_names})
        split = a[comp.input_names[0]].shape[0]
        return [{n: v[:split] for n, v in both.items()}, {n: v[split:] for n, v in both.items()}]
