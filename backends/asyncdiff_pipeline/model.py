"""Triton Python-based backend ``asyncdiff_pipeline``: text-to-image with the AsyncDiff schedule.

Per request: parse and validate (``asyncdiff.contract``) -> tokenize ->
``text_encoder`` -> a core ``Generation`` (seeded latents, plan, activation
cache, guidance, scheduler) whose waves of component calls are sent at once
(``async_exec`` + ``asyncio.gather``) -> ``vae_decoder``.  Everything but how
a wave reaches Triton is core code; this file is only the Triton glue.

Activations are never converted here: a component's output tensor is named
like the input it feeds (the producing stage's name), so the response tensor
object is passed on as the next request's input.  Only the latent going in,
the timestep (once per timestep index) and the noise prediction coming out
cross between torch and Triton, through DLPack when they live on a GPU.

Dtypes: every tensor sent is cast to its served dtype (``PipelineParams.dtypes``:
an fp16 export serves fp16 components beside an fp32 text encoder and VAE);
the noise prediction and the image come back as fp32, so guidance and the
scheduler never see fp16.  Memory (GPU deployments only): each call asks for its
outputs on the device that consumes them (``Placement.output_gpus``), so an
activation goes GPU k -> its reader's GPU, not through the pipeline's GPU;
timesteps stay host tensors.  On the CPU no call states a preferred memory.
"""

import asyncio
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from asyncdiff.contract import PipelineParams, Request
from asyncdiff.generation import Generation, latent_input
from asyncdiff.partition import Partition
from asyncdiff.placement import Placement
from asyncdiff.pipeline import cfg_token_ids, to_uint8_image

TEXT_STATES = "encoder_hidden_states"  # the components' name of the text encoder's output
HOST_INPUTS = ("timestep",)  # a few bytes: a GPU copy would cost more than it saves


