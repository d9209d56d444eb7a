"""The ``asyncdiff`` BLS pipeline on a real tritonserver, against the in-process reference."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from asyncdiff.contract import INPUT_BY_NAME, STREAM_MODEL_NAME, Request
from asyncdiff.pipeline import AsyncDiffPipeline

STEPS = 8
PROMPT = "a handwritten digit 7"


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def reference():
    return AsyncDiffPipeline.from_pretrained("tiny", components=2)


def grpc_inputs(prompt=PROMPT, **scalars):
    return _inputs(grpcclient, prompt, scalars)


def _inputs(mod, prompt, scalars):
    """Inputs typed by the contract; raw bytes go out as they are (invalid UTF-8 tests)."""
    inputs = []
    for name, value in {"PROMPT": prompt, **scalars}.items():
        field = INPUT_BY_NAME[name]
        arr = np.array([value], dtype=np.object_) if isinstance(value, bytes) else field.encode(value)
        inp = mod.InferInput(name, list(arr.shape), field.dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def generate(server, **kw):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("asyncdiff", grpc_inputs(**kw))
    images, latents = result.as_numpy("IMAGE"), result.as_numpy("LATENTS")
    assert len(images) == len(latents) == kw.get("NUM_IMAGES", 1)  # [NUM_IMAGES, ...]
    return (images, latents) if "NUM_IMAGES" in kw else (images[0], latents[0])


def local(reference, seed, **kw):
    req = Request(kw.pop("prompt", PROMPT), seed=seed, steps=STEPS, **kw)
    latents = reference.generate_latents(req)
    return reference.decode(latents), latents[0].numpy()


def test_grpc_matches_the_local_runner(server, reference):
    image, latents = generate(server, SEED=3, STEPS=STEPS)
    ref_image, ref_latents = local(reference, 3)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.abs(latents - ref_latents).max() <= 1e-4
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1


def test_http_returns_the_same_image(server):
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer("asyncdiff", _inputs(httpclient, PROMPT, {"SEED": 3, "STEPS": STEPS}))
    assert np.array_equal(result.as_numpy("IMAGE")[0], generate(server, SEED=3, STEPS=STEPS)[0])


def test_options_reach_the_pipeline(server, reference):
    kw = dict(negative_prompt="8", guidance_scale=2.0, warmup=3, scheduler="euler")
    _, latents = generate(server, SEED=5, STEPS=STEPS, NEGATIVE_PROMPT="8", GUIDANCE_SCALE=2.0,
                          WARMUP=3, SCHEDULER="euler")
    assert np.abs(latents - local(reference, 5, **kw)[1]).max() <= 1e-4


def test_concurrent_requests_keep_their_own_state(server):
    seeds = [11, 12, 13]
    sequential = [generate(server, SEED=s, STEPS=STEPS)[1] for s in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        concurrent = list(pool.map(lambda s: generate(server, SEED=s, STEPS=STEPS)[1], seeds))
    for a, b in zip(sequential, concurrent):
        assert np.abs(a - b).max() <= 1e-5
    assert np.abs(concurrent[0] - concurrent[1]).max() > 0.1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(prompt=""), "PROMPT must be a non-empty"),
        (dict(prompt=b"\xff\xfe"), "PROMPT must be valid UTF-8"),
        (dict(prompt="seven " * 80), "PROMPT is .* tokens"),
        (dict(STEPS=0), r"STEPS must be in \[1, 1000\]"),
        (dict(STEPS=1001), r"STEPS must be in \[1, 1000\]"),
        (dict(STEPS=5, WARMUP=5), r"WARMUP must be in \[1, 4\]"),
        (dict(WARMUP=0), "WARMUP must be in"),
        (dict(SCHEDULER="pndm"), "SCHEDULER must be one of"),
        (dict(GUIDANCE_SCALE=float("nan")), "GUIDANCE_SCALE must be a finite"),
        (dict(GUIDANCE_SCALE=float("inf")), "GUIDANCE_SCALE must be a finite"),
        (dict(GUIDANCE_SCALE=-1.0), r"GUIDANCE_SCALE must be a finite number in \[0, 100\]"),
        (dict(GUIDANCE_SCALE=3e38), r"GUIDANCE_SCALE must be a finite number in \[0, 100\]"),
        (dict(prompt="7" * (1 << 20)), "PROMPT is 1048576 bytes; the limit is 4096 bytes"),
        (dict(NEGATIVE_PROMPT="seven " * 80), "NEGATIVE_PROMPT is .* tokens"),
        (dict(SEED=-1), "SEED must be in"),
    ],
)
def test_bad_input_is_rejected_and_the_server_stays_ready(server, kw, message):
    with pytest.raises(InferenceServerException, match=message) as err:
        generate(server, **kw)
    assert "INVALID_ARG" in str(err.value.status()) or err.value.status() is None
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready("asyncdiff")


def test_wrong_dtype_and_shape_are_rejected(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        steps = grpcclient.InferInput("STEPS", [1], "FP32")
        steps.set_data_from_numpy(np.array([5.0], dtype=np.float32))
        with pytest.raises(InferenceServerException, match="STEPS"):
            client.infer("asyncdiff", grpc_inputs()[:1] + [steps])
        seed = grpcclient.InferInput("SEED", [2], "INT64")
        seed.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        with pytest.raises(InferenceServerException, match="SEED"):
            client.infer("asyncdiff", grpc_inputs()[:1] + [seed])
        assert client.is_server_ready()


def test_missing_component_is_named_then_recovers(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.unload_model("unet_part_1")
        try:
            with pytest.raises(InferenceServerException, match="unet_part_1"):
                generate(server, SEED=1, STEPS=STEPS)
        finally:
            client.load_model("unet_part_1")
    image, _ = generate(server, SEED=1, STEPS=STEPS)
    assert image.shape == (16, 16, 3)


def test_killed_component_is_reloaded_by_the_pipeline(server):
    """The python backend does not respawn a dead stub; the pipeline unloads and loads the
    model (explicit model control) and retries the call: the request still succeeds."""
    reference, _ = generate(server, SEED=2, STEPS=STEPS)
    victim = _stub_pid(server, "unet_part_0")
    os.kill(victim, signal.SIGKILL)
    image, _ = generate(server, SEED=2, STEPS=STEPS)
    assert np.array_equal(image, reference)
    assert _stub_pid(server, "unet_part_0") != victim


@contextlib.contextmanager
def pipeline_parameters(server, model=STREAM_MODEL_NAME, edit=None, **params):
    """``model`` (default: the engine, which holds the parameters) reloaded with some
    parameters changed (or its config changed by ``edit``), its own config after."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        original = client.get_model_config(model, as_json=True)["config"]
        config = json.loads(json.dumps(original))
        config.setdefault("parameters", {}).update(
            {k: {"string_value": v} for k, v in params.items()})
        if edit:
            edit(config)
        try:  # a load that fails is restored too
            client.load_model(model, config=json.dumps(config))
            yield
        finally:
            client.load_model(model, config=json.dumps(original))


