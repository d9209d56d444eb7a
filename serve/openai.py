"""An OpenAI-compatible images API in front of the ``asyncdiff`` Triton model.

    python -m serve.openai --triton-url 127.0.0.1:8001 [--model asyncdiff] [--host 127.0.0.1] [--port 8080]

``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart, img2img) answer
as OpenAI's images API does (``{"created", "data": [{"b64_json": PNG}]}``), so the official
``openai`` client and tools built on it talk to an AsyncDiff deployment unchanged. Every request
becomes one unary gRPC call (tritonclient's asyncio client) to the Triton model; its inputs
are built from ``asyncdiff.contract``, which owns every input name, dtype and allowed range:
this module does no range checks of its own and passes the server's INVALID_ARG message on.

OpenAI's fields map onto the contract (``n`` -> NUM_IMAGES, ``size`` WIDTHxHEIGHT -> WIDTH and
HEIGHT, ``image`` -> INIT_IMAGE); every other ``Request`` field is an extension under its own
name (``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``scheduler``, ``warmup``,
and ``strength`` on edits). Fields the server cannot honour are refused by name; hints that do
not change what is asked are ignored (``IGNORED_FIELDS``). Errors come in OpenAI's shape.

Torch-free: it imports numpy, pillow, fastapi, uvicorn and tritonclient only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from tritonclient.grpc import aio as triton
from tritonclient.utils import InferenceServerException

from asyncdiff.contract import (
    BUSY_MESSAGE, INIT_IMAGE, INPUT_BY_FIELD, INPUT_BY_NAME, MODEL_NAME, OUTPUTS, STREAM_MODEL_NAME,
    IOField, Request, parse_size,
)
from client.connection import problem, wrong_protocol
from client.deployment import Deployment, choose_size, fit_image, pipeline_params, read_deployment
from client.infer import default_url

log = logging.getLogger("serve.openai")

IMAGE_OUTPUT = next(f for f in OUTPUTS if f.name == "IMAGE")
# OpenAI's name of a contract field where OpenAI has one; the size fields come from ``size``.
OPENAI_NAMES = {"num_images": "n"}
SIZE_FIELDS = ("width", "height")
EDIT_ONLY_FIELDS = ("strength",)  # img2img only: meaningless without an image
# Extensions: every other Request field, under its own name (a new contract field is one too).
EXTENSIONS = tuple(f.name for f in dataclasses.fields(Request)
                   if f.name not in ("prompt", *OPENAI_NAMES, *SIZE_FIELDS, *EDIT_ONLY_FIELDS))
# OpenAI fields that are hints about rendering or bookkeeping: accepted, no effect (one model,
# one quality per deployment).
IGNORED_FIELDS = ("user", "safety_identifier", "quality", "style", "moderation", "input_fidelity",
                  "complexity")
# OpenAI fields accepted only with the value this server produces anyway.
# Compared as lower-case text: JSON false and the form's "false" alike.
FIXED_FIELDS = {"output_format": ("png",), "background": ("auto", "opaque"), "stream": ("false",),
                "partial_images": ("0",)}
B64_JSON = "b64_json"
PNG_COMPRESS_LEVEL = 1  # lossless either way; the lowest level spends the least server CPU
DISCONNECT_POLL_S = 0.25  # how often a request in flight checks that its HTTP client is still there

# Triton status -> (HTTP status, OpenAI error type, code). Anything else: 500 server_error.
TRITON_STATUS = {
    "StatusCode.INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "StatusCode.UNAVAILABLE": (503, "server_error", "server_busy"),
    "StatusCode.RESOURCE_EXHAUSTED": (503, "server_error", "server_busy"),
    "StatusCode.DEADLINE_EXCEEDED": (504, "server_error", "timeout"),
    "StatusCode.CANCELLED": (499, "server_error", "cancelled"),
    "StatusCode.NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
}
CLIENT_CLOSED = 499  # no HTTP standard code; nginx's "client closed request"


@dataclass(frozen=True)
class Settings:
    triton_url: str = field(default_factory=lambda: default_url("grpc"))  # $GRPC_PORT, as the client
    model: str = MODEL_NAME  # the Triton model called, and the only `model` accepted
    timeout_s: float = 300.0  # gRPC deadline of one generation


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# -------------------------------------------------------------------- request parsing

def openai_name(field_name: str) -> str:
    """The request parameter that carries a contract field (``num_images`` -> ``n``)."""
    if field_name in SIZE_FIELDS:
        return "size"
    return OPENAI_NAMES.get(field_name, field_name)


def param_of_input(input_name: str) -> str | None:
    """The request parameter an input's error is about (STEPS -> steps, WIDTH -> size)."""
    if input_name == INIT_IMAGE.name:
        return "image"
    f = INPUT_BY_NAME.get(input_name)
    return openai_name(f.field) if f is not None else None


