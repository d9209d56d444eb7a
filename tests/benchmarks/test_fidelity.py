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
