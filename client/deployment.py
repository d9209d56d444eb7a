"""What a running deployment serves, read from its model configs, and the client-side
checks and image sizing that need it.

    deployment = read_deployment("grpc", "127.0.0.1:8001")
    deployment.check(params)             # ValueError with the contract's message
    width, height = choose_size((w, h), deployment.sizes())
    image = fit_image(image, width, height)

The inputs a model takes are in its config (INIT_IMAGE only where a VAE encoder is
served: not on SD3 or FLUX); the sizes and the images per request are the stream
model's ``PipelineParams``, written by export. The messages are the contract's, so a
check made here reads exactly as the server's would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncdiff.contract import (
    INIT_IMAGE, MODEL_NAME, STREAM_MODEL_NAME, PipelineParams, Request, format_size,
)
from client.infer import upscale


@dataclass(frozen=True)
class Deployment:
    """The inputs of the model the client calls and the pipeline's parameters (None when
    they cannot be read, e.g. a deployment exported by another version: then the server's
    own checks are the only ones)."""

    inputs: frozenset[str]
    pipeline: PipelineParams | None

    @property
    def img2img(self) -> bool:
        return INIT_IMAGE.name in self.inputs

    @property
    def family(self) -> str:
        return self.pipeline.conditioning if self.pipeline else "unknown"

    def sizes(self) -> list[tuple[int, int]]:
        """Served (width, height), the default first; empty when unknown."""
        return self.pipeline.sizes() if self.pipeline else []

    def check(self, num_images: int | None = None, width: int | None = None,
              height: int | None = None, init_image: bool = False) -> None:
        """ValueError naming the input and what this deployment allows."""
        if init_image and not self.img2img:
            raise ValueError(f"{INIT_IMAGE.name}: this deployment ({self.family}) serves no "
                             "img2img, its model takes no init image; SD 1.x/2.x and SDXL "
                             "exports serve it, SD3 and FLUX are text-to-image only")
        if self.pipeline is None:
            return
        request = dataclasses.replace(Request(), num_images=1 if num_images is None else num_images,
                                      width=width or 0, height=height or 0)
        self.pipeline.request_images(request)
        self.pipeline.request_size(request)


def read_deployment(protocol: str, url: str, model_name: str = MODEL_NAME,
                    timeout: float = 30.0) -> Deployment:
    """The deployment behind ``url``. Raises tritonclient's exceptions (or OSError over
    HTTP) when it cannot be reached: ``client.connection.problem`` says why in one line."""
    from tritonclient.utils import InferenceServerException

    with _client(protocol, url, timeout) as client:
        config = _config(client, protocol, model_name, timeout)
        try:
            stream = config if model_name == STREAM_MODEL_NAME else _config(
                client, protocol, STREAM_MODEL_NAME, timeout)
        except InferenceServerException:  # not an AsyncDiff deployment of this layout
            stream = {}
    inputs = frozenset(i["name"] for i in config.get("input", ()))
    return Deployment(inputs, pipeline_params(stream))


def pipeline_params(config: dict[str, Any]) -> PipelineParams | None:
    """The stream model's parameters; keys this version does not know are left out."""
    raw = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    known = {f.name for f in dataclasses.fields(PipelineParams)} | {
        f"default_{f.name}" for f in dataclasses.fields(Request)}
    try:
        return PipelineParams.from_parameters({k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError, KeyError):
        return None


def _client(protocol: str, url: str, timeout: float):
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module.InferenceServerClient(url)
    import tritonclient.http as module

    return module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)


def _config(client, protocol: str, name: str, timeout: float) -> dict[str, Any]:
    if protocol == "grpc":
        return client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
    return client.get_model_config(name)


def choose_size(image_size: tuple[int, int], served: list[tuple[int, int]],
                width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The (width, height) to ask for with an init image of ``image_size`` (w, h).

    Among the served sizes that match the given width/height: the image's own size when it
    is one of them, else the one closest to its aspect ratio (the earliest, i.e. the
    default, on a tie). Nothing served matches (or nothing is known): the given values, the
    image's for the rest; the request's size check then names the served sizes.
    """
    w, h = image_size
    matching = [s for s in served if width in (None, s[0]) and height in (None, s[1])]
    if not matching:
        return width or w, height or h
    if (w, h) in matching:
        return w, h
    return min(matching, key=lambda s: abs(math.log(s[0] * h / (s[1] * w))))


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB image at (width, height): Lanczos, as diffusers' image processor resizes; an
    exact nearest-neighbour upscale of that size (the client's own PNGs) back to its pixels."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    k = h // height
    if k > 1 and (h, w) == (k * height, k * width) and np.array_equal(upscale(image[::k, ::k], k), image):
        return np.ascontiguousarray(image[::k, ::k])
    from PIL import Image

    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def resize_note(what: str, image: np.ndarray, width: int, height: int) -> str:
    h, w = image.shape[:2]
    return (f"{what} is {format_size(w, h)}; resized to {format_size(width, height)}, "
            "a size this deployment serves")
