"""client/deployment.py without a server: image sizing for img2img, the checks against what a
deployment serves, reading its parameters. The same code against a real server:
tests/client/test_client_server.py and tests/test_quick_tour.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asyncdiff.contract import INIT_IMAGE, PipelineParams
from client.deployment import Deployment, choose_size, fit_image, pipeline_params
from client.infer import upscale

SIZES = [(16, 16), (24, 16)]  # (width, height), the default first
PARAMS = PipelineParams(component_models=("unet_part_0",), latent_shape=(4, 2, 2),
                        image_shape=(16, 16, 3), vae_scaling_factor=1.0, max_batch_requests=4,
                        resolutions=tuple(SIZES), img2img=True)


@pytest.mark.parametrize("image, given, chosen", [
    ((24, 16), {}, (24, 16)),                       # its own size is served
    ((256, 256), {}, (16, 16)),                     # the client's upscaled PNG: the square size
    ((480, 320), {}, (24, 16)),                     # 3:2 -> the 3:2 size
    ((100, 300), {}, (16, 16)),                     # tall: the closest ratio, 1:1
    ((256, 256), {"width": 24}, (24, 16)),          # a given side picks among the matching sizes
    ((256, 256), {"width": 24, "height": 16}, (24, 16)),
    ((256, 256), {"width": 32, "height": 16}, (32, 16)),   # not served: sent, refused by name
    ((256, 256), {"height": 40}, (256, 40)),
])
def test_choose_size(image, given, chosen):
    assert choose_size(image, SIZES, **given) == chosen


def test_choose_size_unknown_deployment_keeps_the_image_size():
    assert choose_size((256, 128), []) == (256, 128)
    assert choose_size((256, 128), [], width=16, height=8) == (16, 8)


def test_fit_image_undoes_a_nearest_upscale_exactly_and_resizes_anything_else():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert np.array_equal(fit_image(upscale(small, 16), 24, 16), small)
    assert fit_image(small, 24, 16) is small
    photo = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    assert fit_image(photo, 24, 16).shape == (16, 24, 3)


def test_checks_name_what_the_deployment_serves():
    served = Deployment(frozenset({"PROMPT", INIT_IMAGE.name}), PARAMS)
    served.check(num_images=4, width=24, height=16, init_image=True)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"NUM_IMAGES must be in \[1, 4\] on this deployment"):
            served.check(num_images=bad)
    with pytest.raises(ValueError, match="32x16 is not served; this deployment serves 16x16, 24x16"):
        served.check(width=32, height=16)
    sd3 = Deployment(frozenset({"PROMPT"}), dataclasses.replace(PARAMS, conditioning="sd3",
                                                                img2img=False))
    with pytest.raises(ValueError, match=r"INIT_IMAGE: this deployment \(sd3\) serves no img2img"):
        sd3.check(init_image=True)
    sd3.check()  # text-to-image is fine


def test_pipeline_params_from_a_config_tolerates_unknown_keys():
    config = {"parameters": {k: {"string_value": v} for k, v in PARAMS.to_parameters().items()}}
    config["parameters"]["added_by_a_newer_export"] = {"string_value": "1"}
    assert pipeline_params(config) == PARAMS
    assert pipeline_params({}) is None  # not a pipeline model: no client-side checks
