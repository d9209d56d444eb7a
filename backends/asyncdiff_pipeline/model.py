"""Triton Python-based backend ``asyncdiff_pipeline``: text-to-image with the AsyncDiff schedule.

Per request: validate -> tokenize -> ``text_encoder`` -> seeded latents ->
for every step the core plan's waves, each wave's component requests sent at
once (``async_exec`` + ``asyncio.gather``) -> diffusers scheduler step ->
``vae_decoder``.  Routing of activations between components is the core
``ActivationCache``; this file is only the Triton glue.

Activations are never converted here: a component's output tensor is named
like the input it feeds (the producing stage's name), so the response tensor
object is passed on as the next request's input.  Only the latent going in
and the noise prediction coming out cross into torch, through DLPack when
they live on a GPU.
"""

import asyncio
import dataclasses
import json
import math
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from asyncdiff.partition import Partition
from asyncdiff.pipeline import (
    Request, denoise_steps, initial_latents, make_scheduler, to_uint8_image, token_ids,
)
from asyncdiff.runners.cache import ActivationCache
from asyncdiff.schedule import make_plan

OPTIONAL_INPUTS = {  # input name -> (Request field, python type)
    "NEGATIVE_PROMPT": ("negative_prompt", str),
    "SEED": ("seed", int),
    "STEPS": ("steps", int),
    "GUIDANCE_SCALE": ("guidance_scale", float),
    "WARMUP": ("warmup", int),
    "SCHEDULER": ("scheduler", str),
}


