"""Placement: which device runs which component call, for (N, S, batched stride, GPU list).

Pure Python (no torch). Every executor and deployment tool asks this module, so
"how many devices" and "where does the stride copy run" are decided once:

* component k runs on device (rank) k;
* plain stride 2 (S=2, N>1, no batched stride) adds device N, which runs the
  second copy of the last component (its tau_i call) beside device N-1;
* batched stride keeps N devices: the last device runs both timesteps of a
  round as one doubled batch;
* the pipeline (latents, scheduler, text encoder, VAE) lives with component 0.
* a call's outputs land on the device that consumes them: component k's on
  its main reader's (k+1 in a sequential split), the noise prediction, text
  states and image on the pipeline's.

A *rank* is a device position 0..world_size-1; ``gpus`` maps ranks to CUDA
device ids (``None``: CPU, one process or instance per rank).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncdiff.schedule import Step


@dataclass(frozen=True)
class Placement:
    components: int
    stride: int = 1
    batched_stride: bool = False
    gpus: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")
        if self.batched_stride and self.stride != 2:
            raise ValueError("batched_stride only applies to stride 2")
        if self.gpus is not None:
            object.__setattr__(self, "gpus", tuple(int(g) for g in self.gpus))
            if len(self.gpus) != self.world_size:
                raise ValueError(self._count_message(len(self.gpus), "GPUs are listed"))
            # A GPU may hold several ranks (e.g. every component on GPU 0 for a one-GPU check).
            if min(self.gpus) < 0:
                raise ValueError(f"gpus must be CUDA device ids >= 0, got {list(self.gpus)}")

    @classmethod
    def for_devices(cls, components: int, stride: int, batched_stride: bool,
                    gpus: list[int] | tuple[int, ...] | None) -> "Placement":
        """Same as the constructor; reads better where ``gpus`` comes from a flag."""
        return cls(components, stride, batched_stride, None if gpus is None else tuple(gpus))

    @classmethod
    def fit(cls, gpus: list[int] | tuple[int, ...], stride: int, components: int | None = None,
            batched_stride: bool | None = None) -> "Placement":
        """A placement for the GPUs at hand: N defaults to one component per GPU, and
        ``batched_stride=None`` picks batched stride when S=2 would otherwise need N+1 GPUs."""
        n = len(gpus) if components is None else components
        if batched_stride is None:
            batched_stride = stride == 2 and len(gpus) == n
        return cls(n, stride, batched_stride, tuple(gpus))

    # -- devices -------------------------------------------------------------
    @property
    def stride_device(self) -> bool:
        """True when plain stride 2 adds a device for the last component's second call."""
        return self.stride == 2 and not self.batched_stride and self.components > 1

    @property
    def world_size(self) -> int:
        """Devices (ranks, GPUs, CPU processes) this placement needs."""
        return self.components + int(self.stride_device)

    def check_world(self, available: int, what: str = "devices") -> None:
        """Raise the one message for a device count that does not fit."""
        if available != self.world_size:
            raise ValueError(self._count_message(available, f"{what} are available"))

    def _count_message(self, got: int, verb: str) -> str:
        why = (" (plain stride 2 adds one device for the last component's second call; "
               "use batched stride to stay on N)" if self.stride_device else "")
        return (f"N={self.components} S={self.stride}"
                f"{' batched-stride' if self.batched_stride else ''} needs {self.world_size} "
                f"devices{why}; {got} {verb}")

    def device(self, rank: int) -> str:
        """torch device string of a rank."""
        return "cpu" if self.gpus is None else f"cuda:{self.gpus[rank]}"

    # -- components ----------------------------------------------------------
    def component_ranks(self, k: int) -> tuple[int, ...]:
        """Ranks holding an instance of component k (the last one twice with plain S=2)."""
        if not 0 <= k < self.components:
            raise ValueError(f"component must be in [0, {self.components - 1}], got {k}")
        if k == self.components - 1 and self.stride_device:
            return (k, self.components)
        return (k,)

    def instance_gpus(self, k: int) -> tuple[int, ...]:
        """CUDA ids of component k's instances; empty on the CPU."""
        return () if self.gpus is None else tuple(self.gpus[r] for r in self.component_ranks(k))

    def instance_count(self, k: int) -> int:
        return len(self.component_ranks(k))

    @property
    def pipeline_rank(self) -> int:
        """Where latents, scheduler, text encoder and VAE live: beside component 0."""
        return 0

    @property
    def pipeline_gpu(self) -> int | None:
        return None if self.gpus is None else self.gpus[self.pipeline_rank]

    # -- where outputs land ---------------------------------------------------
    def consumer_rank(self, component: int, reader: int | None = None) -> int:
        """Rank that consumes component k's outputs, where a call should ask for them.

        The last component's outputs (the noise prediction, the stride copy's
        too) go to the pipeline. Component k < N-1's go to ``reader`` (default
        k+1), the component that reads most of them: one response lands on
        one device, so a skip read by a later component takes one more copy.
        With plain S=2 the last component's first instance is the target;
        Triton, not the caller, picks the instance.
        """
        last = self.components - 1
        if not 0 <= component <= last:
            raise ValueError(f"component must be in [0, {last}], got {component}")
        if component == last:
            return self.pipeline_rank
        reader = component + 1 if reader is None else reader
        if not component < reader <= last:
            raise ValueError(f"reader of component {component} must be in [{component + 1}, {last}], "
                             f"got {reader}")
        return self.component_ranks(reader)[0]

    def output_gpu(self, component: int | None = None, reader: int | None = None) -> int | None:
        """CUDA id a call asks its outputs in (``preferred_memory``); None on the CPU, where
        outputs stay where the runtime put them. ``component=None``: a pipeline network
        (text encoder, VAE), whose output the pipeline consumes."""
        if self.gpus is None:
            return None
        return self.gpus[self.pipeline_rank if component is None
                         else self.consumer_rank(component, reader)]

    def output_gpus(self, components) -> tuple[int | None, ...]:
        """``output_gpu`` of every component of a partition (``Partition.components``)."""
        readers = main_readers(components)
        return tuple(self.output_gpu(k, readers[k]) for k in range(self.components))

    # -- calls ---------------------------------------------------------------
    def rank_of(self, step: "Step", position: int) -> int:
        """Rank that executes call ``position`` of ``step``."""
        call = step.calls[position]
        if step.stride_copy and position == len(step.calls) - 1:
            return call.component if self.batched_stride else self.components
        return call.component

    def to_json(self) -> dict:
        return {"components": self.components, "stride": self.stride,
                "batched_stride": self.batched_stride, "world_size": self.world_size,
                "gpus": None if self.gpus is None else list(self.gpus),
                "ranks": [list(self.component_ranks(k)) for k in range(self.components)]}


