"""``python -m export`` on SD3 / FLUX transformers: a Triton repository of the DiT's components.

Tiny random transformers (``asyncdiff.configs.DIT_CONFIGS``) saved as diffusers writes them:
SD3 inside a pipeline folder (``model_index.json`` + ``transformer/`` only) and exported at two
sizes, FLUX as a bare transformer folder: these repositories hold the components alone.  A whole
SD3 or FLUX pipeline folder (``tests/tiny_sd3.py``, ``tests/tiny_flux.py``) adds its text
encoders, VAE decoder and the asyncdiff pipeline models (served:
tests/backends/test_sd3_serving.py, test_flux_serving.py).  One tritonserver serves the FLUX
components, chained.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as httpclient

from asyncdiff.configs import DIT_CONFIGS, denoiser_class, example_inputs
from export import cli
from export import repository as repo_mod
from export.onnx_export import FP32_TOL
from serve import deployment
from serve.launcher import TritonServer
from tests.tiny_sd3 import save_tiny_sd3

torch.set_num_threads(1)
SIZE = 16  # default latent side: 128 px
OTHER = (8, 32)  # SD3's second size, latent (height, width): --resolutions 256x64
COND = ["timestep", "pooled_projections"]  # what every DiT component recomputes its embedding from


def tiny_dit(kind: str, **overrides):
    config = {**DIT_CONFIGS[kind], **overrides}
    torch.manual_seed(0)
    return denoiser_class(config).from_config(config).eval()


def run(out, model, *argv):
    """``python -m export`` in-process: the result and its summary."""
    opts = cli.parse_args(["--model", str(model), "--components", "2", "--out", str(out),
                           "--no-progress", *argv])
    with torch.no_grad():
        result = cli.run_export(opts)
    return result, cli.summary(result)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    sd3, flux = tiny_dit("sd3"), tiny_dit("flux")
    folder = root / "sd3-pipeline"
    sd3.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    flux.save_pretrained(root / "flux-transformer")
    return {
        "sd3": (sd3, *run(root / "sd3-repo", folder, "--resolutions", "128x128,256x64")),
        "flux": (flux, *run(root / "flux-repo", root / "flux-transformer",
                            "--height", "128", "--width", "128")),
    }


def dims(spec) -> list[tuple[str, list[int]]]:
    return [(t.name, list(t.dims)) for t in spec]


def test_sd3_pipeline_folder_configs(exports):
    _, result, text = exports["sd3"]
    out = result.options.out
    configs = repo_mod.read_configs(out)
    assert sorted(configs) == ["unet_part_0", "unet_part_1"]  # no text encoder, VAE or BLS
    first, last = configs["unet_part_0"], configs["unet_part_1"]
    # Two sizes: the latent grid (and SD3's token grid, latent / patch 2) is dynamic; the text
    # tokens (77 CLIP + 256 T5) and the small conditioning inputs are not.
    assert dims(first.input) == [("sample", [16, -1, -1]), ("timestep", [1]),
                                 ("pooled_projections", [16]),
                                 ("encoder_hidden_states", [333, 32])]
    assert dims(first.output) == [("joint0", [-1, -1, 16]), ("joint0_txt", [333, 16])]
    assert dims(last.input) == [("joint0", [-1, -1, 16]), ("joint0_txt", [333, 16]),
                                ("timestep", [1]), ("pooled_projections", [16])]
    assert dims(last.output) == [("noise_pred", [16, -1, -1])]
    assert first.input[1].HasField("reshape")  # [B, 1] on the wire, [B] for the model
    assert first.max_batch_size == 8 and first.backend == "asyncdiff_component"
    info = deployment.read(out)
    assert info["resolutions"] == [[128, 128], [256, 64]] and info["batch"] == 2
    assert info["bytes_per_round"] == result.partition.cross_bytes(4) > 0
    # The export's own parity checks: batch 2 and 3 at the default size, and the other size.
    for art in result.artifacts:
        assert len(art.checks) >= 3 and art.max_abs_err <= FP32_TOL, (art.name, art.checks)
    assert "(SD3 transformer)" in text and "image/text token streams" in text
    assert "a StableDiffusion3Pipeline folder: only the SD3 transformer's components" in text
    assert "no text encoders, no VAE and no asyncdiff BLS" in text


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3-full") / "pipe")


def test_sd3_pipeline_folder_exports_the_pipeline_models(sd3_folder, tmp_path):
    """Each network checked against torch by export: CLIP-L/G (penultimate states + pooled),
    T5 at 256 tokens, the 16-channel VAE decoder at both sizes; no VAE encoder (SD3 img2img is
    not served)."""
    result, text = run(tmp_path / "repo", sd3_folder, "--resolutions", "32x32,64x32")
    configs = repo_mod.read_configs(result.options.out)
    assert sorted(configs) == ["asyncdiff", "asyncdiff_stream", "text_encoder", "text_encoder_2",
                               "text_encoder_3", "unet_part_0", "unet_part_1", "vae_decoder"]
    for art in result.artifacts:
        assert len(art.checks) >= 2 and art.max_abs_err <= FP32_TOL, (art.name, art.checks)
    assert len(next(a for a in result.artifacts if a.name == "vae_decoder").checks) == 3
    assert dims(configs["text_encoder"].output) == [("penultimate_hidden_state", [77, 8]),
                                                    ("text_embeds", [8])]
    assert dims(configs["text_encoder_3"].input) == [("input_ids", [256])]
    assert dims(configs["text_encoder_3"].output) == [("last_hidden_state", [256, 32])]
    assert dims(configs["vae_decoder"].input) == [("latents", [16, 16, -1])]  # width only moves
    params = repo_mod.pipeline_params(configs["asyncdiff_stream"])
    assert params.resolutions == ((32, 32), (64, 32)) and params.t5 and not params.img2img
    assert "served text-to-image through the asyncdiff BLS" in text
    assert "Not served: SD3 img2img" in text


def test_sd3_default_scheduler_must_be_flow_matching(sd3_folder, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli.main(["--model", str(sd3_folder), "--components", "1", "--out", str(out),
                     "--no-progress", "--no-validate", "--scheduler", "ddim"]) == 2
    err = capsys.readouterr().err
    assert "pipeline default: SCHEDULER 'ddim' does not fit" in err and "flowmatch-euler" in err
    assert repo_mod.our_models(out) == []


def test_flux_transformer_folder_configs(exports):
    _, result, text = exports["flux"]
    configs = repo_mod.read_configs(result.options.out)
    first, last = configs["unet_part_0"], configs["unet_part_1"]
    # Packed 2x2 latents: 8x8 = 64 image tokens of 16 channels, 512 T5 tokens; the rotary
    # embedding is recomputed from the ids and the guidance is embedded (FLUX dev).
    flux_cond = [("timestep", [1]), ("pooled_projections", [16]), ("guidance", [1]),
                 ("img_ids", [64, 3]), ("txt_ids", [512, 3])]
    assert dims(first.input) == [("sample", [64, 16]), *flux_cond,
                                 ("encoder_hidden_states", [512, 32])]
    assert dims(first.output) == [("joint1", [64, 16]), ("joint1_txt", [512, 16])]
    assert dims(last.input) == [("joint1", [64, 16]), ("joint1_txt", [512, 16]), *flux_cond]
    assert dims(last.output) == [("noise_pred", [64, 16])]
    assert [c.stages for c in result.partition.components] == [
        ["embed", "joint0", "joint1"], ["single0", "single1", "single2", "proj_out"]]
    assert all(a.max_abs_err <= FP32_TOL for a in result.artifacts)
    assert "FLUX transformer" in text and "one prompt is batch 1" in text
    assert deployment.read(result.options.out)["resolutions"] == [[128, 128]]


def test_flux_pipeline_folder_exports_the_pipeline_models(tiny_flux_repo):
    """CLIP (pooled output only), T5 at the components' 512 text tokens, the 16-channel VAE
    decoder, each checked against torch by export; no VAE encoder (FLUX img2img is not
    served)."""
    configs = repo_mod.read_configs(tiny_flux_repo)
    assert sorted(configs) == ["asyncdiff", "asyncdiff_stream", "text_encoder", "text_encoder_2",
                               "unet_part_0", "vae_decoder"]
    assert dims(configs["text_encoder"].output) == [("text_embeds", [16])]
    assert dims(configs["text_encoder_2"].input) == [("input_ids", [512])]
    assert dims(configs["text_encoder_2"].output) == [("last_hidden_state", [512, 32])]
    assert dims(configs["vae_decoder"].input) == [("latents", [16, 16, 16])]
    # The transformer takes the latents packed: 8 x 8 tokens of 2 x 2 x 16 features.
    assert dims(configs["unet_part_0"].input)[:1] == [("sample", [64, 64])]
    params = repo_mod.pipeline_params(configs["asyncdiff_stream"])
    assert (params.conditioning, params.latent_shape, params.resolutions) == (
        "flux", (16, 16, 16), ((32, 32),))
    assert (params.tokenizer_dir, params.tokenizer_2_dir) == ("tokenizer", "tokenizer_2")


def test_flux_pipeline_folder_notes_and_one_size(tiny_flux_folder, tmp_path, capsys):
    """The summary says what is served and what not; a second size is refused (the packed
    token streams have a fixed length), nothing left behind."""
    _, text = run(tmp_path / "repo", tiny_flux_folder, "--components", "1", "--no-validate",
                  "--height", "32", "--width", "32")
    assert "a FluxPipeline folder: served text-to-image through the asyncdiff BLS" in text
    assert "text_encoder_2 (T5, 512 tokens)" in text and "guidance embedding (dev)" in text
    assert "Not served: FLUX img2img" in text and "true CFG" in text and "prompt_2" in text
    assert "guidance 3.5 (FLUX pipelines' default)" in text
    out = tmp_path / "two-sizes"
    assert cli.main(["--model", str(tiny_flux_folder), "--components", "1", "--out", str(out),
                     "--no-progress", "--resolutions", "32x32,64x32"]) == 2
    assert "a FLUX repository serves one size" in capsys.readouterr().err
    assert repo_mod.our_models(out) == []


def reference(model, env):
    """``transformer(...)`` as diffusers' pipelines call it (2-D FLUX ids)."""
    env = {k: torch.from_numpy(v) for k, v in env.items()}
    kw = {k: env[k] for k in ("pooled_projections", "guidance") if k in env}
    kw.update({k: env[k][0] for k in ("img_ids", "txt_ids") if k in env})
    with torch.no_grad():
        return model(env["sample"], encoder_hidden_states=env["encoder_hidden_states"],
                     timestep=env["timestep"], **kw).sample.numpy()