class ComponentError(RuntimeError):
    """A model called by the pipeline failed or timed out."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.partition = Partition.load(os.path.join(version_dir, "partition.json"))
        with open(os.path.join(version_dir, "scheduler", "scheduler_config.json")) as f:
            self.scheduler_config = json.load(f)
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(version_dir, "tokenizer"))
        self.defaults = Request(
            prompt="",
            steps=int(params.get("default_steps", 25)),
            guidance_scale=float(params.get("default_guidance_scale", 3.0)),
            warmup=int(params.get("default_warmup", 1)),
            scheduler=params.get("default_scheduler", "ddim"),
            seed=int(params.get("default_seed", 0)),
        )
        self.vae_scale = float(params.get("vae_scaling_factor", 1.0))
        self.timeout_s = float(params.get("component_timeout_s", 120))
        self.device = torch.device(params.get("device", "cpu"))
        # GPU deployments ask for component outputs in this GPU's memory (DLPack, no host copy).
        self.memory = {}
        if self.device.type == "cuda":
            self.memory = {"preferred_memory": pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0)}
        self.latent_shape = (1, int(params["latent_channels"]),
                             self.partition.latent_height, self.partition.latent_width)
        self.names = {k: params.get(k, d) for k, d in (
            ("text_encoder", "text_encoder"), ("text_input", "input_ids"),
            ("text_output", "last_hidden_state"), ("vae_decoder", "vae_decoder"),
            ("vae_input", "latents"), ("vae_output", "image"))}
        self.orphans = set()  # component calls that timed out but are still running in Triton
        torch.set_num_threads(1)  # the components, not the orchestrator, need the cores

    async def execute(self, requests):
        return await asyncio.gather(*(self._respond(r) for r in requests))

    def finalize(self):
        self.tokenizer = None

    # -- one request ---------------------------------------------------------
    async def _respond(self, request):
        try:
            req = self._parse(request)
            req.validate()
            image, latents = await self._generate(req)
        except ValueError as exc:  # bad input: the client's to fix
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except ComponentError as exc:
            return _error(str(exc), pb_utils.TritonError.INTERNAL)
        except Exception as exc:  # a bug must fail this request only, not its batch-mates
            pb_utils.Logger.log_error(f"asyncdiff: {type(exc).__name__}: {exc}")
            return _error(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("IMAGE", image),
            pb_utils.Tensor("LATENTS", latents[0].cpu().numpy().astype(np.float32)),
        ])

    def _parse(self, request) -> Request:
        fields = {"prompt": _scalar(request, "PROMPT", str)}
        for name, (field, kind) in OPTIONAL_INPUTS.items():
            value = _scalar(request, name, kind, required=False)
            if value is not None:
                fields[field] = value
        return dataclasses.replace(self.defaults, **fields)

    async def _generate(self, req: Request):
        scheduler = make_scheduler(req.scheduler, self.scheduler_config)
        scheduler.set_timesteps(req.steps, device=self.device)
        # Built once per request: every component call of every step reuses this tensor.
        text = _from_torch("encoder_hidden_states", await self._encode(req))
        plan = make_plan(req.steps, self.partition.num_components, self.partition.stride, req.warmup)
        cache = ActivationCache(self.partition, plan)
        latents = initial_latents(req.seed, self.latent_shape, scheduler.init_noise_sigma)
        loop = denoise_steps(scheduler, latents.to(self.device), req.guidance_scale)
        try:
            step = next(loop)
            while True:
                step = loop.send(await self._noise_pred(cache, *step, text, scheduler.timesteps))
        except StopIteration as done:
            latents = done.value
        image = await self._decode(latents)
        return image, latents

    # -- model calls ---------------------------------------------------------
    async def _encode(self, req: Request):
        ids = np.concatenate([token_ids(self.tokenizer, p) for p in (req.negative_prompt, req.prompt)])
        out = await self._infer(self.names["text_encoder"],
                                [pb_utils.Tensor(self.names["text_input"], ids)],
                                [self.names["text_output"]])
        return _to_torch(out[self.names["text_output"]], self.device)

    async def _decode(self, latents):
        z = _from_torch(self.names["vae_input"], latents / self.vae_scale)
        out = await self._infer(self.names["vae_decoder"], [z], [self.names["vae_output"]])
        return to_uint8_image(_to_torch(out[self.names["vae_output"]], torch.device("cpu")))

    async def _noise_pred(self, cache, step, model_input, text_in, timesteps):
        sample = _from_torch("sample", model_input)
        for wave in cache.waves(step):
            outs = await asyncio.gather(*(
                self._component(cache, step, call, sample, text_in, timesteps) for _, call in wave))
            for (pos, _), out in zip(wave, outs):
                cache.record(step, pos, out)
        return _to_torch(cache.noise_pred(step), self.device)

    async def _component(self, cache, step, call, sample, text_in, timesteps):
        spec = self.partition.components[call.component]
        inputs = cache.inputs(step, call, sample)
        # [batch, 1]: the component config declares the per-sample timestep as [1] reshaped to [].
        t = timesteps[call.timestep_index].float().reshape(1, 1).expand(self.latent_shape[0] * 2, 1)
        extra = {"timestep": _from_torch("timestep", t.contiguous()), "encoder_hidden_states": text_in}
        tensors = [inputs[n] if n in inputs else extra[n] for n in spec.input_names]
        return await self._infer(spec.name, tensors, spec.output_names)

    async def _infer(self, model, tensors, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=outputs, **self.memory)
        future = asyncio.ensure_future(request.async_exec())
        try:
            # shield: a timed-out call is not cancelled. Cancelling a BLS future that Triton
            # still owns crashed the server (Signal 11) once its model was later unloaded.
            response = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            self.orphans.add(future)  # keep it alive until Triton answers, then drop it
            future.add_done_callback(self.orphans.discard)
            raise ComponentError(f"model '{model}' did not answer within {self.timeout_s:g} s")
        if response.has_error():
            raise ComponentError(f"model '{model}' failed: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n) for n in outputs}


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _scalar(request, name, kind, required=True):
    """The single element of a [1]-shaped input, converted and range-checked by the caller."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"{name} must hold exactly one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind is str:
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise ValueError(f"{name} must be valid UTF-8")
    if kind is float and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {float(value)}")
    return kind(value)


def _from_torch(name, tensor):
    """torch -> Triton tensor without a host copy when the tensor is on a GPU."""
    if tensor.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))
    return pb_utils.Tensor(name, tensor.contiguous().numpy())


def _to_torch(tensor, device):
    if tensor.is_cpu():
        return torch.from_numpy(np.array(tensor.as_numpy())).to(device)
    return torch.from_dlpack(tensor.to_dlpack()).to(device)
