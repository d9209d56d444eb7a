"""client/ against the real `asyncdiff` pipeline served by a real tritonserver (tiny model)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from client.__main__ import main as cli_main
from client.infer import GenerationParams, generate
from client.perf import run_perf
from serve.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]


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


def test_img2img_takes_the_png_the_client_wrote(tiny_server, tmp_path, capsys):
    """The Quick tour's two lines: the saved PNG is upscaled to 256x256 and says so; img2img
    from it is sent at the served 16x16 (the exact pixels), or at another served size asked for."""
    seven = tmp_path / "seven.png"
    common = ["--url", tiny_server.grpc_url, "--steps", "4", "--timeout", "60"]
    assert cli_main(["the number seven", "--seed", "3", "--out", str(seven), *common]) == 0
    assert "(256x256 PNG: 16x16 upscaled 16x, --upscale 1 keeps it)" in capsys.readouterr().out
    assert Image.open(seven).size == (256, 256)
    one = tmp_path / "one.png"
    assert cli_main(["the number one", "--init-image", str(seven), "--strength", "0.6", "--seed", "3",
                     "--out", str(one), "--upscale", "1", *common]) == 0
    assert "seven.png is 256x256; resized to 16x16" in capsys.readouterr().err
    small = generate(GenerationParams("the number seven", seed=3, steps=4), url=tiny_server.grpc_url,
                     timeout=60).image
    expected = generate(GenerationParams("the number one", seed=3, steps=4, strength=0.6,
                                         init_image=small, width=16, height=16),
                        url=tiny_server.grpc_url, timeout=60).image
    assert np.array_equal(np.asarray(Image.open(one)), expected)
    wide = tmp_path / "wide.png"
    assert cli_main(["the number one", "--init-image", str(seven), "--width", "24", "--height", "16",
                     "--out", str(wide), "--upscale", "1", *common]) == 0
    assert Image.open(wide).size == (24, 16)


def test_cli_refuses_what_the_deployment_does_not_serve(tiny_server, tmp_path, capsys):
    common = ["--url", tiny_server.grpc_url, "--out", str(tmp_path / "no.png")]
    for count in ("0", "5"):  # the same range both ways: this deployment's
        assert cli_main(["x", "--num-images", count, *common]) == 1
        assert capsys.readouterr().err.strip() == (
            f"error: NUM_IMAGES must be in [1, 4] on this deployment (its max_batch_requests), got {count}")
    assert cli_main(["x", "--width", "32", "--height", "16", *common]) == 1
    assert "32x16 is not served; this deployment serves 16x16, 24x16" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("protocol, port, says", [
    ("grpc", None, "nothing answers gRPC at {url} (connection refused)"),
    ("http", None, "nothing answers HTTP at {url} (connection refused)"),
    ("grpc", "http", "{url} does not speak gRPC: is it Triton's HTTP port?"),
    ("http", "grpc", "{url} does not answer HTTP/1.1: is it Triton's gRPC port?"),
])
def test_connection_mistakes_are_one_line(tiny_server, protocol, port, says, capsys):
    """Server down, or the other protocol's port: one line naming it (gRPC streams by default)."""
    url = url_of(tiny_server, port) if port else f"127.0.0.1:{free_port()}"
    assert cli_main(["x", "--protocol", protocol, "--url", url, "--timeout", "5"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says.format(url=url)}"), lines


def test_ctrl_c_cancels_with_one_line(tiny_server, tmp_path):
    """SIGINT mid-stream: "interrupted", exit 130, no traceback; the server drops the request."""
    before = tiny_server.log_tail(100000).count("request cancelled")
    proc = subprocess.Popen([sys.executable, "-m", "client", "x", "--steps", "999", "--url",
                             tiny_server.grpc_url, "--out", str(tmp_path / "x.png")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            # A shell's background job (make test &) ignores SIGINT, and so would
                            # the client: give it the terminal's default, as a user's shell does.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    deadline = time.monotonic() + 60
    while "/999" not in "".join(err):  # the progress bar: the stream is running
        assert time.monotonic() < deadline and proc.poll() is None, "".join(err)
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, "".join(err)
    reader.join(timeout=10)
    text = "".join(err)
    assert text.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in text
    deadline = time.monotonic() + 15
    while tiny_server.log_tail(100000).count("request cancelled") <= before:
        assert time.monotonic() < deadline, tiny_server.log_tail()
        time.sleep(0.2)
    assert not (tmp_path / "x.png").exists()


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
