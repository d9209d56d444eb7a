"""Triton Python-based backend ``asyncdiff_unary``: the ``asyncdiff`` model, one request in, one image out.

Plain HTTP/gRPC inference and perf_analyzer cannot call a decoupled model, so
this non-decoupled model forwards each request to the engine
(``asyncdiff_stream``, decoupled) and answers with the final response. Its
instances (``max_batch_requests`` of them) are what lets that many requests be
in flight: the python backend runs one request per instance at a time. Its
queue is Triton's, bounded by ``default_queue_policy`` (a full queue answers
UNAVAILABLE). The engine's progress responses are how a client that has gone
is noticed: after each step the forwarded request is cancelled if this one is.
"""

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from asyncdiff.contract import ERROR, OUTPUTS, STEP, STREAM_MODEL_NAME, error_kind

FORWARDED = [f.name for f in OUTPUTS] + [STEP.name, ERROR.name]


class TritonPythonModel:
    def initialize(self, args):
        self.outputs = [f.name for f in OUTPUTS]

    async def execute(self, requests):
        return [await self._forward(r) for r in requests]

    async def _forward(self, request):
        rid = f"{request.request_id() or 'unary'}-{uuid.uuid4().hex[:12]}"
        inputs = request.inputs()
        call = pb_utils.InferenceRequest(model_name=STREAM_MODEL_NAME, inputs=inputs,
                                         requested_output_names=FORWARDED, request_id=rid,
                                         parameters={"error_output": True})
        final, asked_to_stop = None, False
        for response in await call.async_exec(decoupled=True):
            error = pb_utils.get_output_tensor_by_name(response, ERROR.name)
            if response.has_error() or error is not None:
                # A BLS caller gets every error as INTERNAL: error_kind restores the status.
                message = (response.error().message() if response.has_error()
                           else error.as_numpy().reshape(-1)[0].decode())
                code = getattr(pb_utils.TritonError, error_kind(message))
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
            if pb_utils.get_output_tensor_by_name(response, "IMAGE") is not None:
                final = response
            if not asked_to_stop and request.is_cancelled():
                asked_to_stop = True
                prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
                stop = pb_utils.InferenceRequest(  # PROMPT only because the config requires it
                    model_name=STREAM_MODEL_NAME, requested_output_names=[],
                    inputs=[pb_utils.Tensor("PROMPT", np.array(prompt))],
                    parameters={"cancel": rid})
                for _ in await stop.async_exec(decoupled=True):
                    pass
        if final is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "the engine ended without an image", pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.get_output_tensor_by_name(final, name) for name in self.outputs])