def dit_inputs(model, batch, height, width, seed=3):
    sample, t, text, extra = example_inputs(dict(model.config), batch, height, width, seed=seed)
    env = {"sample": sample, "timestep": t, "encoder_hidden_states": text, **extra}
    return {k: v.numpy() for k, v in env.items()}


def chain(step, names, env) -> np.ndarray:
    """Run the components in order, each output joining ``env``; the noise prediction."""
    env = dict(env)
    for name in names:
        env.update(step(name, env))
    return env["noise_pred"]


@pytest.mark.parametrize("kind, sizes", [("sd3", [(SIZE, SIZE), OTHER]), ("flux", [(SIZE, SIZE)])])
def test_onnx_components_chained_equal_the_transformer(exports, kind, sizes):
    model, result, _ = exports[kind]
    names = [c.name for c in result.partition.components]
    sessions = {n: ort.InferenceSession(str(result.options.out / n / "1" / "model.onnx"))
                for n in names}

    def step(name, env):
        sess = sessions[name]
        feed = {i.name: env[i.name] for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))

    for batch, (h, w) in [(2, sizes[0]), (1, sizes[-1])]:
        env = dit_inputs(model, batch, h, w)
        err = float(np.abs(chain(step, names, env) - reference(model, env)).max())
        assert err <= 1e-5, (kind, batch, (h, w), err)


