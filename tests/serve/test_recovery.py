"""A component whose stub died comes back through the repository API, and leaks no /dev/shm.

A real tritonserver on the tiny N=2 repository, started as `python -m serve` starts it
(explicit model control, every model loaded). The python stub of ``unet_part_1`` is
SIGKILLed: requests fail fast and name the model, an unload + load brings it back, the
same seed gives the same image again, and stopping the server removes the region the
dead stub left in /dev/shm.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.infer import GenerationParams, generate
from serve.__main__ import server_args
from serve.launcher import RECOVERABLE_ARGS, SHM_DIR, child_pids, stub_shm_files

KILLED = "unet_part_1"
PARAMS = GenerationParams("a handwritten digit 3", seed=11, steps=4)
# The pipeline's component timeout is 120 s; a dead stub answers at once, so 30 s is a hang.
NO_HANG_S = 30.0


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            return  # a zombie until tritonserver reaps it: dead all the same
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still alive after SIGKILL")
        time.sleep(0.05)


def stub_region(pid: int) -> Path:
    """The shm region a python stub was started with (its second argument)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return SHM_DIR / argv[2]


def test_serve_cli_defaults_to_recoverable_model_control():
    assert server_args([]) == list(RECOVERABLE_ARGS)
    assert server_args(["--log-verbose=1"]) == [*RECOVERABLE_ARGS, "--log-verbose=1"]
    # A mode chosen by the caller wins, with its own --load-model list.
    chosen = ["--model-control-mode=explicit", "--load-model=conv"]
    assert server_args(chosen) == chosen


def test_killed_component_is_reloaded_and_its_shm_region_removed(start_triton, tiny_repo):
    regions_before = stub_shm_files()
    server = start_triton(tiny_repo, extra_args=list(RECOVERABLE_ARGS))
    url = server.grpc_url
    reference = generate(PARAMS, url=url, timeout=120).image

    stubs = server.stub_processes()
    victim = stubs[f"{KILLED}_0_0"]
    assert victim in child_pids(server.pid), "only a stub of the server this test started"
    dead_region = stub_region(victim)
    assert dead_region.exists()
    os.kill(victim, signal.SIGKILL)
    wait_gone(victim)

    # The pipeline reloads the dead component itself and retries the call once.
    started = time.monotonic()
    healed = generate(PARAMS, url=url, timeout=120).image
    assert time.monotonic() - started < NO_HANG_S
    assert np.array_equal(healed, reference), "same seed, same image after the self-reload"
    assert server.stub_processes()[f"{KILLED}_0_0"] != victim
    assert f"the stub of '{KILLED}' died; reloading it" in server.log_tail(400)

    server.reload_model(KILLED)  # an operator's reload through the repository API works too
    recovered = generate(PARAMS, url=url, timeout=120).image
    assert recovered.dtype == np.uint8 and recovered.shape == reference.shape
    assert np.array_equal(recovered, reference), "same seed, same image after the reload"

    ours = server.shm_regions()
    assert dead_region in ours and dead_region.exists(), "Triton keeps the dead stub's region"
    server.stop()
    # Other people's servers come and go in /dev/shm: count only this server's regions.
    assert not ours & regions_before
    assert not ours & stub_shm_files(), "stop() left regions of its own stubs in /dev/shm"