def param_of_message(message: str) -> str | None:
    """The parameter a Triton INVALID_ARG message is about: the pipeline's messages start with
    the input's name; Triton's own quote it ("unexpected inference input 'HEIGHT'")."""
    named = [message.split(" ", 1)[0], *re.findall(r"'([A-Z_]+)'", message)]
    return next((p for p in map(param_of_input, named) if p is not None), None)


def coerce(param: str, value: Any, f: IOField) -> Any:
    """A JSON value or a form string -> the Python type of the input ``f`` (no range checks:
    the server owns those). APIError names the parameter."""
    if f.dtype == "BYTES":
        if not isinstance(value, str):
            raise APIError(400, f"{param} ({f.name}) must be a string", param=param)
        return value
    if isinstance(value, bool):  # JSON true is not a number
        raise APIError(400, f"{param} ({f.name}) must be a number", param=param)
    try:
        number = float(value) if isinstance(value, str) else value
        if f.dtype == "FP32":
            if not isinstance(number, (int, float)):
                raise TypeError
            return float(number)
        if not isinstance(number, (int, float)) or not math.isfinite(number) or number != int(number):
            raise TypeError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        kind = "a number" if f.dtype == "FP32" else "an integer"
        raise APIError(400, f"{param} ({f.name}) must be {kind}, got {value!r}", param=param) from None


def request_fields(body: Mapping[str, Any], edit: bool, settings: Settings) -> dict[str, Any]:
    """Contract Request field -> value, for the fields the request sets (the deployment's
    defaults apply to the rest: they are not sent). Refuses what this server cannot do."""
    extensions = EXTENSIONS + (EDIT_ONLY_FIELDS if edit else ())
    known = {"prompt", "n", "size", "response_format", "model", *extensions, *IGNORED_FIELDS,
             *FIXED_FIELDS} | ({"image", "image[]", "mask"} if edit else set())
    for key, value in body.items():
        if key not in known:
            raise APIError(400, f"unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
        if key in FIXED_FIELDS and value not in (None, "") and str(value).lower() not in FIXED_FIELDS[key]:
            raise APIError(400, f"{key}={value!r} is not supported; this server accepts "
                           f"{' or '.join(FIXED_FIELDS[key])}", param=key, code="unsupported_value")
    if (body.get("response_format") or B64_JSON) != B64_JSON:
        raise APIError(400, f"response_format={body['response_format']!r} is not supported: only "
                       f"{B64_JSON!r} is served (images are returned inline, never stored)",
                       param="response_format", code="unsupported_value")
    model = body.get("model")
    if model not in (None, "", settings.model):
        raise APIError(400, f"model {model!r} is not served; this server serves {settings.model!r}",
                       param="model", code="model_not_found")
    if body.get("prompt") in (None, ""):
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")

    values = {}
    for name in ("prompt", *OPENAI_NAMES, *extensions):
        param = openai_name(name)
        if body.get(param) not in (None, ""):
            values[name] = coerce(param, body[param], INPUT_BY_FIELD[name])
    size = body.get("size")
    if size not in (None, "", "auto"):
        if not isinstance(size, str):
            raise APIError(400, "size must be a string WIDTHxHEIGHT", param="size")
        try:
            values["width"], values["height"] = parse_size(size)
        except ValueError as exc:
            raise APIError(400, f"size: {exc}", param="size") from None
    return values


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> RGB uint8 [H, W, 3] (an alpha channel is dropped)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, "image is not an image file this server can read (PNG, JPEG, WebP)",
                       param="image", code="invalid_image") from None


