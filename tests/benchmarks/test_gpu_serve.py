"""benchmarks.gpu_serve in its CPU mode: the cpu repository served by the tritonserver of an
unpacked trimmed archive (not the venv's wheel), against the in-process reference."""

from __future__ import annotations

import json
import sys
import tarfile

import numpy as np
import pytest

from asyncdiff.contract import INPUT_BY_FIELD, Request
from benchmarks import gpu_serve, triton_archive

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("carry")
    triton_archive.build(folder / gpu_serve.server_archive_name(VERSION), VERSION, preset=0)
    gpu_serve.prepare(folder / gpu_serve.REPOSITORIES, deployments=("cpu",))
    return folder


def test_cpu_mode_serves_from_the_archive_and_matches_in_process(carry, tmp_path):
    from asyncdiff.pipeline import AsyncDiffPipeline

    out = tmp_path / "result.json"
    assert gpu_serve.main(["run", "--device", "cpu", "--requests", "1", "--carry", str(carry),
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    served = result["deployments"]["cpu"]
    assert served["image_shape"] == [1, 16, 16, 3] and len(served["latency_s"]) == 1  # [NUM_IMAGES, ...]
    ref = AsyncDiffPipeline.from_pretrained("tiny", components=2)
    req = gpu_serve.REQUEST
    expected = ref.generate_latents(Request(req["prompt"], seed=req["seed"], steps=req["steps"]))[0]
    latents = np.asarray(served["latents"], dtype=np.float32).reshape(served["latents_shape"])
    assert latents.shape == (1, *expected.shape)
    assert np.abs(latents[0] - expected.numpy()).max() <= 1e-4


def test_a_missing_archive_is_reported_not_raised(tmp_path):
    result = gpu_serve.run("cpu", 1, tmp_path, tmp_path / "work")
    assert "make gpu-check-prepare" in result["error"]
    assert gpu_serve.summary(result)[0].startswith("gpu_serve on cpu")


def test_request_follows_the_contract():
    body = json.loads(gpu_serve.request_body())
    sent = {i["name"]: i for i in body["inputs"]}
    for key, value in gpu_serve.REQUEST.items():
        field = INPUT_BY_FIELD[key]
        assert sent[field.name] == {"name": field.name, "datatype": field.dtype, "shape": [1],
                                    "data": [value]}
    assert {o["name"] for o in body["outputs"]} == {"IMAGE", "LATENTS"}
    assert all(o["parameters"] == {"binary_data": False} for o in body["outputs"])


def test_identical_files_become_one_tar_member(tmp_path):
    for name, text in (("a", "same"), ("b", "same")):
        (tmp_path / name / "m").mkdir(parents=True)
        (tmp_path / name / "m" / "w.bin").write_text(text)
    (tmp_path / "b" / "m" / "c.pbtxt").write_text("differs")
    assert gpu_serve.link_duplicates(tmp_path / "a", tmp_path / "b") == 1
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(tmp_path / "a", "a")
        tar.add(tmp_path / "b", "b")
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert tar.getmember("b/m/w.bin").islnk()


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert gpu_serve.psnr(a, a) is None
    assert gpu_serve.psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)