def test_component_timeout_is_an_error_not_a_hang(server):
    with pipeline_parameters(server, component_timeout_s="0.001"):
        t0 = time.time()
        with pytest.raises(InferenceServerException, match="did not answer within"):
            generate(server, SEED=1, STEPS=STEPS)
        assert time.time() - t0 < 30
    assert generate(server, SEED=1, STEPS=STEPS)[0].shape == (16, 16, 3)


def test_a_server_side_value_error_is_internal_not_invalid_arg(server):
    """Only request parsing is the client's fault; a ValueError later (here: the VAE's images
    disagree with the configured size, 32x32 pixels from 16x16 latents) is an INTERNAL error."""
    with pipeline_parameters(server, image_shape="[32, 32, 3]", resolutions="[[32, 32]]"):
        with pytest.raises(InferenceServerException, match=r"returned images of shape "
                           r"\[1, 16, 16, 3\], expected \[1, 32, 32, 3\]") as err:
            generate(server, SEED=1, STEPS=2)
        assert "INTERNAL" in str(err.value.status())
    assert generate(server, SEED=1, STEPS=2)[0].shape == (16, 16, 3)


@pytest.mark.parametrize("gpus, message", [
    ("[0, 1, 2]", "N=2 S=1 needs 2 devices; 3 GPUs are listed"),  # placement's one message
    ("[0, 1]", "device='cpu' and gpus=\\(0, 1\\) disagree"),  # a GPU list for a CPU pipeline
])
def test_gpus_that_do_not_fit_fail_the_load(server, gpus, message):
    """The GPU list (where each call's outputs land) must fit the partition and the device."""
    with pytest.raises(InferenceServerException, match=message):
        with pipeline_parameters(server, gpus=gpus):
            pass
    assert generate(server, SEED=1, STEPS=2)[0].shape == (16, 16, 3)


def _stub_pid(server, model: str) -> int:
    """The stub of ``model`` in THIS server's repository (other servers may run beside it)."""
    repo = Path(server.model_repository).resolve()
    out = subprocess.run(["pgrep", "-f", f"{repo}/{model}/1/model.py"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, f"expected one stub process for {model} in {repo}, got {pids}"
    return pids[0]