def encode_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def triton_inputs(values: Mapping[str, Any], init_image: np.ndarray | None) -> dict[str, np.ndarray]:
    """Triton input name -> array: the set Request fields through the contract's encoders,
    and INIT_IMAGE as is."""
    arrays = {}
    for name, value in values.items():
        f = INPUT_BY_FIELD[name]
        try:
            arrays[f.name] = f.encode(value)
        except (OverflowError, ValueError):
            param = openai_name(name)
            raise APIError(400, f"{param} ({f.name}) is out of range for {f.dtype}: {value!r}",
                           param=param) from None
    if init_image is not None:
        arrays[INIT_IMAGE.name] = init_image
    return arrays


# -------------------------------------------------------------------- Triton

def triton_error(exc: InferenceServerException, triton_url: str = "Triton") -> APIError:
    """Triton's status -> HTTP status and OpenAI error type; the message passes through, and
    an INVALID_ARG message starts with the input it is about (the contract's convention)."""
    status, type_, code = TRITON_STATUS.get(str(exc.status()), (500, "server_error", None))
    message = exc.message() or str(exc)
    unreachable = problem(exc, triton_url, "grpc")
    if unreachable is not None:  # not busy: the API cannot reach Triton at all
        return APIError(503, unreachable, "server_error", None, "triton_unreachable")
    param = param_of_message(message) if status == 400 else None
    if code == "server_busy" and not message.startswith(BUSY_MESSAGE):
        message = f"{BUSY_MESSAGE}: {message}"
    return APIError(status, message, type_, param, code)


