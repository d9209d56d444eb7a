"""Triton Python-based backend ``asyncdiff_unary``: the ``asyncdiff`` model, one request in, one image out.

Plain HTTP/gRPC inference and perf_analyzer cannot call a decoupled model, so
this non-decoupled model forwards each request to the engine
(``asyncdiff_stream``, decoupled) and answers with the final response. Its
instances (``max_batch_requests`` of them) are what lets that many requests be
in flight: the python backend runs one request per instance at a time. Its
queue is Triton's, bounded by ``default_queue_policy`` (a full queue answers
UNAVAILABLE). It asks the engine for the final outputs only (progress responses
would cost an IPC round trip per step), and checks every ``CANCEL_POLL_S``
whether its own client has gone; if so it cancels the forwarded request, which
stops at its next step boundary.
"""

import asyncio
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from asyncdiff.contract import ERROR, OUTPUTS, STREAM_MODEL_NAME, error_kind

FORWARDED = [f.name for f in OUTPUTS] + [ERROR.name]
CANCEL_POLL_S = 0.05  # how often a request in flight asks whether its client has gone


class TritonPythonModel:
    def initialize(self, args):
        self.outputs = [f.name for f in OUTPUTS]

    async def execute(self, requests):
        return [await self._forward(r) for r in requests]

    async def _forward(self, request):
        rid = f"{request.request_id() or 'unary'}-{uuid.uuid4().hex[:12]}"
        call = pb_utils.InferenceRequest(model_name=STREAM_MODEL_NAME, inputs=request.inputs(),
                                         requested_output_names=FORWARDED, request_id=rid,
                                         parameters={"error_output": True})
        responses = asyncio.ensure_future(_responses(call))
        asked_to_stop = False
        while not responses.done():
            await asyncio.wait([responses], timeout=CANCEL_POLL_S)
            if not responses.done() and not asked_to_stop and request.is_cancelled():
                asked_to_stop = True
                await _cancel(request, rid)
        final = None
        for response in responses.result():
            error = pb_utils.get_output_tensor_by_name(response, ERROR.name)
            if response.has_error() or error is not None:
                # A BLS caller gets every error as INTERNAL: error_kind restores the status.
                message = (response.error().message() if response.has_error()
                           else error.as_numpy().reshape(-1)[0].decode())
                code = getattr(pb_utils.TritonError, error_kind(message))
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
            if pb_utils.get_output_tensor_by_name(response, "IMAGE") is not None:
                final = response
        if final is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "the engine ended without an image", pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.get_output_tensor_by_name(final, name) for name in self.outputs])


async def _responses(call):
    """Every response of a decoupled BLS call; the wait for them blocks an executor thread,
    not the event loop (which polls for cancellation meanwhile)."""
    iterator = await call.async_exec(decoupled=True)
    return await asyncio.get_running_loop().run_in_executor(None, list, iterator)


async def _cancel(request, rid):
    prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
    stop = pb_utils.InferenceRequest(  # PROMPT only because the config requires it
        model_name=STREAM_MODEL_NAME, requested_output_names=[],
        inputs=[pb_utils.Tensor("PROMPT", np.array(prompt))], parameters={"cancel": rid})
    for _ in await stop.async_exec(decoupled=True):
        pass
