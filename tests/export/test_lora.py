"""``python -m export --lora PATH[:SCALE]``: a LoRA built here (peft, seeded random up-weights,
saved with diffusers' ``save_lora_weights``) is fused into the tiny model's UNet and text encoder;
the fused modules and the latents a real tritonserver serves equal diffusers' pipeline with the
LoRA loaded at the same scale."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from asyncdiff.contract import INPUT_BY_NAME, MODEL_NAME
from asyncdiff.tiny import MODEL_DIR
from export import cli
from export.lora import LoraSpec, fuse_loras

SCALE, STEPS, SEED, GUIDANCE = 0.7, 4, 3, 3.0
PROMPT = "a handwritten digit 7"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained():
    """The tiny pipeline with an unfused rank-4 LoRA (alpha 8) on the UNet's and the text
    encoder's attention projections; its up-weights are seeded random so it changes the output."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = tiny_pipeline()
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(unet_config)
    # transformers 5.24's add_adapter wants peft >= 0.22 (0.21.2 is pinned): inject through peft
    inject_adapter_in_model(text_config, pipe.text_encoder)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pipe, unet_config, text_config


@pytest.fixture(scope="module")
def lora_dir(trained, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe, unet_config, text_config = trained
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    assert (path / "pytorch_lora_weights.safetensors").is_file()
    return path


def fused_modules(*specs):
    """A fresh copy of the tiny UNet and text encoder with ``specs`` fused by export.lora."""
    base = tiny_pipeline()
    modules = {"unet": base.unet, "text_encoder": base.text_encoder}
    return modules, fuse_loras(str(MODEL_DIR), modules, list(specs))


def probe_inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    return ids, torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 24, generator=gen)


def forward(modules, **unet_kwargs):
    ids, sample, states = probe_inputs()
    with torch.no_grad():
        return (modules["text_encoder"](ids).last_hidden_state,
                modules["unet"](sample, 10, states, **unet_kwargs).sample)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def test_fused_modules_equal_diffusers_with_the_lora_loaded(trained, lora_dir):
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    modules, fused = fused_modules(LoraSpec(lora_dir, SCALE))
    assert [f.layers for f in fused] == [{"unet": 56, "text_encoder": 8}]
    assert "scale 0.7 into unet (56 layers), text_encoder (8 layers)" in fused[0].note()
    assert not any("lora" in n for n in modules["unet"].state_dict())  # plain modules again
    got = forward(modules)

    loaded = tiny_pipeline()  # diffusers' own loading of the saved file, at the same scale
    loaded.load_lora_weights(str(lora_dir), adapter_name="x")
    loaded.set_adapters(["x"], [SCALE])
    ref_loaded = forward({"unet": loaded.unet, "text_encoder": loaded.text_encoder})

    pipe = trained[0]  # the adapters the file was saved from, scaled as the pipeline does it
    scale_lora_layers(pipe.text_encoder, SCALE)
    try:
        ref_trained = forward({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                              cross_attention_kwargs={"scale": SCALE})
    finally:
        unscale_lora_layers(pipe.text_encoder, SCALE)
    base = forward({"unet": tiny_pipeline().unet, "text_encoder": tiny_pipeline().text_encoder})

    for name, g, a, b, o in zip(("text_encoder", "unet"), got, ref_loaded, ref_trained, base):
        print(f"{name}: fused vs diffusers-loaded {max_err(g, a):.2e}, vs the trained adapters "
              f"{max_err(g, b):.2e}, LoRA effect {max_err(g, o):.2e}")
        assert max_err(g, a) <= 1e-5 and max_err(g, b) <= 1e-5
        assert max_err(g, o) > 1e-2  # the LoRA changed the module clearly


def test_several_loras_add_up_with_their_scales(lora_dir):
    # The same LoRA twice at 0.7 and -0.3 is the LoRA once at 0.4.
    two, fused = fused_modules(LoraSpec(lora_dir, 0.7), LoraSpec(lora_dir, -0.3))
    one, _ = fused_modules(LoraSpec(lora_dir, 0.4))
    assert len(fused) == 2
    for a, b in zip(forward(two), forward(one)):
        assert max_err(a, b) <= 1e-5


def test_a_partly_matching_lora_is_refused_and_leaves_the_modules_unchanged(tmp_path):
    good = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    path = write_lora(tmp_path / "partly", {f"{good}.lora_A.weight": torch.ones(4, 64),
                                            f"{good}.lora_B.weight": torch.ones(64, 4),
                                            "nowhere.to_q.lora_A.weight": torch.ones(4, 64),
                                            "nowhere.to_q.lora_B.weight": torch.ones(64, 4)})
    base = tiny_pipeline()
    modules = {"unet": base.unet, "text_encoder": base.text_encoder}
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(ValueError, match="--lora .*partly: only 1 of its 2 LoRA layers for unet"):
        fuse_loras(str(MODEL_DIR), modules, [LoraSpec(path)])
    after = base.unet.state_dict()
    assert after.keys() == before.keys()  # the adapter layers are gone again
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spec_parsing(tmp_path):
    assert LoraSpec.parse("a/b") == LoraSpec(Path("a/b"), 1.0)
    assert LoraSpec.parse("a/b:0.5") == LoraSpec(Path("a/b"), 0.5)
    odd = tmp_path / "x:1"  # an existing path with a colon is taken whole
    odd.mkdir()
    assert LoraSpec.parse(str(odd)) == LoraSpec(odd, 1.0)
    with pytest.raises(ValueError, match="--lora .*scale"):
        LoraSpec.parse("a/b:strong")
    opts = cli.parse_args(["--components", "1", "--lora", "a:0.5", "--lora", "b"])
    assert opts.loras == (LoraSpec(Path("a"), 0.5), LoraSpec(Path("b"), 1.0))


def write_lora(path, unet_layers=None, **kwargs):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=unet_layers, **kwargs)
    return path


