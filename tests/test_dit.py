"""SD3 (MMDiT) and FLUX.1 transformers through the same stage graph, partition and components
as the UNet, on narrowed random configs (``asyncdiff.configs.DIT_CONFIGS``)."""

import pytest
import torch

from asyncdiff.components import build_components, load_component, save_component
from asyncdiff.configs import DIT_CONFIGS, denoiser_class, denoiser_kind, example_inputs
from asyncdiff.partition import ACTIVATION_ROLES, main, partition_denoiser
from asyncdiff.profile import profile_stages
from asyncdiff.stages import build_stage_graph, check_sample_size

SIZE = 16  # latent side: SD3 8x8 patches of 2, FLUX 8x8 packed tokens
# name -> (built-in config, overrides): SD3.5's q/k RMS norm and dual attention, FLUX dev
# (guidance embedding) and schnell (none).
VARIANTS = {
    "sd3": ("sd3", {}),
    "sd3.5": ("sd3", {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}),
    "flux-dev": ("flux", {}),
    "flux-schnell": ("flux", {"guidance_embeds": False}),
}


@pytest.fixture(scope="module")
def dits():
    models = {}
    for name, (base, overrides) in VARIANTS.items():
        config = {**DIT_CONFIGS[base], **overrides}
        torch.manual_seed(0)
        models[name] = denoiser_class(config).from_config(config).eval()
    return models


def inputs(model, batch=2, seed=0):
    sample, t, text, extra = example_inputs(dict(model.config), batch, SIZE, SIZE, seed=seed)
    return {"sample": sample, "timestep": t, "encoder_hidden_states": text, **extra}


