"""Triton Python-based backend ``asyncdiff_pipeline``: the AsyncDiff engine behind ``asyncdiff_stream``.

A decoupled model with ``async def execute``: the python backend does not wait
for it, so every request runs as its own task and many are in flight at once.
Per request: parse and validate (``asyncdiff.contract``: the size among the
exported ones, NUM_IMAGES within ``max_batch_requests``), wait for one batch
slot per image (beyond ``max_queue_size`` waiting, "server busy"), tokenize ->
the text encoder(s) -> the conditioning, repeated per image -> with INIT_IMAGE
the ``vae_encoder`` and the re-noised latents (``asyncdiff.img2img``) -> one
core ``Generation`` of NUM_IMAGES rows (seeds SEED, SEED+1, ...) -> ``vae_decoder``.
The conditioning is the partition's (``asyncdiff.conditioning``):
SD's text states are ``text_encoder``'s output as it is; SDXL's are both
encoders' penultimate states concatenated, with ``text_encoder_2``'s pooled
``text_embeds`` and the ``time_ids`` of the request's size inputs, as diffusers
builds them. SD3's (``sd3_conditioning``, as in-process): both CLIPs' penultimate
states padded to T5's width, then ``text_encoder_3``'s states (zeros without T5),
and both CLIPs' pooled outputs; its latents are plain seeded Gaussians (flow
matching) and the VAE decodes latents / scaling_factor + shift_factor.
FLUX's (``flux_conditioning`` and ``flux_ids``, as in-process): one row per image,
no CFG (``FLUX_DENOISING``: packed latents, sigmas with the dynamic shift of the
image size, GUIDANCE_SCALE into the guidance embedding), ``text_encoder``'s (CLIP)
pooled output and ``text_encoder_2``'s (T5) states; NEGATIVE_PROMPT is refused.
The denoising loop is the dataflow driver (``asyncdiff.dataflow``): a component's
call goes out as soon as its inputs exist, the scheduler step runs while
components 1..N-1 compute, and only component 0 waits for it. Every model call
goes through one ``CallBatcher`` (``asyncdiff.batching``): it is sent at once
while its model has room (one call running and one waiting per instance), and
the calls that found the model full go out as ONE call on their concatenated
rows when it has room again (continuous batching across requests). Responses,
for a caller that asks for STEP or PREVIEW: one progress response per step
(STEP = [done, total], PREVIEW every PREVIEW_EVERY steps), then the final one
(IMAGE, LATENTS, STEP). A request whose client has gone is stopped at the next
step boundary and frees its slot.

The model runs its own event loop on a thread of its own and ``execute`` only
hands each request to it: an ``async def execute`` of a decoupled model is tracked
by the stub as a background future, and one that returns at once races the stub's
bookkeeping ("Cannot remove future from background; KeyError" in the server log).

The unary ``asyncdiff`` model (backend ``asyncdiff_unary``) forwards to this
one, asking for the final outputs only (no progress responses); it cancels a
forwarded request by sending a request with the parameter ``cancel`` = that
request's id.

Activations are never converted unless two requests' calls are merged: a
component's output tensor is named like the input it feeds, so the response
tensor object is passed on. The latent going in, the timestep and the noise
prediction cross between torch and Triton, through DLPack on a GPU.

Dtypes: every tensor sent is cast to its served dtype (``PipelineParams.dtypes``);
the noise prediction and the image come back as fp32, so guidance and the
scheduler never see fp16. Memory (GPU deployments only): each call asks for its
outputs on the device that consumes them (``Placement.output_gpus``); timesteps
stay host tensors. On the CPU no call states a preferred memory.
"""

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from asyncdiff import img2img
from asyncdiff.batching import CallBatcher, ModelCall, Slots
from asyncdiff.dataflow import denoise
from asyncdiff.conditioning import (
    FLUX, FLUX_PATCH, SD, SD3, SDXL, TEXT_STATES, cfg_token_ids_each, check_no_negative_prompt,
    conditioning_kind, denoiser_conditioning, flux_conditioning, flux_ids, flux_token_ids,
    parse_size_inputs, sd3_conditioning, sd3_token_ids, sdxl_conditioning, zero_negative,
)
from asyncdiff.contract import (
    BUSY_MESSAGE, CANCELLED_MESSAGE, INIT_IMAGE, PREVIEW_EVERY, SCHEDULERS,
    PipelineParams, Request,
)
from asyncdiff.flux import FLUX_DENOISING
from asyncdiff.generation import (
    Denoising, Generation, cfg_batch, check_scheduler_fits, latent_input, make_scheduler,
    max_steps, scheduler_fits,
)
from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from asyncdiff.pipeline import per_image, to_uint8_images
from asyncdiff.sd3 import vae_latents

