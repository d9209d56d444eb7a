"""DistributedRunner: an AsyncDiff plan on torch.distributed, one process per device.

The entry point and the public names; the work is split by job:

* ``routing``  -- who sends which tensor to whom, derived from the plan;
* ``mailbox``  -- one ``batch_isend_irecv`` per phase (no NCCL wait cycle);
* ``job``      -- ``RunConfig``, the model, seeded inputs, the LocalRunner reference;
* ``rank``     -- ``DistributedRunner`` (one rank's loop) and ``run_generation``;
* ``launch``   -- process groups: torchrun CLI, local ``spawn``, ``run_jobs``.

Usage (W = N, or N+1 for plain stride 2)::

    torchrun --nproc_per_node=W -m asyncdiff.runners.distributed \\
        --model sd15 --components N --stride S --warmup 1 --steps 6 --check --json out.json
"""

from asyncdiff.runners.job import RunConfig, build_model, check, get_partition, make_conditioning, reference_latents
from asyncdiff.runners.launch import collect, free_port, init_group, main, run_jobs, spawn
from asyncdiff.runners.mailbox import Mailbox, Stats
from asyncdiff.runners.rank import DistributedRunner, run_generation
from asyncdiff.runners.routing import Msg, Routes, build_routes, latent_owner

__all__ = [
    "DistributedRunner", "Mailbox", "Msg", "Routes", "RunConfig", "Stats", "build_model", "build_routes",
    "check", "collect", "free_port", "get_partition", "init_group", "latent_owner", "main", "make_conditioning",
    "reference_latents", "run_generation", "run_jobs", "spawn",
]

if __name__ == "__main__":
    main()
