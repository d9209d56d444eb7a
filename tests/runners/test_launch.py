"""The distributed runner's CLI and RunConfig: ranks and devices from Placement, --cuts, errors."""

from __future__ import annotations

import pytest

from asyncdiff.placement import Placement
from asyncdiff.runners.distributed import RunConfig, get_partition
from asyncdiff.runners.launch import config, main, parser


def test_world_size_and_devices_come_from_placement():
    assert RunConfig(components=2, stride=2).world_size == 3
    assert RunConfig(components=2, stride=2, batched_stride=True).world_size == 2
    assert RunConfig(components=3).placement.device(2) == "cpu"
    assert RunConfig(components=2, stride=2, device="cuda").placement.device(2) == "cuda:2"
    assert RunConfig(components=2, device="cuda", gpus=(4, 6)).placement.device(1) == "cuda:6"
    with pytest.raises(ValueError, match="batched_stride only applies to stride 2"):
        RunConfig(components=2, stride=1, batched_stride=True).world_size


def test_cli_flags_reach_the_config():
    cfg = config(parser().parse_args([
        "--components", "3", "--stride", "2", "--batched-stride", "--cuts", "mid, up3_0",
        "--guidance-scale", "5", "--device", "cuda", "--gpus", "1,2,3"]))
    assert (cfg.components, cfg.stride, cfg.batched_stride) == (3, 2, True)
    assert cfg.cuts == ["mid", "up3_0"] and cfg.guidance_scale == 5.0
    assert cfg.placement.device(0) == "cuda:1"


def test_wrong_rank_count_fails_with_placements_message(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError) as expected:
        Placement(2, 2).check_world(2, "torchrun ranks")
    with pytest.raises(SystemExit) as exit_:
        main(["--components", "2", "--stride", "2"])
    assert exit_.value.code == 2
    assert str(expected.value) in capsys.readouterr().err


def test_without_torchrun_the_cli_says_how_to_launch(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["--components", "2", "--stride", "2"])
    assert "torchrun --nproc_per_node=3 -m asyncdiff.runners.distributed" in capsys.readouterr().err


def test_cuts_choose_the_split():
    cfg = RunConfig(components=2, latent=16, cuts=["mid"])
    part = get_partition(cfg)
    assert part.components[1].stages[0] == "mid"
    assert part.components[0].stages[-1] != "mid"
    balanced = get_partition(RunConfig(components=2, latent=16))
    assert balanced.components[1].stages[0] != "mid"  # the cut moved: cuts are not ignored
