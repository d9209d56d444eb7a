"""Typed client for the ``asyncdiff`` Triton model over gRPC or HTTP.

    from client.infer import GenerationParams, generate
    result = generate(GenerationParams("a handwritten digit 7", seed=0), protocol="grpc")
    result.images  # uint8 [NUM_IMAGES, H, W, 3]; result.image is the first

Only the parameters that are set are sent; the model applies its own defaults
for the rest, so the client never has to track them. Input names, dtypes and
encodings are ``asyncdiff.contract``'s (numpy only: no torch here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Literal

import numpy as np

from asyncdiff.contract import (
    INIT_IMAGE, INPUT_BY_FIELD, INPUT_BY_NAME, MODEL_NAME, OUTPUTS, PREVIEW, PREVIEW_EVERY, STEP,
    STREAM_MODEL_NAME,
)

Protocol = Literal["grpc", "http"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http")
# Triton's defaults; GRPC_PORT / HTTP_PORT match what `python -m serve` reads.
DEFAULT_PORTS: dict[Protocol, tuple[str, int]] = {"grpc": ("GRPC_PORT", 8001),
                                                  "http": ("HTTP_PORT", 8000)}


@dataclass(frozen=True)
class GenerationParams:
    """One request: ``contract.Request``'s fields. ``None`` means "not sent": the server's
    default applies."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    warmup: int | None = None
    scheduler: str | None = None
    num_images: int | None = None
    height: int | None = None
    width: int | None = None
    strength: float | None = None
    init_image: np.ndarray | None = None  # img2img: uint8 [HEIGHT, WIDTH, 3] (INIT_IMAGE)


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # uint8 [NUM_IMAGES, H, W, 3]
    latents: np.ndarray  # float32 [NUM_IMAGES, C, h, w]

    @property
    def image(self) -> np.ndarray:
        """The first image, [H, W, 3]."""
        return self.images[0]


def default_url(protocol: Protocol, env: dict[str, str] | None = None) -> str:
    var, port = DEFAULT_PORTS[protocol]
    return f"127.0.0.1:{(os.environ if env is None else env).get(var, port)}"


def _module(protocol: Protocol) -> ModuleType:
    # Imported lazily: tritonclient.http pulls in gevent, gRPC pulls grpcio.
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


def input_arrays(params: GenerationParams) -> dict[str, np.ndarray]:
    """Triton input name -> array of shape [1], for the fields that are set."""
    # BYTES are encoded as UTF-8 here, so non-ASCII prompts arrive intact on both protocols.
    arrays = {INPUT_BY_FIELD[f.name].name: INPUT_BY_FIELD[f.name].encode(getattr(params, f.name))
              for f in fields(params) if f.name in INPUT_BY_FIELD and getattr(params, f.name) is not None}
    if params.init_image is not None:
        arrays[INIT_IMAGE.name] = np.ascontiguousarray(params.init_image, dtype=np.uint8)
    return arrays


def build_request(params: GenerationParams, protocol: Protocol) -> tuple[list, list]:
    """(InferInput list, InferRequestedOutput list) of the protocol's tritonclient module."""
    module = _module(protocol)
    inputs = []
    for name, array in input_arrays(params).items():
        dtype = INIT_IMAGE.dtype if name == INIT_IMAGE.name else INPUT_BY_NAME[name].dtype
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)  # HTTP: binary by default, no JSON round-trip
        inputs.append(tensor)
    outputs = [module.InferRequestedOutput(f.name) for f in OUTPUTS]
    return inputs, outputs


def generate(params: GenerationParams, protocol: Protocol = "grpc", url: str | None = None,
             timeout: float = 300.0, model_name: str = MODEL_NAME) -> GenerationResult:
    """Send one request and wait for it. Raises ``InferenceServerException`` on server errors."""
    module = _module(protocol)
    url = url or default_url(protocol)
    inputs, outputs = build_request(params, protocol)
    if protocol == "grpc":
        with module.InferenceServerClient(url) as client:
            result = client.infer(model_name, inputs, outputs=outputs, client_timeout=timeout)
    else:
        # HTTP has no per-call deadline; the socket timeout bounds the wait instead.
        with module.InferenceServerClient(url, connection_timeout=min(timeout, 60.0),
                                          network_timeout=timeout) as client:
            result = client.infer(model_name, inputs, outputs=outputs)
    images, latents = (result.as_numpy(f.name) for f in OUTPUTS)
    return GenerationResult(images=images, latents=latents)


def generate_stream(params: GenerationParams, url: str | None = None, timeout: float = 300.0,
                    on_step: Callable[[int, int, np.ndarray | None], None] | None = None,
                    preview_every: int = 0) -> GenerationResult:
    """``generate`` over a gRPC stream to the decoupled ``asyncdiff_stream`` model:
    ``on_step(done, total, preview)`` after every step (``preview``: a uint8 image every
    ``preview_every`` steps, else None), then the result. Closing early cancels the request."""
    import queue

    import tritonclient.grpc as module
    from tritonclient.utils import InferenceServerException

    inputs, _ = build_request(params, "grpc")
    if preview_every:
        extra = module.InferInput(PREVIEW_EVERY.name, [1], PREVIEW_EVERY.dtype)
        extra.set_data_from_numpy(PREVIEW_EVERY.encode(preview_every))
        inputs.append(extra)
    outputs = [module.InferRequestedOutput(f.name) for f in (*OUTPUTS, STEP, PREVIEW)]
    responses: queue.Queue = queue.Queue()
    with module.InferenceServerClient(url or default_url("grpc")) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            stream_timeout=timeout)
        try:
            try:
                client.async_stream_infer(STREAM_MODEL_NAME, inputs, outputs=outputs)
            except InferenceServerException as exc:
                # "The stream is no longer in valid state": the cause went to the callback.
                raise _callback_error(responses) or exc from None
            while True:
                try:
                    result, error = responses.get(timeout=timeout)
                except queue.Empty:
                    raise InferenceServerException(f"no response within {timeout:g} s") from None
                if error is not None:
                    raise error
                images = result.as_numpy("IMAGE")
                if images is not None:
                    return GenerationResult(images=images, latents=result.as_numpy("LATENTS"))
                if on_step is not None:
                    done, total = (int(v) for v in result.as_numpy(STEP.name))
                    on_step(done, total, result.as_numpy(PREVIEW.name))
        finally:
            client.stop_stream(cancel_requests=True)


def _callback_error(responses, wait_s: float = 2.0) -> Exception | None:
    import queue

    try:
        return responses.get(timeout=wait_s)[1]
    except queue.Empty:
        return None


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of an [H, W, C] image: keeps the tiny model's pixels crisp."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def auto_upscale_factor(image: np.ndarray, target: int = 256) -> int:
    """Smallest integer factor that brings the longer side to at least ``target`` pixels."""
    longest = max(image.shape[:2])
    return max(1, -(-target // longest))