def reference(model, env):
    """``transformer(...)`` as diffusers' pipelines call it (2-D ids)."""
    kw = {k: env[k] for k in ("pooled_projections", "guidance") if k in env}
    kw.update({k: env[k][0] for k in ("img_ids", "txt_ids") if k in env})
    return model(env["sample"], encoder_hidden_states=env["encoder_hidden_states"],
                 timestep=env["timestep"], **kw).sample


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stages_reproduce_the_transformer(dits, name):
    model = dits[name]
    graph = build_stage_graph(model)
    env = inputs(model)
    cond = {k: v for k, v in env.items() if k not in ("sample", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        ref = reference(model, env)
        out = graph.forward(env["sample"], env["timestep"], env["encoder_hidden_states"], **cond)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() == 0.0  # same modules, same order: bit-exact


def test_stage_lists_and_token_streams(dits):
    sd3, flux = build_stage_graph(dits["sd3"]), build_stage_graph(dits["flux-dev"])
    assert sd3.names == ["embed", "joint0", "joint1", "joint2", "proj_out"]
    assert flux.names == ["embed", "joint0", "joint1", "single0", "single1", "single2", "proj_out"]
    last_joint = sd3.stages[sd3.index("joint2")]
    assert last_joint.writes == ["joint2"]  # context_pre_only: the text stream ends here
    assert sd3.stages[-1].reads() == [("joint2", "image_tokens")]
    single = flux.stages[flux.index("single0")]
    assert single.reads() == [("joint1", "image_tokens"), ("joint1_txt", "text_tokens")]
    assert single.writes == ["single0", "single0_txt"]
    assert sd3.skips() == {} and flux.skips() == {}
    assert [n for n, _ in flux.time_embedding.inputs] == [
        "timestep", "pooled_projections", "guidance", "img_ids", "txt_ids"]
    no_guidance = build_stage_graph(dits["flux-schnell"]).time_embedding.inputs
    assert "guidance" not in dict(no_guidance)


def test_kind_is_read_from_the_config_and_unsupported_ones_are_named(dits):
    assert [denoiser_kind(m.config) for m in dits.values()] == ["sd3", "sd3", "flux", "flux"]
    with pytest.raises(ValueError, match="_class_name='PixArtTransformer2DModel' is not supported"):
        denoiser_kind({"_class_name": "PixArtTransformer2DModel"})
    bad = {**DIT_CONFIGS["flux"], "axes_dims_rope": [2, 2, 2]}
    with torch.device("meta"):
        model = denoiser_class(bad).from_config(bad)
    with pytest.raises(ValueError, match=r"axes_dims_rope=\[2, 2, 2\] must sum to attention_head_dim=8"):
        build_stage_graph(model)


@pytest.mark.parametrize("kind, height, message", [
    ("sd3", 15, "latent height=15 must be a positive multiple of 2"),
    ("sd3", 34, "latent height=34 is over 32: pos_embed_max_size=16 patches of 2"),
    ("flux", 7, "latent height=7 must be a positive multiple of 2"),
])
def test_latent_size_is_checked(kind, height, message):
    with pytest.raises(ValueError, match=message):
        check_sample_size(DIT_CONFIGS[kind], height, SIZE)


def test_profile_counts_every_stage_and_keeps_the_sd3_token_grid(dits):
    graph = build_stage_graph(dits["sd3"])
    prof = profile_stages(graph, 2, SIZE, SIZE, "flops")
    assert prof.names == graph.names and all(c > 0 for c in prof.costs)
    assert prof.shapes["joint0"] == [2, 8, 8, 16] and prof.shapes["joint0_txt"] == [2, 333, 16]
    assert prof.shapes["proj_out"] == [2, 16, SIZE, SIZE] and prof.latent == [SIZE, SIZE]
    flux = profile_stages(build_stage_graph(dits["flux-dev"]), metric="flops",
                          inputs=inputs(dits["flux-dev"]))
    assert flux.latent == [SIZE, SIZE] and flux.shapes["single2_txt"] == [2, 512, 16]


@pytest.mark.parametrize("name, n", [("sd3", 2), ("sd3.5", 3), ("flux-dev", 3), ("flux-schnell", 2)])
def test_partition_passes_both_token_streams(dits, name, n):
    part = partition_denoiser(dits[name], n, model=name, height=SIZE, width=SIZE)
    comps = part.components
    assert [t.role for t in comps[0].inputs][0] == "latent"
    assert all(t.role != "latent" for c in comps[1:] for t in c.inputs)
    assert comps[-1].output_names == ["noise_pred"]
    crossing = 0
    for comp in comps[1:]:
        foreign = [t for t in comp.inputs if t.producer is not None]
        assert {t.role for t in foreign} <= set(ACTIVATION_ROLES) - {"hidden", "skip"}
        assert {t.producer for t in foreign} == {comp.index - 1}
        assert [t.name for t in foreign] == comps[comp.index - 1].output_names  # both streams
        assert {"timestep", "pooled_projections"} <= set(comp.input_names)
        crossing += sum(t.numel for t in foreign)
    assert part.cross_bytes() == 4 * crossing > 0
    if name.startswith("flux"):
        assert {"img_ids", "txt_ids"} <= set(comps[-1].input_names)
        assert ("guidance" in comps[-1].input_names) == (name == "flux-dev")


def test_cuts_reproduce_a_split_and_round_trip(dits, tmp_path):
    from asyncdiff.partition import Partition

    model = dits["flux-dev"]
    part = partition_denoiser(model, None, model="flux", height=SIZE, width=SIZE, cuts=["single0"])
    assert part.components[0].stages == ["embed", "joint0", "joint1"]
    assert part.components[1].input_names[:2] == ["joint1", "joint1_txt"]
    part.save(tmp_path / "p.json")
    assert Partition.load(tmp_path / "p.json") == part
    balanced = partition_denoiser(model, 3, model="flux", height=SIZE, width=SIZE)
    again = partition_denoiser(model, 3, model="flux", height=SIZE, width=SIZE, cuts=balanced.cuts)
    assert again == balanced
    with pytest.raises(ValueError, match=r"'up0_0' is not a stage; stages: embed, joint0, "):
        partition_denoiser(model, None, model="flux", height=SIZE, width=SIZE, cuts=["up0_0"])


@pytest.mark.parametrize("name, n", [("sd3.5", 3), ("flux-dev", 4)])
def test_chained_components_equal_the_transformer_and_hold_their_share(dits, name, n):
    model = dits[name]
    part = partition_denoiser(model, n, model=name, height=SIZE, width=SIZE)
    comps = build_components(model, part)
    env = inputs(model)
    with torch.no_grad():
        ref = reference(model, env)
        for comp in comps:
            env.update(comp.run(env))
    assert (env["noise_pred"] - ref).abs().max().item() == 0.0
    # Each component holds its own stages and, where its blocks need it, a copy of the
    # time/pooled(/guidance) embedding; nothing else.
    sizes = [sum(p.numel() for p in c.parameters()) for c in comps]
    cond = sum(p.numel() for p in model.time_text_embed.parameters())
    copies = sum(c.time_embedding is not None for c in comps)
    assert sum(sizes) == sum(p.numel() for p in model.parameters()) + cond * (copies - 1)


def test_save_and_load_rebuild_a_dit_component(dits, tmp_path):
    model = dits["flux-dev"]
    part = partition_denoiser(model, 2, model="flux", height=SIZE, width=SIZE)
    first, last = build_components(model, part)
    save_component(last, dict(model.config), part.components[1], tmp_path)
    loaded = load_component(tmp_path)
    env = inputs(model)
    with torch.no_grad():
        env.update(first.run(env))
        a, b = last.run(env), loaded.run(env)
    assert torch.equal(a["noise_pred"], b["noise_pred"])
    assert loaded.input_names == last.input_names


def test_cli_prints_token_traffic_for_a_dit(capsys):
    main(["--model", "flux", "--components", "2"])
    out = capsys.readouterr().out
    assert "batch=1 latent=128x128" in out  # FLUX dev: no CFG batch, 1024 px default
    assert "image_tokens" in out and "text_tokens" in out and "cross-cut traffic per round" in out


def test_full_size_sd3_medium_balances_to_the_asyncdiff_split():
    """On the meta device (shapes only): the FLOP balance of the published SD3-medium shape
    finds the official AsyncDiff split (pipe_config.py: blocks 0-11 | 12-23 and
    0-5 | 6-11 | 12-17 | 18-23, norm_out + proj_out on the last component)."""
    from asyncdiff.configs import load_denoiser
    from asyncdiff.partition import build_partition, graph_interface

    graph = build_stage_graph(load_denoiser("sd3-medium", device="meta"))
    prof = profile_stages(graph, 2, 128, 128, "flops")
    cuts = {n: build_partition(prof, num_components=n, model="sd3-medium",
                               **graph_interface(graph)).cuts for n in (2, 4)}
    assert cuts == {2: ["joint12"], 4: ["joint6", "joint12", "joint18"]}


def test_a_pipeline_folder_with_a_transformer_loads_by_its_class(dits, tmp_path):
    from asyncdiff.configs import load_denoiser, resolve

    dits["flux-dev"].save_pretrained(tmp_path / "transformer")
    source = resolve(str(tmp_path))
    assert source.unet_dir == tmp_path / "transformer"
    loaded = load_denoiser(source)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), dits["flux-dev"].parameters()))
    config = tmp_path / "transformer" / "config.json"
    config.write_text(config.read_text().replace("FluxTransformer2DModel", "PixArtTransformer2DModel"))
    with pytest.raises(ValueError, match="_class_name='PixArtTransformer2DModel' is not supported"):
        load_denoiser(source, device="meta")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cli_prints_each_share_and_the_bytes_per_round(name, tmp_path, capsys):
    """The partition CLI on the narrowed DiTs (``sd3-medium`` / ``flux-dev`` run the same code on
    the meta device): each component's cost share and the traffic per round, as the partition
    it saves has them; only the two token streams cross."""
    import re

    from asyncdiff.partition import Partition

    path = tmp_path / "partition.json"
    main(["--model", name, "--components", "3", "--json", str(path)])
    out = capsys.readouterr().out
    part = Partition.load(path)
    shares = [float(x) for x in re.findall(r"GFLOP \(([\d.]+)%\)", out)]
    assert shares == [round(100 * part.cost_share(k), 1) for k in range(3)]
    assert sum(shares) == pytest.approx(100, abs=0.2)
    crossing = [t for c in part.components for t in c.inputs if t.producer is not None]
    assert {t.role for t in crossing} == {"image_tokens", "text_tokens"}
    assert part.cross_bytes() == sum(4 * t.numel for t in crossing) > 0
    mb = float(re.search(r"cross-cut traffic per round ([\d.]+) MB fp32", out).group(1))
    assert mb == round(part.cross_bytes() / 1e6, 3)
