"""Smoke test of benchmarks.fidelity (tiny sweep, same code path) and its metrics."""

import json
import math
import re

import numpy as np
import pytest

from benchmarks import fidelity
from benchmarks.metrics import PSNR_CAP_DB, gaussian_window, psnr, ssim

LINE = re.compile(r"^psnr_n2s1_w1=(\S+) acc_seq=(\S+) acc_n2s1_w1=(\S+)$")


def test_psnr_cap_and_value():
    a = np.zeros((2, 4, 4, 1))
    b = a.copy()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, b).tolist() == pytest.approx([PSNR_CAP_DB, 20.0])


def test_ssim_matches_direct_formula():
    from scipy.signal import correlate2d

    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 1))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    k = gaussian_window()
    f = lambda x: correlate2d(x[..., 0], k, mode="valid")  # noqa: E731
    ma, mb = f(a), f(b)
    va, vb, cab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()
    assert ssim(a, b)[0] == pytest.approx(want)
    assert ssim(a, a)[0] == pytest.approx(1.0)
    assert 0 < ssim(a, b)[0] < 1


def test_ideal_speedup():
    assert fidelity.ideal_speedup(25, 1, 1, 1) == 1.0
    assert fidelity.ideal_speedup(25, 2, 1, 1) == pytest.approx(25 / (1 + 24 / 2))
    assert fidelity.ideal_speedup(25, 3, 2, 1) == pytest.approx(25 / (1 + 12 / 3))


def test_pairs_cover_every_digit_and_are_fixed():
    from asyncdiff.tiny import digit_of

    pairs = fidelity.make_pairs(200)
    assert {p.digit for p in pairs} == set(range(10))
    assert all(digit_of(p.prompt) == p.digit for p in pairs)
    assert pairs == fidelity.make_pairs(200)


@pytest.fixture(scope="module")
def sd():
    from asyncdiff.tiny import load_pipeline

    return load_pipeline()


def test_batched_generate_equals_pipeline(sd):
    """The benchmark's batched sampler is the pipeline's per-request path."""
    from asyncdiff.contract import Request
    from asyncdiff.pipeline import AsyncDiffPipeline

    pipe = AsyncDiffPipeline(sd, components=2, stride=2)
    pair = fidelity.make_pairs(1)[0]
    req = Request(pair.prompt, seed=pair.seed, steps=5, guidance_scale=3.0, warmup=1)
    want = pipe.decode(pipe.generate_latents(req))
    got = fidelity.generate(pipe, [pair], 5, 3.0, 1)[0]
    np.testing.assert_array_equal(got, want)


def test_tiny_sweep(sd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("asyncdiff.tiny.load_pipeline", lambda: sd)
    out = tmp_path / "fidelity.json"
    result = fidelity.main(["--pairs", "4", "--steps", "6", "--configs", "1:1:1,2:1:1",
                            "--json", str(out), "--plot", str(tmp_path / "f.png")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m, last
    rows = {r["config"]: r for r in result["configs"]}
    # N=1 is the sequential plan: identical images, reported at the cap.
    assert rows["N1S1-w1"]["psnr_mean"] == PSNR_CAP_DB
    assert rows["N1S1-w1"]["ssim_mean"] == pytest.approx(1.0)
    psnr2 = rows["N2S1-w1"]["psnr_mean"]
    assert math.isfinite(psnr2) and 15.0 < psnr2 < PSNR_CAP_DB
    assert float(m.group(1)) == pytest.approx(psnr2, abs=0.01)
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.fidelity --pairs 4")
    assert {"platform", "cpu_count", "torch"} <= saved["machine"].keys()
    assert (tmp_path / "f.png").stat().st_size > 0
    # --report re-renders a saved run without sampling.
    fidelity.main(["--report", str(out)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last


# The trained tiny MMDiT (asyncdiff/tiny/sd3_model) through the same sweep.
DIT_SAMPLES = ((0, 0), (3, 0), (7, 1), (5, 2))  # (digit, seed) of the recognisability check


@pytest.fixture(scope="module")
def sd3():
    from asyncdiff.tiny.train_dit import load_sd3_pipeline

    pipe = load_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_folder_small_and_self_contained():
    from asyncdiff.tiny.train_dit import SD3_MODEL_DIR

    paths = list(SD3_MODEL_DIR.rglob("*"))
    assert not any(p.is_symlink() for p in paths)
    assert sum(p.stat().st_size for p in paths if p.is_file()) <= 15 * 10**6


def test_dit_draws_the_prompted_digit(sd3):
    """diffusers' own StableDiffusion3Pipeline on the committed folder draws the digit asked."""
    import torch

    from asyncdiff.tiny import classify, prompts_for

    prompts = [prompts_for(d)[2] for d, _ in DIT_SAMPLES]
    gens = [torch.Generator().manual_seed(s) for _, s in DIT_SAMPLES]
    with torch.no_grad():
        images = sd3(prompts, num_inference_steps=10, guidance_scale=3.0, generator=gens,
                     output_type="np").images
    assert images.shape == (len(DIT_SAMPLES), 16, 16, 1)
    assert classify(images).tolist() == [d for d, _ in DIT_SAMPLES]


def test_dit_sweep(sd3, tmp_path, monkeypatch):
    monkeypatch.setattr("asyncdiff.tiny.train_dit.load_sd3_pipeline", lambda: sd3)
    out = tmp_path / "fidelity_dit.json"
    result = fidelity.main(["--model", "tiny-sd3", "--pairs", "4", "--steps", "8",
                            "--configs", "1:1:1,2:1:1", "--json", str(out)])
    assert result["settings"]["scheduler"] == "flowmatch-euler"
    rows = {r["config"]: r for r in result["configs"]}
    # N=1 (our components) equals the whole transformer; N=2 differs from it, but far
    # less than an image of the same prompt with another seed does.
    assert rows["N1S1-w1"]["psnr_mean"] == PSNR_CAP_DB
    n2, other = rows["N2S1-w1"], result["psnr_other_seed_mean"]
    assert n2["psnr_mean"] < PSNR_CAP_DB
    assert n2["psnr_min"] > other + 6.0, (n2["psnr_min"], other)  # observed 29.1 vs 19.2 dB
    assert n2["agree_with_sequential"] == 1.0
    assert json.loads(out.read_text())["model_denoiser_sha256_16"] == fidelity.model_digest(
        fidelity.MODELS["tiny-sd3"])


def test_dit_training_collapses_zero_t5_tokens_exactly(sd3):
    """train_dit trains on one zero T5 token standing for 256: same transformer output."""
    import torch

    from asyncdiff.tiny.train_dit import collapse_zero_tokens, repeated_last_key

    with torch.no_grad():
        text, _, pooled, _ = sd3.encode_prompt(["digit 4", "the number seven"], None, None,
                                               do_classifier_free_guidance=False)
        short, count = collapse_zero_tokens(text)
        assert (text.shape[1], short.shape[1], count) == (333, 78, 256)
        x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([250.0, 800.0])
        full = sd3.transformer(hidden_states=x, encoder_hidden_states=text,
                               pooled_projections=pooled, timestep=t).sample
        with repeated_last_key(count):
            fast = sd3.transformer(hidden_states=x, encoder_hidden_states=short,
                                   pooled_projections=pooled, timestep=t).sample
    assert (fast - full).abs().max().item() <= 1e-5
