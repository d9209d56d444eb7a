"""DistributedRunner against LocalRunner: gloo ranks on 127.0.0.1, sd15 config at latent 16.

One group of 3 forked processes runs all four configurations (a process start with a
diffusers import costs more than the runs themselves); ranks a config does not use idle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from asyncdiff.configs import load_unet
from asyncdiff.runners.distributed import RunConfig, build_routes, get_partition, free_port, reference_latents, spawn
from asyncdiff.schedule import make_plan

STEPS = 6
CONFIGS = {
    "N2S1": RunConfig(components=2, stride=1, steps=STEPS),
    "N3S1": RunConfig(components=3, stride=1, steps=STEPS),
    "N2S2": RunConfig(components=2, stride=2, steps=STEPS),
    "N2S2-batched": RunConfig(components=2, stride=2, steps=STEPS, batched_stride=True),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks use one thread each: bit-exactness needs the same here
    try:
        results = spawn(list(CONFIGS.values()), world=3, method="fork", timeout_s=300)
        for res, cfg in zip(results, CONFIGS.values()):
            res["reference"] = reference_latents(cfg)
            if cfg.batched_stride:
                res["unbatched_reference"] = reference_latents(cfg, batched_stride=False)
    finally:
        torch.set_num_threads(threads)
    return dict(zip(CONFIGS, results))


@pytest.mark.parametrize("name", ["N2S1", "N3S1", "N2S2"])
def test_bit_identical_to_local_runner(runs, name):
    res = runs[name]
    assert res["world_size"] == (3 if name in ("N3S1", "N2S2") else 2)
    assert torch.equal(res["latents"], res["reference"])


def test_batched_stride_matches_within_reassociation(runs):
    res = runs["N2S2-batched"]
    assert res["world_size"] == 2
    assert torch.equal(res["latents"], res["reference"])  # same batched arithmetic as LocalRunner
    err = (res["latents"] - res["unbatched_reference"]).abs().max().item()
    assert err <= 1e-4


def test_sends_only_interface_tensors_and_keeps_own_share(runs):
    res = runs["N2S1"]
    part = get_partition(CONFIGS["N2S1"])
    by_rank = {s["rank"]: s for s in res["ranks"]}
    eps_bytes = 4 * 2 * 4 * 16 * 16  # fp32 [2, 4, 16, 16]
    # Rounds 0..T-2 feed a later call; the last round's activations are read by nobody.
    assert by_rank[0]["bytes_sent"] == (STEPS - 1) * part.cross_bytes()
    assert by_rank[1]["bytes_sent"] == STEPS * eps_bytes
    for s in res["ranks"]:
        assert s["compute_s"] > 0 and s["wall_s"] >= s["compute_s"]
        assert s["recv_wait_s"] >= 0 and s["send_wait_s"] >= 0
    # Each rank holds its own stages (+ the small time embedding both need), nothing else.
    unet = load_unet("sd15")
    full = sum(p.numel() for p in unet.parameters())
    temb = sum(p.numel() for p in unet.time_embedding.parameters())
    assert by_rank[0]["params"] + by_rank[1]["params"] == full + temb


def test_stride2_routes_follow_the_plan():
    cfg = CONFIGS["N2S2"]
    plan = make_plan(STEPS, 2, 2, 1)
    routes = build_routes(get_partition(cfg), plan, cfg.placement)
    for i, st in enumerate(plan.steps):
        eps = routes.eps[i]
        if st.mode == "compute":  # eps_i comes from the stride copy on rank N=2
            assert (eps.src, eps.step) == (2, i)
        elif st.mode == "comm":  # ... and eps_{i} of a comm step from rank 1's main call at i-1
            assert (eps.src, eps.step) == (1, i - 1)
    # The copy rank reads the warm-up outputs it never computed, as rank 1 does.
    assert {m.name for m in routes.needs[(2, 1)]} == {m.name for m in routes.needs[(1, 0)]}
    # The main prediction of the final round is never used, so never sent.
    assert not any(m.name == "noise_pred" and m.step == STEPS - 1 and m.src == 1 for m in routes.dests)


@pytest.mark.skipif(
    not os.environ.get("ASYNCDIFF_TORCHRUN_TESTS"),
    reason="set ASYNCDIFF_TORCHRUN_TESTS=1 (starts 3 fresh interpreters: ~30 s on 2 cores)",
)
def test_torchrun_cli_check(tmp_path):
    out = tmp_path / "n2s2.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "asyncdiff.runners.distributed", "--model", "sd15", "--components", "2", "--stride", "2",
        "--steps", str(STEPS), "--check", "--json", str(out),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: a hang is killed whole
    try:
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = json.loads(out.read_text())
    assert report["runs"][0]["check"]["equal_to_local"]
    assert len(report["runs"][0]["ranks"]) == 3