HOST_INPUTS = ("timestep", "guidance")  # a few bytes: a GPU copy would cost more than it saves
# Per-row scalars the components declare as [1]: sent as [batch, 1]
ROW_SCALARS = ("timestep", "guidance")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEAD_STUB = "is not healthy"  # the python backend's error for a model whose stub died
PROGRESS = ("STEP", "PREVIEW")  # outputs only progress responses carry
# Each BLS call holds an executor thread until its answer (async_exec runs the blocking call
# there); the default pool (cores + 4) would hold back calls that are ready to go.
BLS_THREADS = 64


class ComponentError(RuntimeError):
    """A model called by the pipeline failed or timed out."""


class Refused(Exception):
    """A request answered with an error before or between steps (code, message)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.params = PipelineParams.from_parameters(
            {k: v["string_value"] for k, v in config.get("parameters", {}).items()})
        p = self.params
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.partition = Partition.load(os.path.join(version_dir, p.partition_file))
        with open(os.path.join(version_dir, p.scheduler_config_file)) as f:
            self.scheduler_config = json.load(f)
        self.kind = conditioning_kind(self.partition)
        self.denoising = FLUX_DENOISING if self.kind == FLUX else Denoising()
        self.dynamic_shift = self.kind == FLUX  # FLUX passes mu (the image size) to set_timesteps
        latent, c, h, w = latent_input(self.partition).shape[1:], *p.latent_shape
        served = ((h * w // FLUX_PATCH ** 2, c * FLUX_PATCH ** 2) if self.kind == FLUX
                  else (c, h, w))  # FLUX's components take the latents packed
        if tuple(latent) != served:
            raise ValueError(f"latent_shape {list(p.latent_shape)} disagrees with "
                             f"{p.partition_file} ({latent})")
        if self.kind != p.conditioning:
            raise ValueError(f"pipeline parameter conditioning={p.conditioning!r}, but the "
                             f"components of {p.partition_file} take {self.kind!r} conditioning")
        from transformers import CLIPTokenizer, T5TokenizerFast

        # (tokenizer folder, text encoder, its outputs): one each for SD, two for SDXL, two
        # CLIPs (+ T5) for SD3, CLIP (pooled) and T5 for FLUX.
        first = [p.text_encoder.output] + ([p.text_encoder_pooled] if self.kind == SD3 else [])
        encoders = [(p.tokenizer_dir, p.text_encoder, first)]
        if self.kind in (SDXL, SD3):
            encoders.append((p.tokenizer_2_dir, p.text_encoder_2,
                             [p.text_encoder_2.output, p.text_encoder_2_pooled]))
        if self.kind == FLUX:
            encoders.append((p.tokenizer_2_dir, p.text_encoder_2, [p.text_encoder_2.output]))
        if self.kind == SD3 and p.t5:
            encoders.append((p.tokenizer_3_dir, p.text_encoder_3, [p.text_encoder_3.output]))
        t5_index = 1 if self.kind == FLUX else 2
        self.tokenizers = [(T5TokenizerFast if i == t5_index else CLIPTokenizer).from_pretrained(
            os.path.join(version_dir, d)) for i, (d, _, _) in enumerate(encoders)]
        self.encoders = [(net, outs) for _, net, outs in encoders]
        # SD3 without T5: the zeros fill the text states' width (joint_attention_dim); FLUX:
        # T5 is padded to the components' text tokens
        *_, self.text_tokens, self.text_width = next(
            t.shape for t in denoiser_conditioning(self.partition) if t.name == TEXT_STATES)
        self.device = torch.device(p.device)
        self.dtypes = {name: getattr(torch, dtype) for name, dtype in p.dtypes.items()}
        part = self.partition
        place = Placement(part.num_components, part.stride, part.batched_stride, p.gpus)
        if p.device != place.device(place.pipeline_rank):
            raise ValueError(f"pipeline parameters device={p.device!r} and gpus={p.gpus} disagree: "
                             f"the pipeline runs beside component 0, on "
                             f"{place.device(place.pipeline_rank)!r}")
        # Where each call's outputs are consumed: component k's by its main reader, the
        # noise prediction, text states and image by the pipeline (DLPack, no host copy).
        self.memory = {c.name: _memory(gpu) for c, gpu in zip(part.components,
                                                              place.output_gpus(part.components))}
        self.pipeline_memory = _memory(place.output_gpu())
        # the last component of a plain S=2 deployment has a second instance (the stride copy)
        instances = ({part.components[-1].name: 2}
                     if part.stride == 2 and not part.batched_stride else {})
        self.batcher = CallBatcher(self._send, rows=lambda t: t.shape()[0], concat=self._concat,
                                   split=self._split, max_rows=p.max_batch_sizes,
                                   instances=instances, signature=lambda t: tuple(t.shape()[1:]))
        self.slots = Slots(p.max_batch_requests)  # one per image in flight
        self.vae_scale = p.image_shape[0] // p.latent_shape[1]  # pixels per latent cell
        self.running: set[str] = set()  # request ids in flight
        self.cancelled: set[str] = set()  # ... whose forwarder asked to stop
        self.tasks: set[asyncio.Future] = set()
        self.reloads: dict[str, asyncio.Future] = {}  # models being reloaded after a crash
        torch.set_num_threads(1)  # the components, not the orchestrator, need the cores
        self._warm_up()
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(BLS_THREADS, "asyncdiff-bls"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="asyncdiff-engine",
                                       daemon=True)
        self.thread.start()

    def _warm_up(self):
        """Pay the first request's one-time costs at load: importing diffusers' schedulers (the
        bulk of a cold first request) and the tokenizers' first call."""
        self.max_steps = {name: max_steps(name, self.scheduler_config) for name in SCHEDULERS
                          if scheduler_fits(name, self.scheduler_config,
                                            dynamic_shift=self.dynamic_shift)}
        for name in self.max_steps:  # flow matching's max_steps builds no scheduler
            make_scheduler(name, self.scheduler_config)
        self._token_ids(Request("warm-up"))

    def _token_ids(self, req):
        """[negative; prompt] token ids per text encoder (SD3's T5 padded to 256 tokens);
        FLUX: the prompt's alone, T5's padded to the components' text tokens."""
        if self.kind == SD3:
            return sd3_token_ids(self.tokenizers, req)
        if self.kind == FLUX:
            return flux_token_ids(self.tokenizers, req, self.text_tokens)
        return cfg_token_ids_each(self.tokenizers, req)

    def execute(self, requests):
        for request in requests:  # decoupled: answered through each request's response sender
            future = asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
            self.tasks.add(future)
            future.add_done_callback(self.tasks.discard)
        return None

    def finalize(self):
        for future in list(self.tasks):
            future.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.tokenizers = None

    # -- one request ---------------------------------------------------------
    async def _serve(self, request):
        sender = request.get_response_sender()
        try:
            response = await self._respond(request, sender)
        except Refused as exc:
            response = _error(str(exc), exc.code)
        except ComponentError as exc:
            response = _error(str(exc), pb_utils.TritonError.INTERNAL)
        except Exception as exc:  # a server-side fault fails this request only, not its batch-mates
            pb_utils.Logger.log_error(f"asyncdiff: {type(exc).__name__}: {exc}")
            response = _error(f"internal error: {type(exc).__name__}: {exc}",
                              pb_utils.TritonError.INTERNAL)
        if response.has_error() and _parameters(request).get("error_output"):
            # An error response after progress responses never reaches a BLS caller (the
            # unary model) in Triton 2.51, so it gets the message as a tensor instead.
            response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "ERROR", np.array([response.error().message().encode()], dtype=np.object_))])
        sender.send(response, flags=FINAL)

    async def _respond(self, request, sender):
        cancel = _parameters(request).get("cancel")
        if cancel is not None:  # a control request from the unary forwarder
            if cancel in self.running:
                self.cancelled.add(cancel)
            return pb_utils.InferenceResponse(output_tensors=[])
        p = self.params
        try:  # only parsing and validation are the client's to fix
            req = Request.from_inputs(lambda name: _input(request, name), p.defaults)
            check_scheduler_fits(req.scheduler, self.scheduler_config,
                                 dynamic_shift=self.dynamic_shift)
            if self.kind == FLUX:
                check_no_negative_prompt(req)
            _check_steps(req, self.max_steps[req.scheduler])
            width, height = p.request_size(req)
            images = p.request_images(req)
            preview_every = _preview_every(_input(request, PREVIEW_EVERY.name), req.steps)
            init_image = self._init_image(request, req, height, width)
            ids = self._token_ids(req)
            sizes = self._sizes(request, height, width)
        except ValueError as exc:
            raise Refused(str(exc), pb_utils.TritonError.INVALID_ARG) from None
        if not self.slots.available(images) and self.slots.waiting >= p.max_queue_size:
            raise Refused(f"{BUSY_MESSAGE}: {self.slots.capacity - self.slots.free} images in "
                          f"flight (max_batch_requests {p.max_batch_requests}) and "
                          f"{self.slots.waiting} requests waiting (max_queue_size "
                          f"{p.max_queue_size}); retry later", pb_utils.TritonError.UNAVAILABLE)
        await self.slots.acquire(images)
        rid = request.request_id()
        self.running.add(rid)
        try:
            return await self._generate(request, sender, req, (height, width), ids, sizes,
                                        init_image, preview_every)
        finally:
            self.running.discard(rid)
            self.cancelled.discard(rid)
            self.slots.release(images)

    async def _generate(self, request, sender, req, size, ids, sizes, init_image, preview_every):
        outputs = set(request.requested_output_names()) or {"IMAGE", "LATENTS", "STEP"}
        # A request forwarded by the unary model learns of its cancellation from a control
        # request naming it; is_cancelled() is an IPC round trip per step, spared there.
        forwarded = bool(_parameters(request).get("error_output"))
        self._check_cancelled(request, 0, forwarded)
        rows = per_image([req])
        latent_size = tuple(n // self.vae_scale for n in size)
        conditioning = await self._encode(req, ids, sizes, len(rows))
        if self.kind == FLUX:  # the position ids of the packed image and text tokens
            conditioning.update(flux_ids(len(rows), *latent_size, self.text_tokens))
        start = {} if init_image is None else await self._init_latents(init_image, rows)
        gen = Generation(self.partition, rows, conditioning, self.scheduler_config,
                         device=self.device, latent_size=latent_size, to_executor=self._to_triton,
                         from_executor=self._noise_pred, denoising=self.denoising,
                         batched_stride=self.partition.batched_stride, **start)
        progress = _Progress(sender, outputs) if outputs & set(PROGRESS) else None

        def on_step(i):  # after the scheduler step of step i
            done = i + 1
            if done == gen.steps:
                return
            self._check_cancelled(request, done, forwarded)
            if progress is not None:
                preview = None
                if preview_every and done % preview_every == 0 and "PREVIEW" in outputs:
                    # the first image's current estimate, decoded while denoising goes on
                    preview = asyncio.ensure_future(self._decode(gen.latents[:1], size))
                progress.send(done, gen.steps, preview)

        sent: set[int] = set()
        latents = await denoise(gen, lambda call: self.batcher.submit(_fresh(call, sent, gen)),
                                on_step)
        if progress is not None:
            await progress.flush()  # a preview still decoding goes out before the image
        images = await self._decode(latents, size)
        final = [pb_utils.Tensor("IMAGE", images),
                 pb_utils.Tensor("LATENTS", latents.cpu().numpy().astype(np.float32)),
                 pb_utils.Tensor("STEP", np.array([gen.steps, gen.steps], np.int32))]
        return pb_utils.InferenceResponse(output_tensors=[t for t in final if t.name() in outputs])

    def _check_cancelled(self, request, step, forwarded):
        if request.request_id() in self.cancelled or (not forwarded and request.is_cancelled()):
            pb_utils.Logger.log_info(f"asyncdiff: request cancelled before step {step}")
            raise Refused(f"{CANCELLED_MESSAGE} before step {step}", pb_utils.TritonError.CANCELLED)

    def _sizes(self, request, height, width):
        """SDXL's size conditioning (the request's ORIGINAL_SIZE / CROPS_COORDS_TOP_LEFT, else
        diffusers' defaults for its size); None for SD, whose models do not declare those inputs."""
        if self.kind != SDXL:
            return None
        return parse_size_inputs(lambda name: _input(request, name), height, width)

    def _init_image(self, request, req, height, width):
        """INIT_IMAGE (uint8 [HEIGHT, WIDTH, 3]) or None; checked with STRENGTH before any work."""
        image = _input(request, INIT_IMAGE.name)
        if image is None:
            return None
        if image.shape != (height, width, 3):
            raise ValueError(f"INIT_IMAGE must be [HEIGHT, WIDTH, 3] = [{height}, {width}, 3] (the "
                             f"request's size), got {list(image.shape)}")
        img2img.steps_to_run(req.steps, req.strength, req.warmup)  # STRENGTH leaves enough steps
        return image

    # -- model calls ---------------------------------------------------------
    async def _encode(self, req, ids, sizes, images):
        """The components' conditioning of one request, its [uncond; cond] rows repeated for
        ``images`` images ([uncond x k; cond x k]; FLUX: its one row, k times), by name:
        Triton tensors or torch tensors that ``Generation`` converts with ``_to_triton``."""
        # Every text encoder in one run: batched with other requests' calls, side by side.
        calls = [ModelCall(net.model, {net.input: pb_utils.Tensor(net.input, i)}, outs)
                 for (net, outs), i in zip(self.encoders, ids, strict=True)]
        outs = await self.batcher.run(calls)
        if self.kind == SD:
            out = outs[0][self.params.text_encoder.output]
            if images == 1 and (self.dtypes.get(self.params.text_encoder.output)
                                == self.dtypes.get(TEXT_STATES)):
                # the served dtype already: renamed, not copied
                return {TEXT_STATES: pb_utils.Tensor.from_dlpack(TEXT_STATES, out.to_dlpack())}
            pair = {TEXT_STATES: _to_torch(out, self.device)}
        elif self.kind == SD3:
            p = self.params
            states = [_to_torch(o[net.output], self.device)
                      for o, (net, _) in zip(outs, self.encoders)]
            pooled = [_to_torch(outs[0][p.text_encoder_pooled], self.device),
                      _to_torch(outs[1][p.text_encoder_2_pooled], self.device)]
            pair = sd3_conditioning(states[:2], pooled, states[2] if p.t5 else None,
                                    t5_width=self.text_width)
        elif self.kind == FLUX:
            p = self.params
            row = flux_conditioning(_to_torch(outs[0][p.text_encoder.output], self.device),
                                    _to_torch(outs[1][p.text_encoder_2.output], self.device))
            return {name: torch.cat([value] * images) for name, value in row.items()}
        else:
            p = self.params
            states = [_to_torch(o[net.output], self.device)
                      for o, (net, _) in zip(outs, self.encoders)]
            pooled = _to_torch(outs[1][p.text_encoder_2_pooled], self.device)
            pair = sdxl_conditioning(states, pooled, sizes,
                                     zero_negative(req, p.force_zeros_for_empty_prompt))
        return {name: cfg_batch([value] * images) for name, value in pair.items()}

    async def _init_latents(self, image, rows):
        """img2img: the VAE encoder's posterior of INIT_IMAGE, sampled and noised per image with
        its own seed (``asyncdiff.img2img``): the Generation's starting point."""
        net = self.params.vae_encoder
        x = self._to_triton(net.input, img2img.preprocess(image, *image.shape[:2]))
        out = (await self.batcher.run([ModelCall(net.model, {net.input: x}, [net.output])]))[0]
        moments = _to_torch(out[net.output], self.device).float()
        latents, noise = img2img.init_latents(moments.expand(len(rows), -1, -1, -1),
                                              [r.seed for r in rows], self.params.vae_scaling_factor)
        return {"init_latents": latents, "noise": noise}

    async def _decode(self, latents, size):
        """Latents [k, C, h, w] as uint8 images [k, HEIGHT, WIDTH, 3]."""
        net = self.params.vae_decoder
        z = self._to_triton(net.input, vae_latents(latents, self.params.vae_scaling_factor,
                                                   self.params.vae_shift_factor))
        out = (await self.batcher.run([ModelCall(net.model, {net.input: z}, [net.output])]))[0]
        images = to_uint8_images(_to_torch(out[net.output], torch.device("cpu")).float())
        if images.shape != (latents.shape[0], *size, 3):  # a server-side fault: INTERNAL
            raise ValueError(f"{net.model} returned images of shape {list(images.shape)}, "
                             f"expected {[latents.shape[0], *size, 3]}")
        return images

    def _to_triton(self, name, tensor):
        """torch -> a Triton tensor of the served dtype, without a host copy on a GPU. A name
        export did not list (the outer ring's warm-up placeholders, made in the input's own
        dtype) keeps its dtype."""
        if name in ROW_SCALARS:  # components declare the per-sample value as [1]: [batch, 1]
            tensor = tensor.reshape(-1, 1)
        if name in HOST_INPUTS:
            tensor = tensor.cpu()
        tensor = tensor.to(self.dtypes.get(name, tensor.dtype)).contiguous()
        if tensor.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
        return pb_utils.Tensor(name, tensor.numpy())

    def _noise_pred(self, tensor):
        return _to_torch(tensor, self.device)  # Generation casts it to fp32 for the scheduler

    def _concat(self, name, tensors):
        """Rows of several requests' tensors as one tensor, where the first one lives (on the
        host: one copy, numpy straight from each tensor's buffer)."""
        if all(t.is_cpu() for t in tensors):
            return pb_utils.Tensor(name, np.concatenate([t.as_numpy() for t in tensors]))
        device = _device(tensors[0])
        return _from_torch(name, torch.cat([_to_torch(t, device) for t in tensors]))

    def _split(self, name, tensor, sizes):
        if tensor.is_cpu():  # row blocks of a C-contiguous array: contiguous views, no copy
            rows = np.split(tensor.as_numpy(), np.cumsum(sizes)[:-1])
            return [pb_utils.Tensor(name, r) for r in rows]
        rows = torch.split(_to_torch(tensor, _device(tensor)), sizes)
        return [_from_torch(name, r.contiguous()) for r in rows]

    def _send(self, model, inputs, outputs, retried=False):
        """Start one BLS call now (its blocking part runs on an executor thread); the future
        resolves to the outputs by name or fails with a ComponentError naming the model."""
        result = self.loop.create_future()
        memory = self.memory.get(model, self.pipeline_memory)
        request = pb_utils.InferenceRequest(model_name=model, inputs=list(inputs.values()),
                                            requested_output_names=list(outputs), **memory)
        call = request.async_exec()
        timeout = self.params.component_timeout_s
        # A call that timed out is never cancelled: cancelling a BLS future that Triton still
        # owns crashed the server (Signal 11) once its model was later unloaded.
        timer = self.loop.call_later(timeout, _fail, result, ComponentError(
            f"model '{model}' did not answer within {timeout:g} s"))
        call.add_done_callback(lambda answered: self._answered(
            answered, timer, result, model, inputs, outputs, retried))
        return result

    def _answered(self, call, timer, result, model, inputs, outputs, retried):
        timer.cancel()
        if result.done():  # timed out: the late answer is dropped
            return
        try:
            response = call.result()
        except Exception as exc:  # noqa: BLE001 -- the stub could not make the call
            result.set_exception(ComponentError(f"model '{model}' failed: {exc}"))
            return
        if not response.has_error():
            result.set_result({n: pb_utils.get_output_tensor_by_name(response, n) for n in outputs})
            return
        message = response.error().message()
        if DEAD_STUB in message and not retried:
            # The model's stub process died (killed, out of memory): reload it and retry once.
            retry = asyncio.ensure_future(self._retry(model, inputs, outputs))
            retry.add_done_callback(lambda done: _settle(result, done))
            return
        result.set_exception(ComponentError(f"model '{model}' failed: {message}"))

    async def _retry(self, model, inputs, outputs):
        await self._reload(model)
        return await self._send(model, {n: _copy(t) for n, t in inputs.items()}, outputs,
                                retried=True)

    async def _reload(self, model):
        """Reload a model whose stub died (explicit model control: python -m serve and the
        container use it); concurrent failures of one model share one reload."""
        if model not in self.reloads:
            self.reloads[model] = asyncio.ensure_future(self._do_reload(model))
            self.reloads[model].add_done_callback(lambda _: self.reloads.pop(model, None))
        await asyncio.shield(self.reloads[model])

    async def _do_reload(self, model):
        pb_utils.Logger.log_warn(f"asyncdiff: the stub of '{model}' died; reloading it")
        try:  # blocking calls: this loop waits a few seconds, as do its requests
            pb_utils.unload_model(model)
            pb_utils.load_model(model)
        except Exception as exc:
            raise ComponentError(f"model '{model}' died and could not be reloaded: {exc}") from None
        pb_utils.Logger.log_warn(f"asyncdiff: '{model}' reloaded; retrying its call")


class _Progress:
    """A request's progress responses, in step order: a step whose preview is still being
    decoded holds back the steps after it."""

    def __init__(self, sender, outputs):
        self.sender, self.outputs = sender, outputs
        self.pending = None  # the last response waiting for a preview

    def send(self, done, total, preview=None):
        step = pb_utils.Tensor("STEP", np.array([done, total], np.int32))
        if preview is None and self.pending is None:
            self._respond([step])
        else:
            self.pending = asyncio.ensure_future(self._after(self.pending, step, preview))

    async def flush(self):
        if self.pending is not None:
            await self.pending

    async def _after(self, before, step, preview):
        if before is not None:
            await before
        tensors = [step] if preview is None else [step, pb_utils.Tensor("PREVIEW", (await preview)[0])]
        self._respond(tensors)

    def _respond(self, tensors):
        self.sender.send(pb_utils.InferenceResponse(
            output_tensors=[t for t in tensors if t.name() in self.outputs]))


def _fresh(call, sent: set[int], owner):
    """``call`` as a ModelCall of ``owner`` (its generation), every Tensor object that an earlier call of this generation was
    given replaced by a new one (``_rewrap``). Tensors are shared between calls (the text states by every call,
    a timestep by the calls of one timestep, a skip by two readers), and one Tensor object in
    two requests is not safe: batched into one execution it arrived corrupted ("input byte
    size mismatch")."""
    inputs = {n: _rewrap(t) if id(t) in sent else t for n, t in call.inputs.items()}
    sent.update(id(t) for t in inputs.values())
    return ModelCall(call.model, inputs, call.output_names, owner)


def _fail(future, exc):
    if not future.done():
        future.set_exception(exc)


def _settle(future, source):
    """Hand ``source``'s outcome to ``future`` (unless that one is settled already)."""
    if future.done():
        return
    if source.exception() is not None:
        future.set_exception(source.exception())
    else:
        future.set_result(source.result())


def _check_steps(req, limit):
    if req.steps > limit:
        raise ValueError(f"STEPS must be in [1, {limit}] with SCHEDULER {req.scheduler} on this "
                         f"model (more would start outside its noise schedule), got {req.steps}")


def _parameters(request):
    return json.loads(request.parameters() or "{}")


def _preview_every(array, steps):
    if array is None:
        return 0
    value = PREVIEW_EVERY.parse(array)
    if not 0 <= value <= steps:
        raise ValueError(f"PREVIEW_EVERY must be in [0, STEPS={steps}], got {value}")
    return value


def _memory(gpu):
    """``InferenceRequest`` keywords that ask for a call's outputs on CUDA device ``gpu``;
    none for None (CPU deployments leave outputs where the runtime put them)."""
    if gpu is None:
        return {}
    return {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, gpu)}


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _rewrap(tensor):
    """A new Tensor object on the same host data (sending copies it anyway); a GPU tensor is
    copied."""
    if tensor.is_cpu():
        return pb_utils.Tensor(tensor.name(), tensor.as_numpy())
    return _copy(tensor)


def _copy(tensor):
    """A new Tensor object with its own copy of the data, on the same device."""
    if tensor.is_cpu():
        return pb_utils.Tensor(tensor.name(), np.array(tensor.as_numpy()))
    data = torch.from_dlpack(tensor.to_dlpack()).clone()
    return pb_utils.Tensor.from_dlpack(tensor.name(), torch.utils.dlpack.to_dlpack(data))


def _device(tensor):
    return torch.device("cpu") if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack()).device


def _from_torch(name, tensor):
    if tensor.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
    return pb_utils.Tensor(name, tensor.numpy())


def _to_torch(tensor, device):
    if tensor.is_cpu():
        return torch.from_numpy(np.array(tensor.as_numpy())).to(device)
    return torch.from_dlpack(tensor.to_dlpack()).to(device)