def test_flux_components_load_and_serve_in_tritonserver(exports, tmp_path):
    """Every model READY, and the components chained through Triton == the transformer."""
    model, result, _ = exports["flux"]
    out = result.options.out
    names = [c.name for c in result.partition.components]
    configs = repo_mod.read_configs(out)
    env = dit_inputs(model, 2, SIZE, SIZE)
    with TritonServer(out, log_file=tmp_path / "server.log") as server, \
            httpclient.InferenceServerClient(server.http_url) as client:
        assert {n: client.is_model_ready(n) for n in configs} == {n: True for n in configs}

        def step(name, env):
            inputs = []
            for spec in configs[name].input:
                array = np.ascontiguousarray(env[spec.name], dtype=np.float32)
                if spec.HasField("reshape"):
                    array = array.reshape(-1, 1)  # timestep, guidance: dims [1] on the wire
                inputs.append(httpclient.InferInput(spec.name, list(array.shape), "FP32"))
                inputs[-1].set_data_from_numpy(array)
            reply = client.infer(name, inputs)
            return {o.name: reply.as_numpy(o.name) for o in configs[name].output}

        served = chain(step, names, env)
    err = float(np.abs(served - reference(model, env)).max())
    assert served.shape == (2, 64, 16) and err <= 1e-5, err


@pytest.mark.parametrize("config, message", [
    ({"axes_dims_rope": [2, 2, 2]}, r"axes_dims_rope=\[2, 2, 2\] must sum to attention_head_dim=8"),
    ({"_class_name": "PixArtTransformer2DModel"},
     "_class_name='PixArtTransformer2DModel' is not supported"),
])
def test_unsupported_transformer_config_is_named(tmp_path, capsys, config, message):
    folder = tmp_path / "transformer"
    tiny_dit("flux", axes_dims_rope=config.get("axes_dims_rope", [2, 2, 4])).save_pretrained(folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    out = tmp_path / "repo"
    assert cli.main(["--model", str(folder), "--components", "2", "--out", str(out),
                     "--no-progress", "--height", "64", "--width", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert repo_mod.our_models(out) == []  # nothing left behind
