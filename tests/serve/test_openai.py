"""The OpenAI-compatible images API (``python -m serve.openai``) against the real tritonserver
of ``tiny_server``, through the official ``openai`` client. Every image is compared pixel for
pixel with a direct tritonclient gRPC request of the same inputs."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from PIL import Image

from asyncdiff.contract import INIT_IMAGE, INPUT_BY_FIELD, MODEL_NAME
from serve.launcher import free_port
from serve.openai import IMAGE_OUTPUT, Settings, create_app, fit_image
from serve.openai import main as openai_main

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a handwritten digit 7"
FAST = {"seed": 3, "steps": 4}  # extensions of every request here: cheap and deterministic


@pytest.fixture(scope="module")
def api_url(tiny_server, tmp_path_factory) -> Iterator[str]:
    """``python -m serve.openai`` (the CLI as a user runs it) in front of ``tiny_server``."""
    port = free_port()
    log = tmp_path_factory.mktemp("openai-api") / "api.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve.openai", "--triton-url", tiny_server.grpc_url,
                                 "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            if http(f"{url}/health")[0] == 200:
                break
            assert time.monotonic() < deadline, f"the API did not become ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a JSON POST when ``body`` is given; (0, {}) when
    nothing answers."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def direct(tiny_server, init_image: np.ndarray | None = None, **fields) -> np.ndarray:
    """IMAGE of one direct gRPC request: contract Request field -> value, as the API sends them."""
    arrays = {INPUT_BY_FIELD[name].name: INPUT_BY_FIELD[name].encode(v) for name, v in fields.items()}
    dtypes = {INPUT_BY_FIELD[name].name: INPUT_BY_FIELD[name].dtype for name in fields}
    if init_image is not None:
        arrays[INIT_IMAGE.name], dtypes[INIT_IMAGE.name] = init_image, INIT_IMAGE.dtype
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(tiny_server.grpc_url) as triton:
        return triton.infer(MODEL_NAME, inputs, client_timeout=120).as_numpy(IMAGE_OUTPUT.name)


def served_inputs(tiny_server) -> set[str]:
    with grpcclient.InferenceServerClient(tiny_server.grpc_url) as triton:
        return {i.name for i in triton.get_model_metadata(MODEL_NAME).inputs}


def require_inputs(tiny_server, *names: str) -> None:
    """xfail (not skip) while the deployment does not serve an input yet: the test runs for
    real as soon as it does."""
    missing = [name for name in names if name not in served_inputs(tiny_server)]
    if missing:
        pytest.xfail(f"the asyncdiff model does not serve {missing} yet (issue 14: the BLS engine)")


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_file(image: np.ndarray) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return ("init.png", buffer.getvalue(), "image/png")


def test_generation_equals_direct_grpc(client, tiny_server):
    result = client.images.generate(prompt=PROMPT, response_format="b64_json", extra_body=FAST)
    assert abs(result.created - time.time()) < 120
    assert len(result.data) == 1
    image = decode(result.data[0].b64_json)
    expected = direct(tiny_server, prompt=PROMPT, **FAST)
    expected = expected[0] if expected.ndim == 4 else expected
    assert image.dtype == np.uint8 and image.shape == expected.shape
    assert np.array_equal(image, expected)
    # Extensions reach the model: another seed is another image.
    other = decode(client.images.generate(prompt=PROMPT, extra_body={**FAST, "seed": 4}).data[0].b64_json)
    assert not np.array_equal(other, image)


def test_bad_field_is_a_bad_request_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=PROMPT, extra_body={**FAST, "steps": 0})
    assert "STEPS" in info.value.message
    assert info.value.param == "steps" and info.value.type == "invalid_request_error"


def test_url_response_format_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="b64_json") as info:
        client.images.generate(prompt=PROMPT, response_format="url", extra_body=FAST)
    assert info.value.param == "response_format"


def test_malformed_bodies_get_openai_errors(api_url):
    cases = [(b"{not json", None), (b'["a list"]', None), (b'{"n": 1}', "prompt"),
             (b'{"prompt": "x", "n": "two"}', "n"), (b'{"prompt": "x", "size": "big"}', "size"),
             (b'{"prompt": "x", "surprise": 1}', "surprise"),
             (b'{"prompt": "x", "model": "dall-e-3"}', "model")]
    for body, param in cases:
        status, answer = http(f"{api_url}/v1/images/generations", body)
        assert status == 400, (body, answer)
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and error["message"], body
        assert error["param"] == param, (body, error)


def test_models_and_health(client, api_url, tiny_server):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert http(f"{api_url}/health") == (200, {"status": "ready", "model": MODEL_NAME,
                                              "triton_url": tiny_server.grpc_url})


def test_unserved_size_lists_the_served_sizes(client, tiny_server):
    require_inputs(tiny_server, *(INPUT_BY_FIELD[f].name for f in ("width", "height")))
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=PROMPT, size="1024x1024", extra_body=FAST)
    assert "1024x1024" in info.value.message and "16x16" in info.value.message
    assert info.value.param == "size"
    # The served size itself is the default's image.
    image = decode(client.images.generate(prompt=PROMPT, size="16x16", extra_body=FAST).data[0].b64_json)
    assert np.array_equal(image, direct(tiny_server, prompt=PROMPT, **FAST)[0])


def test_n_images_equal_direct_grpc(client, tiny_server):
    require_inputs(tiny_server, INPUT_BY_FIELD["num_images"].name)
    result = client.images.generate(prompt=PROMPT, n=2, extra_body=FAST)
    images = np.stack([decode(d.b64_json) for d in result.data])
    expected = direct(tiny_server, prompt=PROMPT, num_images=2, **FAST)
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert np.array_equal(images, expected)
    assert not np.array_equal(images[0], images[1])  # seeds 3 and 4


def test_edit_equals_direct_grpc(client, tiny_server):
    init = direct(tiny_server, prompt="a handwritten digit 1", **FAST)
    init = init[0] if init.ndim == 4 else init
    with pytest.raises(openai.BadRequestError, match=r"inpainting \(mask\) is not supported"):
        client.images.edit(image=png_file(init), mask=png_file(init), prompt=PROMPT, extra_body=FAST)
    require_inputs(tiny_server, INIT_IMAGE.name, INPUT_BY_FIELD["strength"].name)
    result = client.images.edit(image=png_file(init), prompt=PROMPT, extra_body={**FAST, "strength": 0.5})
    image = decode(result.data[0].b64_json)
    # The request's size is the image's, sent explicitly.
    height, width = init.shape[:2]
    expected = direct(tiny_server, init_image=init, prompt=PROMPT, strength=0.5, width=width,
                      height=height, **FAST)[0]
    assert np.array_equal(image, expected)
    assert not np.array_equal(image, init)
    # An image of a size not served (the client's 256x256 PNGs): without a size, sent at the
    # served size closest to its aspect ratio, here its own pixels back; with one, at that size.
    large = np.asarray(Image.fromarray(init).resize((16 * width, 16 * height), Image.Resampling.NEAREST))
    back = client.images.edit(image=png_file(large), prompt=PROMPT, extra_body={**FAST, "strength": 0.5})
    assert np.array_equal(decode(back.data[0].b64_json), image)
    resized = client.images.edit(image=png_file(large), prompt=PROMPT, size="24x16",
                                 extra_body={**FAST, "strength": 0.5})
    expected = direct(tiny_server, init_image=fit_image(large, 24, 16), prompt=PROMPT,
                      strength=0.5, width=24, height=16, **FAST)[0]
    assert np.array_equal(decode(resized.data[0].b64_json), expected)
    with pytest.raises(openai.BadRequestError, match="32x16 is not served") as info:
        client.images.edit(image=png_file(large), prompt=PROMPT, size="32x16", extra_body=FAST)
    assert info.value.param == "size"


def test_unreachable_triton_is_a_503():
    """No server behind the API: health and requests answer 503 in OpenAI's shape, saying
    Triton cannot be reached (not "server busy", which clients take for load)."""
    url = f"127.0.0.1:{free_port()}"
    app = create_app(Settings(triton_url=url, timeout_s=10))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503
        response = http.post("/v1/images/generations", json={"prompt": PROMPT})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "triton_unreachable")
        assert error["message"].startswith(f"nothing answers gRPC at {url} (connection refused)")


@pytest.mark.parametrize("where, says", [
    ("http", "{url} does not speak gRPC: is it Triton's HTTP port?"),
    ("nothing", "nothing answers gRPC at {url} (connection refused)"),
])
def test_start_checks_the_triton_url(tiny_server, where, says, capsys):
    """Triton's HTTP port given for gRPC fails at once; nothing listening fails after
    --wait-triton; either way one error line and no API started."""
    url = tiny_server.http_url if where == "http" else f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert openai_main(["--triton-url", url, "--port", str(free_port()), "--wait-triton", "2"]) == 1
    assert time.monotonic() - started < (2 if where == "http" else 10)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {says.format(url=url)}"), err
    assert len(err) == (1 if where == "http" else 2)  # the second: one "waiting up to 2 s" line


def test_deadline_is_a_504_and_cancels(tiny_server):
    """A generation past the API's --timeout answers 504; the server stops working on it."""
    before = cancelled_lines(tiny_server)
    with TestClient(create_app(Settings(triton_url=tiny_server.grpc_url, timeout_s=0.5))) as http:
        t0 = time.monotonic()
        response = http.post("/v1/images/generations", json={"prompt": PROMPT, "steps": 500})
        assert time.monotonic() - t0 < 10
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"
    assert_cancelled_soon(tiny_server, before)