def main_readers(components) -> list[int | None]:
    """For each component (``ComponentSpec``s), the later component that reads the most
    elements of its outputs (hidden and skip inputs it produced); None for the last."""
    readers = []
    for k in range(len(components)):
        read = {j: sum(t.numel for t in components[j].inputs if t.producer == k)
                for j in range(k + 1, len(components))}
        readers.append(max(read, key=lambda j: (read[j], -j)) if read else None)
    return readers


def main(argv: list[str] | None = None) -> int:
    """``python -m asyncdiff.placement --gpus 0,1 --stride 2``: the fitted placement as JSON,
    or (``--export-args``) as ``python -m export`` flags; exit 2 with the one message."""
    p = argparse.ArgumentParser(prog="python -m asyncdiff.placement", description=main.__doc__)
    p.add_argument("--gpus", required=True, help="comma-separated CUDA ids available")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--components", type=int, help="N (default: one per GPU)")
    p.add_argument("--batched-stride", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--export-args", action="store_true")
    a = p.parse_args(argv)
    try:
        place = Placement.fit([int(g) for g in a.gpus.split(",") if g.strip()], a.stride,
                              a.components, None if a.batched_stride == "auto"
                              else a.batched_stride == "yes")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.export_args:
        print(f"--components {place.components} --stride {place.stride} --gpus "
              f"{','.join(map(str, place.gpus))}{' --batched-stride' if place.batched_stride else ''}")
    else:
        print(json.dumps(place.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