class ComponentError(RuntimeError):
    """A model called by the pipeline failed or timed out."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.params = PipelineParams.from_parameters(
            {k: v["string_value"] for k, v in config.get("parameters", {}).items()})
        p = self.params
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.partition = Partition.load(os.path.join(version_dir, p.partition_file))
        latent = latent_input(self.partition).shape[1:]
        if tuple(latent) != tuple(p.latent_shape):
            raise ValueError(f"latent_shape {list(p.latent_shape)} disagrees with "
                             f"{p.partition_file} ({latent})")
        with open(os.path.join(version_dir, p.scheduler_config_file)) as f:
            self.scheduler_config = json.load(f)
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(version_dir, p.tokenizer_dir))
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
        self.orphans = set()  # component calls that timed out but are still running in Triton
        torch.set_num_threads(1)  # the components, not the orchestrator, need the cores

    async def execute(self, requests):
        return await asyncio.gather(*(self._respond(r) for r in requests))

    def finalize(self):
        self.tokenizer = None

    # -- one request ---------------------------------------------------------
    async def _respond(self, request):
        try:  # only parsing and validation are the client's to fix
            req = Request.from_inputs(lambda name: _input(request, name), self.params.defaults)
            ids = cfg_token_ids(self.tokenizer, req)
        except ValueError as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        try:
            image, latents = await self._generate(req, ids)
        except ComponentError as exc:
            return _error(str(exc), pb_utils.TritonError.INTERNAL)
        except Exception as exc:  # a server-side fault fails this request only, not its batch-mates
            pb_utils.Logger.log_error(f"asyncdiff: {type(exc).__name__}: {exc}")
            return _error(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("IMAGE", image),
            pb_utils.Tensor("LATENTS", latents[0].cpu().numpy().astype(np.float32)),
        ])

    async def _generate(self, req: Request, ids: np.ndarray):
        text = await self._encode(ids)
        gen = Generation(self.partition, [req], {TEXT_STATES: text}, self.scheduler_config,
                         device=self.device, to_executor=self._to_triton, from_executor=self._noise_pred)
        sent: set[int] = set()
        latents = await gen.run_async(lambda calls: self._wave(calls, sent))
        return await self._decode(latents), latents

    # -- model calls ---------------------------------------------------------
    async def _wave(self, calls, sent: set[int]):
        # Tensors are shared between calls (the text states by every call, a timestep by the
        # calls of one timestep, a skip by two readers). One Tensor object in two requests is
        # not safe: two calls of one model batched together got it corrupted ("input byte size
        # mismatch"). So every request gets Tensor objects no earlier request of this
        # generation was given; a repeat is copied (small: timesteps, text states, skips).
        requests = []
        for c in calls:
            tensors = [_copy(t) if id(t) in sent else t for t in c.inputs.values()]
            sent.update(id(t) for t in tensors)
            requests.append(self._infer(c.model, tensors, c.output_names, self.memory[c.model]))
        return await asyncio.gather(*requests)

    async def _encode(self, ids: np.ndarray):
        """[uncond; cond] text states as the components' input tensor."""
        net = self.params.text_encoder
        out = (await self._infer(net.model, [pb_utils.Tensor(net.input, ids)], [net.output],
                                 self.pipeline_memory))[net.output]
        if self.dtypes.get(net.output) == self.dtypes.get(TEXT_STATES):  # renaming will do
            return pb_utils.Tensor.from_dlpack(TEXT_STATES, out.to_dlpack())
        return self._to_triton(TEXT_STATES, _to_torch(out, self.device))

    async def _decode(self, latents):
        net = self.params.vae_decoder
        z = self._to_triton(net.input, latents / self.params.vae_scaling_factor)
        out = await self._infer(net.model, [z], [net.output], self.pipeline_memory)
        image = to_uint8_image(_to_torch(out[net.output], torch.device("cpu")).float())
        if image.shape != tuple(self.params.image_shape):  # a server-side fault: INTERNAL
            raise ValueError(f"{net.model} returned an image of shape {list(image.shape)}, "
                               f"expected image_shape {list(self.params.image_shape)}")
        return image

    def _to_triton(self, name, tensor):
        """torch -> a Triton tensor of the served dtype, without a host copy on a GPU."""
        if name == "timestep":  # components declare the per-sample timestep as [1]: [batch, 1]
            tensor = tensor.reshape(-1, 1)
        if name in HOST_INPUTS:
            tensor = tensor.cpu()
        tensor = tensor.to(self.dtypes.get(name, tensor.dtype)).contiguous()
        if tensor.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
        return pb_utils.Tensor(name, tensor.numpy())

    def _noise_pred(self, tensor):
        return _to_torch(tensor, self.device)  # Generation casts it to fp32 for the scheduler

    async def _infer(self, model, tensors, outputs, memory):
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=outputs, **memory)
        future = asyncio.ensure_future(request.async_exec())
        timeout = self.params.component_timeout_s
        try:
            # shield: a timed-out call is not cancelled. Cancelling a BLS future that Triton
            # still owns crashed the server (Signal 11) once its model was later unloaded.
            response = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self.orphans.add(future)  # keep it alive until Triton answers, then drop it
            future.add_done_callback(self.orphans.discard)
            raise ComponentError(f"model '{model}' did not answer within {timeout:g} s")
        if response.has_error():
            raise ComponentError(f"model '{model}' failed: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n) for n in outputs}


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


def _copy(tensor):
    """A new Tensor object with its own copy of the data, on the same device."""
    if tensor.is_cpu():
        return pb_utils.Tensor(tensor.name(), np.array(tensor.as_numpy()))
    data = torch.from_dlpack(tensor.to_dlpack()).clone()
    return pb_utils.Tensor.from_dlpack(tensor.name(), torch.utils.dlpack.to_dlpack(data))


def _to_torch(tensor, device):
    if tensor.is_cpu():
        return torch.from_numpy(np.array(tensor.as_numpy())).to(device)
    return torch.from_dlpack(tensor.to_dlpack()).to(device)
