"""client/ against the real `asyncdiff` pipeline served by a real tritonserver (tiny model)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
import pytest

from client.__main__ import main as cli_main
from client.infer import GenerationParams, generate
from client.perf import run_perf
from serve.launcher import free_port


def url_of(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_applies_the_given_options(tiny_server, protocol):
    url = url_of(tiny_server, protocol)
    base = generate(GenerationParams("a handwritten digit 7", seed=3, steps=4), protocol=protocol,
                    url=url, timeout=60)
    assert base.images.dtype == np.uint8 and base.images.shape == (1, 16, 16, 3)
    assert base.latents.dtype == np.float32 and base.latents.shape == (1, 4, 16, 16)
    other = generate(GenerationParams("a handwritten digit 7", seed=3, steps=4, scheduler="euler",
                                      negative_prompt="1", guidance_scale=2.0, warmup=2),
                     protocol=protocol, url=url, timeout=60)
    assert np.abs(other.latents - base.latents).max() > 1e-3


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_writes_png_or_reports_server_error(tiny_server, protocol, tmp_path, capsys):
    url = url_of(tiny_server, protocol)
    out = tmp_path / "digit.png"
    assert cli_main(["a handwritten digit 7", "--protocol", protocol, "--url", url,
                     "--out", str(out), "--seed", "3", "--steps", "4", "--timeout", "60"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert cli_main(["x", "--protocol", protocol, "--url", url, "--steps", "0",
                     "--out", str(tmp_path / "no.png")]) == 1
    assert "STEPS must be in [1, 1000], got 0" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_cli_saves_every_image_and_takes_an_init_image(tiny_server, tmp_path, capsys):
    out = tmp_path / "digits.png"
    common = ["--url", tiny_server.grpc_url, "--steps", "4", "--upscale", "1", "--timeout", "60"]
    assert cli_main(["a handwritten digit 3", "--num-images", "2", "--seed", "5", "--out", str(out),
                     *common]) == 0
    first, second = tmp_path / "digits.0.png", tmp_path / "digits.1.png"
    assert first.is_file() and second.is_file() and str(second) in capsys.readouterr().out
    single = generate(GenerationParams("a handwritten digit 3", seed=6, steps=4),
                      url=tiny_server.grpc_url, timeout=60)
    assert np.array_equal(np.asarray(Image.open(second)), single.image)  # the second seed's image
    edited = tmp_path / "edited.png"
    assert cli_main(["a handwritten digit 8", "--init-image", str(first), "--strength", "0.5",
                     "--out", str(edited), *common]) == 0
    assert np.asarray(Image.open(edited)).shape == (16, 16, 3)


def test_cli_unreachable_server(capsys):
    assert cli_main(["x", "--url", f"127.0.0.1:{free_port()}", "--timeout", "5"]) == 1
    assert "error:" in capsys.readouterr().err


def test_perf_recipe_smoke(tiny_server, tmp_path, capsys):
    try:
        run_perf.perf_env(run_perf.find_perf_analyzer())
    except run_perf.PerfError as exc:
        pytest.skip(str(exc))
    report = tmp_path / "perf.json"
    assert run_perf.main(["--url", tiny_server.grpc_url, "--concurrency", "1",
                          "--measurement-interval", "1500",
                          "--bls-composing-models", "unet_part_0,unet_part_1",
                          "--json", str(report)]) == 0
    levels = json.loads(report.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1]
    assert all(lv["throughput"] > 0 and lv["p99_ms"] >= lv["p50_ms"] > 0 for lv in levels)
    assert {c["model"] for c in levels[0]["components"]} == {"unet_part_0", "unet_part_1"}
    assert "p99 ms" in capsys.readouterr().out
