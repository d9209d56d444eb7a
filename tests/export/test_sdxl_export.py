"""Export of a saved SDXL pipeline folder (tiny, random weights): both text encoders, the
conditioning parameters, the folder's defaults, and onnxruntime parity of every model, end to
end against diffusers' ``StableDiffusionXLPipeline``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncdiff.conditioning import SizeConditioning, cfg_token_ids_each, sdxl_conditioning
from asyncdiff.contract import Request
from asyncdiff.generation import Generation
from asyncdiff.partition import Partition
from asyncdiff.pipeline import AsyncDiffPipeline
from export import cli
from export.onnx_export import session
from export.repository import pipeline_params, read_configs

STEPS = 5


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    return tiny_sdxl


@pytest.fixture(scope="module")
def folder(tiny_sdxl_folder):
    return tiny_sdxl_folder


def export(folder, out, *args):
    assert cli.main(["--model", str(folder), "--out", str(out), "--no-progress", *args]) == 0
    return out


@pytest.fixture(scope="module")
def repo1(folder, tmp_path_factory):
    return export(folder, tmp_path_factory.mktemp("sdxl-n1"), "--components", "1")


@pytest.fixture(scope="module")
def repo2(folder, tmp_path_factory):
    return export(folder, tmp_path_factory.mktemp("sdxl-n2"), "--components", "2")


class OnnxPipeline:
    """The served computation from an exported repository, with onnxruntime: what the BLS does."""

    def __init__(self, repo: Path):
        from transformers import CLIPTokenizer

        self.repo = Path(repo)
        self.params = pipeline_params(read_configs(repo)["asyncdiff_stream"])
        version = self.repo / "asyncdiff_stream" / "1"
        self.partition = Partition.load(version / self.params.partition_file)
        self.scheduler_config = json.loads((version / self.params.scheduler_config_file).read_text())
        self.tokenizers = [CLIPTokenizer.from_pretrained(version / d)
                           for d in (self.params.tokenizer_dir, self.params.tokenizer_2_dir)]

    def run(self, model: str, feeds: dict, outputs: list[str]) -> dict[str, np.ndarray]:
        sess = session(str(self.repo / model / "1" / "model.onnx"))
        return dict(zip(outputs, sess.run(outputs, feeds)))

    def conditioning(self, req: Request) -> dict[str, torch.Tensor]:
        p = self.params
        ids = cfg_token_ids_each(self.tokenizers, req)
        one = self.run(p.text_encoder.model, {p.text_encoder.input: ids[0]}, [p.text_encoder.output])
        two = self.run(p.text_encoder_2.model, {p.text_encoder_2.input: ids[1]},
                       [p.text_encoder_2.output, p.text_encoder_2_pooled])
        h, w, _ = p.image_shape
        return sdxl_conditioning(
            [torch.from_numpy(one[p.text_encoder.output]), torch.from_numpy(two[p.text_encoder_2.output])],
            torch.from_numpy(two[p.text_encoder_2_pooled]), SizeConditioning.default(h, w),
            zero_negative=p.force_zeros_for_empty_prompt and req.negative_prompt == "")

    def latents(self, req: Request) -> torch.Tensor:
        gen = Generation(self.partition, [req], self.conditioning(req), self.scheduler_config)

        def execute(wave):
            return [{k: torch.from_numpy(v) for k, v in self.run(
                c.model, {n: v.numpy() for n, v in c.inputs.items()}, c.output_names).items()}
                for c in wave]

        return gen.run(execute)


def request(negative="", seed=3, **kw):
    return Request("a red cube on a table", negative, seed=seed, steps=STEPS, guidance_scale=5.0,
                   scheduler="euler", **kw)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_both_text_encoders_and_the_conditioning_are_exported(repo2, folder):
    configs = read_configs(repo2)
    assert {"text_encoder", "text_encoder_2", "vae_decoder", "unet_part_0", "unet_part_1",
            "asyncdiff", "asyncdiff_stream"} <= set(configs)
    assert [o.name for o in configs["text_encoder"].output] == ["penultimate_hidden_state"]
    assert [o.name for o in configs["text_encoder_2"].output] == ["penultimate_hidden_state",
                                                                  "text_embeds"]
    p = pipeline_params(configs["asyncdiff_stream"])
    assert p.conditioning == "sdxl" and p.force_zeros_for_empty_prompt
    assert p.text_encoder.output == p.text_encoder_2.output == "penultimate_hidden_state"
    # the folder's scheduler class and SDXL's guidance are the served defaults
    assert (p.defaults.scheduler, p.defaults.guidance_scale) == ("euler", 5.0)
    served = json.loads((repo2 / "asyncdiff_stream/1" / p.scheduler_config_file).read_text())
    assert served == json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert {"text_embeds", "time_ids", "penultimate_hidden_state"} <= set(p.dtypes)


def test_every_model_matches_torch(repo2, xl):
    ours = OnnxPipeline(repo2)
    ids = cfg_token_ids_each(ours.tokenizers, Request("a cube", "dark"))
    for ids_, encoder, name in ((ids[0], xl.text_encoder, "text_encoder"),
                                (ids[1], xl.text_encoder_2, "text_encoder_2")):
        with torch.no_grad():
            ref = encoder(torch.from_numpy(ids_), output_hidden_states=True)
        outs = ours.run(name, {"input_ids": ids_}, ["penultimate_hidden_state"])
        assert np.abs(outs["penultimate_hidden_state"] - ref.hidden_states[-2].numpy()).max() <= 1e-5
        if name == "text_encoder_2":
            pooled = ours.run(name, {"input_ids": ids_}, ["text_embeds"])["text_embeds"]
            assert np.abs(pooled - ref.text_embeds.numpy()).max() <= 1e-5
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_image = xl.vae.decode(z).sample.numpy()
    image = ours.run("vae_decoder", {"latents": z.numpy()}, ["image"])["image"]
    assert image.shape == (1, 3, 32, 32) and np.abs(image - ref_image).max() <= 1e-4


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_n1_onnxruntime_equals_diffusers(repo1, xl, negative):
    from tests.test_pipeline_sdxl import diffusers_latents

    req = request(negative)
    ours = OnnxPipeline(repo1).latents(req)
    ref = diffusers_latents(xl, req)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)


def test_n2_onnxruntime_equals_the_in_process_runner(repo2, xl):
    req = request("blurry", warmup=2)
    ours = OnnxPipeline(repo2).latents(req)
    ref = AsyncDiffPipeline(xl, components=2).generate_latents(req)
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)


def test_fp16_keeps_the_upcast_vae_fp32(folder, tmp_path, capsys):
    out = export(folder, tmp_path / "fp16", "--components", "1", "--fp16", "--no-validate")
    configs = read_configs(out)
    assert configs["vae_decoder"].input[0].data_type == 11  # TYPE_FP32
    assert configs["unet_part_0"].input[0].data_type == 10  # TYPE_FP16
    assert "vae_decoder stays fp32 under --fp16: its config sets force_upcast" in capsys.readouterr().out


def test_an_sd_folder_gets_sd_defaults_and_its_safety_checker_is_named(tmp_path, capsys):
    from asyncdiff.tiny import MODEL_DIR

    folder = tmp_path / "sd"
    shutil.copytree(MODEL_DIR, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    out = export(folder, tmp_path / "repo", "--components", "1", "--no-validate")
    p = pipeline_params(read_configs(out)["asyncdiff_stream"])
    assert p.conditioning == "sd" and p.text_encoder.output == "last_hidden_state"
    assert (p.defaults.scheduler, p.defaults.guidance_scale) == ("ddim", 7.5)
    printed = capsys.readouterr().out
    assert "guidance 7.5 (SD pipelines' default)" in printed
    assert "safety_checker: it is not served" in printed
    # an explicit value wins over the folder's
    out = export(folder, tmp_path / "repo2", "--components", "1", "--no-validate",
                 "--guidance-scale", "2.5", "--scheduler", "dpmsolver++")
    p = pipeline_params(read_configs(out)["asyncdiff_stream"])
    assert (p.defaults.scheduler, p.defaults.guidance_scale) == ("dpmsolver++", 2.5)


def test_outer_ring_n3_onnxruntime_equals_the_in_process_runner(folder, xl, tmp_path):
    out = export(folder, tmp_path / "ring", "--components", "3", "--layout", "outer-ring")
    ours = OnnxPipeline(out)
    assert ours.partition.layout == "outer_ring"
    ring = ours.partition.components[-1]
    assert ring.stages[0] == "conv_in" and ring.stages[-1] == "conv_out"
    p = ours.params
    assert {"sample", "noise_pred", "text_embeds", "time_ids"} <= set(p.dtypes)
    for stride in (1, 2):  # the ONNX ring runs whole on placeholders in its warm-up front call
        req = request("blurry", warmup=2)
        part = ours.partition
        if stride == 2:
            part = Partition.from_json({**part.to_json(), "stride": 2})
            ours.partition = part
        got = ours.latents(req)
        ref = AsyncDiffPipeline(xl, components=3, stride=stride, layout="outer-ring",
                                cuts=part.cuts).generate_latents(req)
        assert rel(got, ref) <= 1e-4, (stride, rel(got, ref))
