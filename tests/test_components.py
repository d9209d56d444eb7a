import pytest
import torch

from asyncdiff.components import build_components, load_component, save_component
from asyncdiff.configs import example_inputs
from asyncdiff.partition import partition_unet


@pytest.mark.parametrize("name, n", [("sd15", 3), ("sd21", 2), ("sdxl", 4)])
def test_chained_components_equal_the_unet(small_unets, name, n):
    unet = small_unets[name]
    part = partition_unet(unet, n, model=name)
    comps = build_components(unet, part)
    sample, t, text, extra = example_inputs(dict(unet.config), 2, 16, 16)
    env = {"sample": sample, "timestep": t, "encoder_hidden_states": text, **extra}
    with torch.no_grad():
        for comp in comps:
            env.update(comp.run(env))
        ref = unet(sample, t, text, added_cond_kwargs=extra or None).sample
    assert (env["noise_pred"] - ref).abs().max().item() == 0.0


def test_component_holds_only_its_share(small_unets):
    unet = small_unets["sd15"]
    part = partition_unet(unet, 2, model="sd15")
    comps = build_components(unet, part)
    temb = {k for k, _ in unet.named_parameters() if k.startswith("time_embedding")}
    sizes = [sum(p.numel() for p in c.parameters()) for c in comps]
    total = sum(p.numel() for p in unet.parameters())
    temb_size = sum(p.numel() for k, p in unet.named_parameters() if k in temb)
    assert all(s < total for s in sizes)
    assert sum(sizes) == total + temb_size * (len(comps) - 1)


def test_save_and_load_rebuild_the_component(small_unets, tmp_path):
    unet = small_unets["sd21"]
    part = partition_unet(unet, 2, model="sd21")
    comp = build_components(unet, part)[1]
    save_component(comp, dict(unet.config), part.components[1], tmp_path)
    loaded = load_component(tmp_path)
    sample, t, text, _ = example_inputs(dict(unet.config), 2, 16, 16)
    env = {"sample": sample, "timestep": t, "encoder_hidden_states": text}
    with torch.no_grad():
        env.update(build_components(unet, part)[0].run(env))
        a, b = comp.run(env), loaded.run(env)
    assert torch.equal(a["noise_pred"], b["noise_pred"])
    assert loaded.input_names == comp.input_names