class TritonImages:
    """One asyncio gRPC channel to Triton, shared by all requests in flight."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client: triton.InferenceServerClient | None = None
        self._deployment: Deployment | None = None

    async def open(self) -> None:
        self.client = triton.InferenceServerClient(self.settings.triton_url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready()
                        and await self.client.is_model_ready(self.settings.model))
        except InferenceServerException:
            return False

    async def deployment(self) -> Deployment | None:
        """What the deployment serves (``client.deployment``), read once; None while it
        cannot be read (the request then meets the server's own checks)."""
        if self._deployment is None:
            try:
                configs = [(await self.client.get_model_config(name, as_json=True))["config"]
                           for name in (self.settings.model, STREAM_MODEL_NAME)]
            except InferenceServerException:
                return None
            self._deployment = Deployment(frozenset(i["name"] for i in configs[0].get("input", ())),
                                          pipeline_params(configs[1]))
        return self._deployment

    async def generate(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """uint8 [n, H, W, 3]; APIError on a Triton error."""
        tensors = []
        for name, array in inputs.items():
            dtype = INIT_IMAGE.dtype if name == INIT_IMAGE.name else INPUT_BY_NAME[name].dtype
            tensor = triton.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        try:  # IMAGE only: the latents would be bytes on the wire for nothing
            result = await self.client.infer(self.settings.model, tensors,
                                             outputs=[triton.InferRequestedOutput(IMAGE_OUTPUT.name)],
                                             client_timeout=self.settings.timeout_s)
        except InferenceServerException as exc:
            error = triton_error(exc, self.settings.triton_url)
            if error.code == "timeout":
                error.message = (f"no result within {self.settings.timeout_s:g} s (serve.openai "
                                 f"--timeout); the request was cancelled: {error.message}")
            raise error from None
        images = result.as_numpy(IMAGE_OUTPUT.name)
        return images[None] if images.ndim == 3 else images  # a deployment from before NUM_IMAGES


async def cancel_on_disconnect(request: HTTPRequest, work: Awaitable):
    """Await ``work``; cancel it (and so the gRPC call, which Triton then cancels) when the
    HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(CLIENT_CLOSED, "the client closed the request; it was cancelled",
                               code="client_closed")
    finally:
        if not task.done():
            task.cancel()


# -------------------------------------------------------------------- app

def create_app(settings: Settings) -> FastAPI:
    images = TritonImages(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await images.open()
        try:
            yield
        finally:
            await images.close()

    app = FastAPI(title="AsyncDiff images API (OpenAI-compatible)", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):  # FastAPI's 422, reshaped
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                              param=loc[-1] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def respond(request: HTTPRequest, values: dict, init_image: np.ndarray | None) -> dict:
        created = int(time.time())
        inputs = triton_inputs(values, init_image)
        batch = await cancel_on_disconnect(request, images.generate(inputs))
        # One worker thread per image: Pillow releases the GIL while it compresses.
        encoded = await asyncio.gather(*(asyncio.to_thread(encode_png, image) for image in batch))
        return {"created": created, "data": [{B64_JSON: png} for png in encoded]}

    @app.post("/v1/images/generations")
    async def generations(request: HTTPRequest):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return await respond(request, request_fields(body, edit=False, settings=settings), None)

    @app.post("/v1/images/edits")
    async def edits(request: HTTPRequest):
        form = await request.form()
        if form.get("mask") is not None:
            raise APIError(400, "inpainting (mask) is not supported: send no mask; the whole "
                           "image is re-noised by strength", param="mask", code="unsupported_value")
        uploads = [v for key in ("image", "image[]") for v in form.getlist(key)]
        if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
            raise APIError(400, f"edits take exactly one image file, got {len(uploads)}",
                           param="image", code="invalid_image")
        fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
        values = request_fields(fields, edit=True, settings=settings)
        deployment = await images.deployment()
        if deployment is not None and not deployment.img2img:
            raise APIError(400, f"edits (img2img) are not served by this deployment "
                           f"({deployment.family}): its model takes no image; use generations",
                           param="image", code="unsupported_value")
        image = await asyncio.to_thread(decode_image, await uploads[0].read())
        # No size: the image's own when served, else the served size closest to its aspect
        # ratio; the image is resized to the request's size.
        values["width"], values["height"] = choose_size(
            (image.shape[1], image.shape[0]), deployment.sizes() if deployment else [],
            values.get("width"), values.get("height"))
        image = await asyncio.to_thread(fit_image, image, values["width"], values["height"])
        return await respond(request, values, image)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": settings.model, "object": "model", "created": 0, "owned_by": "asyncdiff"}]}

    @app.get("/health")
    async def health():
        if await images.ready():
            return {"status": "ready", "model": settings.model, "triton_url": settings.triton_url}
        raise APIError(503, f"Triton at {settings.triton_url} or its model {settings.model!r} is not "
                       "ready", "server_error", code="not_ready")

    return app


def check_triton(settings: Settings, wait_s: float, say=print) -> str | None:
    """None once Triton answers gRPC at ``settings.triton_url`` and serves the model; else
    why not, in one line. A port that speaks another protocol fails at once; anything else
    is retried for ``wait_s`` seconds (a server still loading its models), said once."""
    deadline, said = time.monotonic() + wait_s, None
    while True:
        try:
            read_deployment("grpc", settings.triton_url, settings.model, timeout=10.0)
            return None
        except Exception as exc:
            cause = problem(exc, settings.triton_url, "grpc")
            if cause is None and not isinstance(exc, InferenceServerException):
                raise
            cause = cause or f"Triton at {settings.triton_url}: {exc.message() or exc}"
            if wrong_protocol(exc, "grpc") or time.monotonic() >= deadline:
                return cause
        if cause != said:
            say(f"waiting up to {wait_s:g} s for Triton: {cause}")
            said = cause
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.openai", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-url", default=default_url("grpc"),
                        help="Triton's gRPC HOST:PORT (default: %(default)s, from $GRPC_PORT)")
    parser.add_argument("--model", default=Settings.model,
                        help="the Triton model to call; also the only `model` accepted "
                        "(default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)  # 8000 is Triton's HTTP port
    parser.add_argument("--timeout", type=float, default=Settings.timeout_s,
                        help="seconds one generation may take before a 504 (default: %(default)s)")
    parser.add_argument("--wait-triton", type=float, default=60.0, metavar="SECONDS",
                        help="at start, how long to wait for Triton to answer gRPC and serve "
                        "the model before exiting with the reason (default: %(default)s)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    import uvicorn

    settings = Settings(triton_url=args.triton_url, model=args.model, timeout_s=args.timeout)
    problem_ = check_triton(settings, args.wait_triton, lambda line: print(line, file=sys.stderr))
    if problem_ is not None:
        print(f"error: {problem_}", file=sys.stderr)
        return 1
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
