"""LocalRunner: the reference semantics of a plan, executed in one process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from asyncdiff.components import Component

if TYPE_CHECKING:
    from asyncdiff.generation import ComponentCall, Generation


class LocalRunner:
    """Runs every call of a ``Generation``'s waves in this process, one after another.

    Batched stride (``Generation(batched_stride=True)``) presents the two calls
    of the last component in an S=2 round as one call on a doubled batch, as
    a device would in the N-device stride variant; its outputs equal the two
    separate calls up to floating-point reassociation in batched kernels.
    """

    def __init__(self, components: Sequence[Component]):
        self.components = list(components)

    def generate(self, gen: "Generation") -> torch.Tensor:
        """Final latents of ``gen``."""
        return gen.run(self.run_wave)

    @torch.no_grad()
    def run_wave(self, calls: Sequence["ComponentCall"]) -> list[dict]:
        """Outputs of each call of a wave (this rank's share of it, for the distributed runner)."""
        return [self.components[c.component].run(c.inputs, c.section) for c in calls]
