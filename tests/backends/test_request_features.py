"""What one request can ask for, served by a real tritonserver (the tiny model, N=2): several
images (NUM_IMAGES), a size among the exported ones (HEIGHT/WIDTH), img2img (INIT_IMAGE,
STRENGTH). Each is compared with the in-process pipeline, which tests/test_img2img.py and
tests/test_pipeline.py compare with diffusers' own pipelines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from asyncdiff.contract import INIT_IMAGE, INPUT_BY_NAME, MODEL_NAME, STREAM_MODEL_NAME, Request
from export.repository import pipeline_params, read_configs
from tests.backends.test_asyncdiff_pipeline import reference, server  # noqa: F401 (fixtures)

STEPS = 4
PROMPT = "a handwritten digit 3"
WIDE = (24, 16)  # (width, height): the second size the tiny repository is exported with


@pytest.fixture(scope="module")
def params(tiny_repo):
    return pipeline_params(read_configs(tiny_repo)[STREAM_MODEL_NAME])


def infer(server, init_image=None, **values):
    """(IMAGE, LATENTS) of one unary gRPC request; values by input name."""
    inputs = []
    for name, value in {"PROMPT": PROMPT, "STEPS": STEPS, **values}.items():
        arr = INPUT_BY_NAME[name].encode(value)
        inputs.append(grpcclient.InferInput(name, list(arr.shape), INPUT_BY_NAME[name].dtype))
        inputs[-1].set_data_from_numpy(arr)
    if init_image is not None:
        inputs.append(grpcclient.InferInput(INIT_IMAGE.name, list(init_image.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(init_image)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(MODEL_NAME, inputs, client_timeout=120)
    return result.as_numpy("IMAGE"), result.as_numpy("LATENTS")


def test_num_images_are_the_single_requests_of_consecutive_seeds(server):
    images, latents = infer(server, SEED=5, NUM_IMAGES=3)
    assert images.shape == (3, 16, 16, 3) and latents.shape == (3, 4, 16, 16)
    for i in range(3):
        image, latent = infer(server, SEED=5 + i)
        assert np.array_equal(images[i], image[0]), i
        assert np.abs(latents[i] - latent[0]).max() <= 1e-4
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("values, message", [
    (dict(NUM_IMAGES=0), r"NUM_IMAGES must be in \[1, max_batch_requests\] "
                         r"\(the deployment's, at most 64\)"),
    (dict(NUM_IMAGES=5), r"NUM_IMAGES must be in \[1, 4\] on this deployment"),
    (dict(WIDTH=32, HEIGHT=16), r"WIDTH x HEIGHT 32x16 is not served; this deployment serves "
                                r"16x16, 24x16"),
    (dict(HEIGHT=12), r"HEIGHT must be a multiple of 8 in \[8, 16384\], got 12"),
    (dict(STRENGTH=0.0), r"STRENGTH must be in \(0, 1\]"),
    # 1000 DDIM steps would start at timestep 1000, outside the 1000-step noise schedule
    (dict(STEPS=1000), r"STEPS must be in \[1, 999\] with SCHEDULER ddim on this model"),
    (dict(STEPS=999, SCHEDULER="dpmsolver++"), r"STEPS must be in \[1, 998\]"),
])
def test_bad_values_are_invalid_arguments(server, values, message):
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(server, **values)
    assert "INVALID_ARG" in str(err.value.status())


def test_a_second_exported_size_is_served(server, params, reference):
    assert params.sizes() == [(16, 16), WIDE]
    width, height = WIDE
    with ThreadPoolExecutor(2) as pool:  # two sizes in flight: ticks shared, calls not merged
        wide, square = pool.map(lambda kw: infer(server, SEED=2, **kw),
                                [dict(WIDTH=width, HEIGHT=height), {}])
    assert wide[0].shape == (1, height, width, 3) and square[0].shape == (1, 16, 16, 3)
    ref = reference.generate_latents(Request(PROMPT, seed=2, steps=STEPS, height=height,
                                             width=width))
    assert np.abs(wide[1] - ref.numpy()).max() <= 1e-4
    assert np.array_equal(square[0], infer(server, SEED=2)[0])


def test_img2img_equals_the_in_process_pipeline(server, reference):
    init, _ = infer(server, SEED=7)
    req = Request(PROMPT, seed=11, steps=6, strength=0.5)
    images, latents = infer(server, init_image=init[0], SEED=11, STEPS=6, STRENGTH=0.5,
                            NUM_IMAGES=2)
    for i in range(2):
        ref = reference.img2img_latents(Request(PROMPT, seed=11 + i, steps=6, strength=0.5), init[0])
        assert np.abs(latents[i] - ref[0].numpy()).max() <= 1e-4, i
    # half the steps re-noise half-way: the result stays nearer the init image than a fresh one
    fresh, _ = infer(server, SEED=11, STEPS=6)
    assert np.abs(images[0].astype(int) - init[0]).mean() < np.abs(fresh[0].astype(int) - init[0]).mean()
    assert req.strength == 0.5


@pytest.mark.parametrize("values, message", [
    (dict(STEPS=4, STRENGTH=0.1), "STRENGTH"),  # int(4 * 0.1) = 0 steps left
])
def test_bad_img2img_requests_are_invalid_arguments(server, values, message):
    init = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(server, init_image=init, **values)
    assert "INVALID_ARG" in str(err.value.status())
    with pytest.raises(InferenceServerException, match=r"INIT_IMAGE must be \[HEIGHT, WIDTH, 3\] = "
                                                       r"\[16, 16, 3\]"):
        infer(server, init_image=np.zeros((16, 24, 3), np.uint8))