def test_client_gone_cancels_the_generation(api_url, tiny_server):
    """Closing the HTTP connection mid-generation cancels the Triton request."""
    before = cancelled_lines(tiny_server)
    body = json.dumps({"prompt": PROMPT, "steps": 500}).encode()
    host, port = api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)
    assert_cancelled_soon(tiny_server, before)


def cancelled_lines(tiny_server) -> int:
    return tiny_server.log_tail(100000).count("request cancelled")


def assert_cancelled_soon(tiny_server, before: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cancelled_lines(tiny_server) <= before:
        assert time.monotonic() < deadline, tiny_server.log_tail()
        time.sleep(0.2)


def test_imports_without_torch():
    blocked = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "pytriton")
    script = (f"import sys\nfor n in {blocked!r}:\n    sys.modules[n] = None\n"
              "import serve.openai\nprint(serve.openai.EXTENSIONS)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'seed'" in out.stdout and "'steps'" in out.stdout


def test_overhead_benchmark_runs(api_url, tiny_server, tmp_path):
    """benchmarks/openai_overhead.py against the running server and API, two requests each way."""
    from benchmarks import openai_overhead

    out = tmp_path / "overhead.json"
    assert openai_overhead.main(["--triton-url", tiny_server.grpc_url, "--api-url", api_url,
                                 "--requests", "2", "--warmup", "0", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images_equal"] is True
    assert len(report["api"]["samples_ms"]) == len(report["grpc"]["samples_ms"]) == 2
    assert report["overhead_median_ms"] == round(report["api"]["median_ms"] - report["grpc"]["median_ms"], 2)