def run_cli(capsys, out, *args) -> tuple[int, str]:
    code = cli.main(["--components", "1", "--out", str(out), "--no-progress", *args])
    return code, capsys.readouterr().err


def test_option_errors_exit_2_before_any_export(lora_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    from safetensors.torch import save_file

    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    nowhere = write_lora(tmp_path / "nowhere", {"nowhere.to_q.lora_A.weight": down,
                                                "nowhere.to_q.lora_B.weight": up})
    other_file = tmp_path / "xl.safetensors"  # an SDXL LoRA's second text encoder
    save_file({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
               "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up},
              other_file)
    cases = [
        (["--lora", str(tmp_path / "missing")], "--lora .*missing: no such file"),
        (["--lora", f"{lora_dir}:strong"], "--lora .*scale .*must be a number"),
        (["--model", "sd15", "--lora", str(lora_dir)],
         "--lora needs --model to be a diffusers pipeline"),
        (["--lora", str(nowhere)], "--lora .*nowhere.*not found in the base model"),
        (["--lora", str(other_file)], "--lora .*weights for text_encoder_2, which a "
                                      "StableDiffusionPipeline does not have"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, out, *args)
        assert code == 2, (args, err)
        assert re.search(message, err), (message, err)
        assert not out.exists() or not list(out.rglob("*.onnx"))


# -- served ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_repo(lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-lora-n1")
    torch.set_grad_enabled(False)  # as cli.main does
    try:
        result = cli.run_export(cli.parse_args([
            "--model", "tiny", "--components", "1", "--lora", f"{lora_dir}:{SCALE}",
            "--out", str(out), "--no-progress", "--no-validate"]))  # parity: served vs diffusers
    finally:
        torch.set_grad_enabled(True)
    assert (f"note: LoRA {lora_dir} fused at scale {SCALE:g} into unet (56 layers), "
            "text_encoder (8 layers)") in cli.summary(result)
    return out


def served_latents(repo, log_dir) -> torch.Tensor:
    from serve.launcher import TritonServer

    values = {"PROMPT": PROMPT, "SEED": SEED, "STEPS": STEPS, "GUIDANCE_SCALE": GUIDANCE,
              "SCHEDULER": "ddim"}
    inputs = []
    for name, value in values.items():
        arr = INPUT_BY_NAME[name].encode(value)
        inputs.append(grpcclient.InferInput(name, list(arr.shape), INPUT_BY_NAME[name].dtype))
        inputs[-1].set_data_from_numpy(arr)
    with TritonServer(repo, log_file=log_dir / "server.log") as server, \
            grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(MODEL_NAME, inputs,
                              outputs=[grpcclient.InferRequestedOutput("LATENTS")])
    latents = np.array(result.as_numpy("LATENTS"))
    return torch.from_numpy(latents.reshape(-1, *latents.shape[-3:])[0])  # the first image


def diffusers_latents(lora_dir=None) -> torch.Tensor:
    pipe = tiny_pipeline()
    kwargs = {}
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
        kwargs = dict(cross_attention_kwargs={"scale": SCALE})  # UNet and text encoder alike
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent",
                    **kwargs).images[0]


def test_served_latents_equal_diffusers_with_the_lora(lora_repo, lora_dir, tmp_path, capsys):
    got = served_latents(lora_repo, tmp_path)
    ref, base = diffusers_latents(lora_dir), diffusers_latents()
    rel = (max_err(got, ref) / ref.abs().max()).item()
    effect = (max_err(ref, base) / ref.abs().max()).item()
    with capsys.disabled():
        print(f"\nLoRA served vs diffusers: max abs {max_err(got, ref):.2e}, relative {rel:.2e}; "
              f"LoRA effect (relative) {effect:.2e}")
    assert got.shape == ref.shape == (4, 16, 16)
    assert rel <= 1e-4
    assert effect > 1e-2
