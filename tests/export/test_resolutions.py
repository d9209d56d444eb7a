"""``python -m export --resolutions``: one partition at the default size, components with
dynamic spatial dims that compute the UNet at every exported size, configs with -1 spatial
dims, one TensorRT profile per size, the CUDA pool sized at the largest.

The tiny model's default is 16x16 pixels (VAE scale 1, latent 16x16; the UNet halves twice,
so sides are multiples of lcm(4, the contract's 8) = 8). The second size, 24x32 (WIDTHxHEIGHT),
changes both sides: latent height 32, width 24.
"""

from __future__ import annotations

import dataclasses
import shlex

import numpy as np
import pytest
import torch
from torch import nn

from asyncdiff.configs import load_unet, resolve
from asyncdiff.contract import MODEL_NAME, STREAM_MODEL_NAME
from asyncdiff.tiny import MODEL_DIR
from export import cli
from export import repository as repo_mod
from export import tensorrt as trt_mod
from export.onnx_export import FP32_TOL, Network, ParityError, export_network, session
from serve import deployment

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "unet" / "config.json").exists(),
                                reason="asyncdiff/tiny/model is not there yet")
SIZES = ((16, 16), (24, 32))  # (width, height) pixels, the default first
ARGV = ["--model", "tiny", "--components", "2", "--resolutions", "16x16,24x32", "--no-progress"]
SPATIAL = ("unet_part_0", "unet_part_1", "vae_decoder")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(options, result) of an onnxruntime export at both sizes, with parity checks."""
    out = tmp_path_factory.mktemp("resolutions")
    opts = cli.parse_args([*ARGV, "--out", str(out)])
    assert opts.resolutions == SIZES
    torch.set_grad_enabled(False)
    return opts, cli.run_export(opts)


def test_validated_at_every_size(exported):
    _, result = exported
    by_name = {a.name: a for a in result.artifacts}
    for name in SPATIAL:
        checks = by_name[name].checks
        # the export batch and batch + 1 at the default, the export batch at latent 32x24
        assert [c.size for c in checks] == [None, None, (32, 24)], name
        assert all(c.max_abs_err <= FP32_TOL for c in checks), (name, checks)
        assert list(by_name[name].size_shapes) == [(16, 16), (32, 24)]
    assert not by_name["text_encoder"].size_shapes  # no spatial dims: static as before
    assert result.partition.latent_height == result.partition.latent_width == 16  # one partition


def test_configs_have_dynamic_spatial_dims(exported):
    opts, _ = exported
    configs = repo_mod.read_configs(opts.out)
    dims = {name: {t.name: list(t.dims) for t in [*c.input, *c.output]}
            for name, c in configs.items()}
    assert dims["unet_part_0"]["sample"] == [4, -1, -1]
    assert dims["unet_part_1"]["noise_pred"] == [4, -1, -1]
    assert dims["unet_part_1"]["encoder_hidden_states"] == [77, 24]  # not spatial: static
    assert dims["vae_decoder"] == {"latents": [4, -1, -1], "image": [1, -1, -1]}
    assert dims["text_encoder"]["input_ids"] == [77]
    for k in (0, 1):  # every activation crossing the cut: channels static, both sides -1
        for name, d in dims[f"unet_part_{k}"].items():
            if name not in ("timestep", "encoder_hidden_states"):
                assert d[1:] == [-1, -1] and d[0] > 0, (k, name, d)
    for model in (MODEL_NAME, STREAM_MODEL_NAME):
        out = {o.name: list(o.dims) for o in configs[model].output}
        assert out["IMAGE"] == [-1, -1, -1, 3] and out["LATENTS"] == [-1, -1, -1, -1]
    params = repo_mod.pipeline_params(configs[STREAM_MODEL_NAME])
    assert params.resolutions == SIZES and params.sizes() == list(SIZES)
    assert params.image_shape == (16, 16, 3) and params.latent_shape == (4, 16, 16)


def test_components_chain_to_the_unet_at_the_second_size(exported):
    """onnxruntime's unet_part_0 -> unet_part_1 at latent 32x24 equals the torch UNet there."""
    opts, _ = exported
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 32, 24, generator=g)
    text = torch.randn(2, 77, 24, generator=g)
    timestep = torch.tensor([501.0, 501.0])
    tensors = {"sample": sample.numpy(), "timestep": timestep.numpy(),
               "encoder_hidden_states": text.numpy()}
    for k in (0, 1):
        sess = session(str(opts.out / f"unet_part_{k}" / "1" / cli.ONNX_FILE))
        feeds = {i.name: tensors[i.name] for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        tensors.update(zip(names, sess.run(names, feeds)))
    unet = load_unet(resolve("tiny"), device="cpu")
    with torch.no_grad():
        expected = unet(sample, timestep, text).sample.numpy()
    assert tensors["noise_pred"].shape == (2, 4, 32, 24)
    err = float(np.abs(tensors["noise_pred"] - expected).max())
    assert err <= FP32_TOL, err


def test_tensorrt_gets_one_profile_per_size(exported, tmp_path):
    """What --backend tensorrt writes from these artifacts: trtexec's --profile=<i> groups,
    the python builder's Profile objects, configs listing every profile."""
    opts, result = exported
    trt = dataclasses.replace(opts, backend="tensorrt", out=tmp_path)
    for art in result.artifacts:
        (tmp_path / art.name / "1").mkdir(parents=True)
        (tmp_path / art.name / "1" / cli.ONNX_FILE).symlink_to(art.path)
    place = cli.placement(trt)
    cli._write_configs(trt, tmp_path, result.artifacts, place)
    engines, commands = cli._engines(trt, tmp_path, result.artifacts, [])
    assert engines == [] and len(commands) == len(result.artifacts)
    by_model = {shlex.split(c)[1].split("=")[1].split("/")[0]: shlex.split(c) for c in commands}

    part1 = by_model["unet_part_1"]
    assert [a for a in part1 if a.startswith("--profile")] == ["--profile=0", "--profile=1"]
    groups = " ".join(part1).split("--profile=")[1:]
    assert "--minShapes=up1_0:1x64x8x8," in groups[0] and "--maxShapes=up1_0:8x64x8x8," in groups[0]
    assert "--optShapes=up1_0:2x64x16x12," in groups[1] and "conv_in:8x32x32x24" in groups[1]
    assert not any(a.startswith("--profile") for a in by_model["text_encoder"])  # static: one
    decoder = next(a for a in result.artifacts if a.name == "vae_decoder")
    profiles = cli._profile(trt, decoder, tmp_path / "vae_decoder" / "1" / cli.ONNX_FILE)
    assert [p.shapes for p in profiles] == [{"latents": (4, 16, 16)}, {"latents": (4, 32, 24)}]
    assert [(p.min_batch, p.opt_batch, p.max_batch) for p in profiles] == [(1, 1, 8)] * 2
    assert (tmp_path / cli.BUILD_SCRIPT).read_text().count("--profile=1 ") == len(SPATIAL) + 1

    configs = repo_mod.read_configs(tmp_path)
    for name in SPATIAL:
        group = configs[name].instance_group[0]
        assert configs[name].platform == "tensorrt_plan" and list(group.profile) == ["0", "1"]
        assert not configs[name].optimization.cuda.graphs
    assert list(configs["text_encoder"].instance_group[0].profile) == []
    # A graph with dynamic spatial dims needs the sizes to build a profile.
    with pytest.raises(ValueError, match="dynamic non-batch dim"):
        trt_mod.graph_profile(decoder.path, 1, 1, 8)


def test_cuda_pool_sized_at_the_largest(exported):
    opts, result = exported
    info = deployment.read(opts.out)
    default = result.partition.cross_bytes(4)
    assert info["default_bytes_per_round"] == default
    assert info["bytes_per_round"] == 3 * default  # 24x32 has 3x the pixels of 16x16
    assert info["resolutions"] == [list(s) for s in SIZES]
    assert deployment.largest_round_bytes(1000, [(512, 512), (1024, 768)]) == 3000
    assert deployment.largest_round_bytes(1000) == 1000
    info = deployment.write(opts.out.parent, [0], 66_000_000, 2, 8, [(512, 512), (768, 512)])
    assert info["cuda_memory_pool_bytes"] == deployment.cuda_pool_bytes(99_000_000, 2, 8)


class _FixedUpsample(nn.Module):
    def forward(self, x):  # traced: the export size becomes a constant of the graph
        return nn.functional.interpolate(x, size=(int(x.shape[2]) * 2, int(x.shape[3]) * 2))


def test_a_graph_that_bakes_the_size_in_fails_clearly(tmp_path):
    def make(batch, size=(4, 4)):
        return (torch.randn(batch, 2, *size, generator=torch.Generator().manual_seed(0)),)

    net = Network("fixed", _FixedUpsample(), ["x"], ["y"], make, sized_inputs=make)
    with pytest.raises(ParityError, match="at latent 6x4.*bakes in the export size"):
        export_network(net, tmp_path / "fixed.onnx", 1, sizes=[(4, 4), (6, 4)])


@pytest.mark.parametrize("argv, message", [
    (["--resolutions", "512"], "a size is WIDTHxHEIGHT"),
    (["--resolutions", "16x16,16x16"], "lists a size twice"),
    (["--resolutions", "16x16", "--height", "16"], "not both"),
    (["--resolutions", ","], "at least one WIDTHxHEIGHT"),
])
def test_bad_resolutions_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--model", "tiny", "--components", "2", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("size", ["20x16", "16x12"])
def test_sizes_the_model_cannot_take_exit_2(size, tmp_path, capsys):
    argv = ["--model", "tiny", "--components", "2", "--resolutions", f"16x16,{size}",
            "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--resolutions {size}: width and height must be multiples of 8 pixels" in err
    assert not any(tmp_path.iterdir())  # nothing exported
