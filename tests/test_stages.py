import pytest
import torch

from asyncdiff.configs import example_inputs, load_unet
from asyncdiff.stages import build_stage_graph, check_sample_size


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_stages_reproduce_the_unet(small_unets, name):
    unet = small_unets[name]
    graph = build_stage_graph(unet)
    sample, t, text, extra = example_inputs(dict(unet.config), 2, 16, 16)
    with torch.no_grad():
        ref = unet(sample, t, text, added_cond_kwargs=extra or None).sample
        out = graph.forward(sample, t, text, **extra)
    assert (out - ref).abs().max().item() == 0.0  # same modules, same order: bit-exact


def test_stage_list_and_skip_stack_sd15(small_unets):
    graph = build_stage_graph(small_unets["sd15"])
    assert graph.names[:4] == ["conv_in", "down0_0", "down0_1", "down0_ds"]
    assert graph.names[-1] == "conv_out" and "mid" in graph.names
    skips = graph.skips()
    # 4 down blocks x (2 resnets) + 3 downsamplers + conv_in = 12 pushes, popped by 4 x 3 up resnets.
    assert len(skips) == 12
    assert skips["up0_0"] == "down3_1" and skips["up3_2"] == "conv_in"
    assert sorted(skips.values()) == sorted(s.name for s in graph.stages if s.pushes)


def test_sdxl_keeps_transformer_depth_and_text_time(small_unets):
    graph = build_stage_graph(small_unets["sdxl"])
    assert graph.text_time
    attn = graph.stages[graph.index("down2_0")].attention
    assert len(attn.transformer_blocks) == 3


def test_unsupported_config_is_named():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, cross_attention_dim=8,
        class_embed_type="timestep", sample_size=8,
    )
    with pytest.raises(ValueError, match="class_embed_type"):
        build_stage_graph(unet)


def test_sample_size_must_divide():
    with pytest.raises(ValueError, match="height=12 must be a positive multiple of 8"):
        check_sample_size(dict(load_unet("sd15", device="meta").config), 12, 16)
